"""What several test modules share: the repository, a small sweep, and launching it. Test modules
import from here (or conftest fixtures), never from one another."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A sweep of the digits task small enough for a test: 2 batch sizes x 2 lrs x 1 seed, easy goals.
SMALL = ["task=digits", "sweep.batch_sizes=[16,64]", "sweep.lr.count=2", "sweep.seeds=[0]",
         "goals.thresholds=[0.3,0.2]",
         "budget.max_steps=400", "launcher.threads=1"]

# What analysis.pareto writes for one sweep.
TABLES = ("steps_to_goal.csv", "steps_by_lr.csv", "best_runs.csv", "tradeoff_fits.csv",
          "input_problems.csv", "summary.md")
FIGURES = ("pareto_fronts", "noise_scales", "lr_vs_batch", "steps_heatmap", "training_curves")


def launch(*overrides: str, timeout: float = 300, cwd=REPO, python: str = sys.executable) -> subprocess.CompletedProcess:
    """`python -m sweeps.launch OVERRIDES` in a subprocess."""
    return subprocess.run([python, "-m", "sweeps.launch", *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def compose(*overrides: str) -> dict:
    """The composed config of `python -m sweeps.launch OVERRIDES`, as plain containers."""
    from sweeps.schema import compose as compose_config

    return compose_config(overrides)


def launch_here(sweep_dir: Path, *overrides: str) -> int:
    """sweeps.launch in this process; the value NEWLINE stands for a string with a line break
    (which a Hydra override cannot write)."""
    from sweeps.launch import launch as launch_sweep

    cfg = compose(*overrides)
    extra = cfg.get("launcher", {}).get("additional_parameters") or {}
    for key, value in extra.items():
        if value == "NEWLINE":
            extra[key] = "END\n#SBATCH --exclusive"
    return launch_sweep(cfg, sweep_dir, overrides=list(overrides))
