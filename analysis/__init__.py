"""Scripts that regenerate tables and figures from run records: `python -m analysis.<name> SWEEP_DIR`.

analysis.pareto: Pareto fronts, the steps/examples tradeoff fit, B_crit against B_simple.
analysis.synthetic: records drawn from the paper's model, for tests and benchmarks.
"""
