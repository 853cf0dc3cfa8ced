"""How sweeps are launched: Hydra configs (conf/) -> a validated grid of runs -> local or SLURM jobs."""
