"""The critical batch over training, three ways: local (branch runs), noise scales, grid.

    python -m analysis.local_batch BRANCH_SWEEP_DIR [--grid GRID_SWEEP_DIR] [--out DIR] [--tolerance T]

From a branch sweep (python -m sweeps.branch): the local critical batch at each branch point
(critbatch.local_batch, with the seeds' interval), beside B_simple and B_noise along the trunk
(the noise-scale window there, and averaged along the path) and, given a grid sweep of the same
task and optimizer (python -m sweeps.launch), the grid's B_crit at the goals (analysis.pareto's
fits), where the trunk met them. Writes to --out (default BRANCH_SWEEP_DIR/analysis):
local_batch.csv (one row per branch point, the losses behind it), critical_batch.csv (the three
ways in one table), costs.csv (what each way spent, in examples and seconds of training),
summary.md (also printed) and figures/local_batch.png|pdf. Bad input: `error: ...` and status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.cli import run_command
from critbatch import plots, records, tradeoff
from critbatch.local_batch import (load_branch_sweep, local_critical_batches, noise_scale_examples, trunk_at)

NOISE_COLUMNS = ("b_simple", "b_noise", "b_simple_path", "b_noise_path")


class AnalysisError(Exception):
    """Input this analysis cannot use; the message says what is wrong."""


def _g(x) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float, np.floating)) and np.isfinite(x) else "–"


def trunk_loss_column(trunk: dict) -> str:
    """The curve column that stands for the trunk's loss: the smoothed training loss (linreg's exact
    loss where it has one, which is what its branches are judged on)."""
    return "exact_loss" if "exact_loss" in trunk["curve"] else "train_loss"


def trunk_curve(trunk: dict) -> pd.DataFrame:
    curve = pd.DataFrame(trunk["curve"])
    curve["loss"] = pd.to_numeric(curve[trunk_loss_column(trunk)], errors="coerce")
    return curve[["step", "examples", "loss", *[c for c in NOISE_COLUMNS if c in curve]]].astype(float)


def grid_b_crit(grid_dirs: list[str], trunk: dict, min_steps: float) -> tuple[pd.DataFrame, int, float]:
    """The grid's B_crit per goal (analysis.pareto's fit), placed where the trunk met each goal;
    with what the grid cost (examples, seconds of training over all its runs)."""
    from analysis.pareto import analyse, load_records

    runs, _ = load_records(grid_dirs)
    task, optimizer = trunk["config"]["task"]["name"], trunk["config"]["optimizer"]["name"]
    runs = runs[(runs["task"] == task) & (runs["optimizer"] == optimizer)]
    if runs.empty:
        raise AnalysisError(f"{', '.join(grid_dirs)}: no grid runs of task {task!r} with optimizer {optimizer!r}, "
                            "the trunk's")
    fits = analyse(runs, min_steps=min_steps).fits
    B0, crossings = trunk["config"]["batch_size"], {g["threshold"]: g for g in trunk["goals"]}
    rows = []
    for _, fit in fits.iterrows():
        goal = crossings.get(fit["goal_threshold"], {})
        step = goal.get("step") if goal.get("reached") and not goal.get("censored") else None
        rows.append({"goal": fit["goal"], "goal_threshold": fit["goal_threshold"], "b_crit": fit["b_crit"],
                     "b_crit_low": fit["b_crit_low"], "b_crit_high": fit["b_crit_high"],
                     "trunk_step": math.nan if step is None else step,
                     "examples": math.nan if step is None else step * B0})
    grid = pd.DataFrame(rows)
    grid["loss"] = trunk_at(trunk, grid["trunk_step"], trunk_loss_column(trunk))
    examples = wall = 0.0
    for run_dir in runs.drop_duplicates("run_id")["run_dir"]:
        summary = records.read_record(Path(run_dir) / records.RECORD_FILE)["summary"]
        examples += summary["examples"]
        wall += summary["wall_time"] + (summary.get("setup_seconds") or 0.0)
    return grid, int(examples), wall


def costs(trunk: dict, branches: pd.DataFrame, grid_cost: tuple[int, float] | None) -> pd.DataFrame:
    """Examples and seconds of training (set-up included) each way spent."""
    summary = trunk["summary"]
    trunk_examples, trunk_wall = summary["examples"], summary["wall_time"] + (summary.get("setup_seconds") or 0.0)
    extra = noise_scale_examples(trunk)
    rows = [{"method": "noise scales along the trunk", "examples": trunk_examples + sum(extra.values()),
             "of which beyond training": sum(extra.values()), "runs": 1, "seconds": trunk_wall,
             "note": f"the trunk's {trunk_examples} training examples; probes {extra['probes']}, "
                     f"B_noise's own batches {extra['b_noise_batches']}"},
             {"method": "local critical batch (branches)", "examples": trunk_examples
              + int(branches["branch_examples"].fillna(0).sum()), "of which beyond training": 0,
              "runs": 1 + len(branches), "seconds": trunk_wall + float(branches["wall_time"].fillna(0).sum()),
              "note": f"the trunk, and {len(branches)} branches"}]
    if grid_cost is not None:
        rows.append({"method": "grid B_crit (sweeps.launch)", "examples": grid_cost[0], "of which beyond training": 0,
                     "runs": math.nan, "seconds": grid_cost[1], "note": "every run of the grid"})
    return pd.DataFrame(rows)


def one_table(points: pd.DataFrame, grid: pd.DataFrame | None) -> pd.DataFrame:
    """The three ways in one table, one row per branch point, and one per goal whose grid fit has
    no branch point of its own (a goal-labelled branch point carries its goal's B_crit)."""
    table = points[["examples", "label", "loss", "b_local", "low", "high", "saturated", "floor", "n_seeds",
                    *NOISE_COLUMNS]].copy()
    table["grid_b_crit"] = table["grid_low"] = table["grid_high"] = math.nan
    if grid is None:
        return table
    for _, goal in grid.iterrows():
        at = table.index[table["label"].str.split("; ").map(lambda labels, g=goal["goal"]: g in labels)]
        if len(at):
            table.loc[at, ["grid_b_crit", "grid_low", "grid_high"]] = goal[["b_crit", "b_crit_low", "b_crit_high"]].values
        else:
            table.loc[len(table)] = {"examples": goal["examples"], "label": goal["goal"], "loss": goal["loss"],
                                     "grid_b_crit": goal["b_crit"], "grid_low": goal["b_crit_low"],
                                     "grid_high": goal["b_crit_high"]}
    return table.sort_values("examples", na_position="last").reset_index(drop=True)


def markdown(table: pd.DataFrame, cost: pd.DataFrame, trunk: dict, tolerance: float) -> str:
    config = trunk["config"]
    lines = [f"# The critical batch over training: {config['task']['name']} / {config['optimizer']['name']}", "",
             f"Trunk `{trunk['run_name']}` (B0 = {config['batch_size']}, lr {config['optimizer']['lr']:g}). Local "
             f"critical batch: the largest k B0 whose branch, after the window, loses at most {tolerance:g} of the "
             "progress of the k = 1 branch (best lr per k, mean over the seeds; brackets: 95% bootstrap over the "
             "seeds; ≥ / ≤: at the largest / smallest batch tried). B_simple and B_noise: the trunk's noise-scale "
             "window at the branch point, and averaged along its path to there. Grid: B_crit fitted per goal "
             "(analysis.pareto), on the row of the branch point at that goal.", "",
             "| trunk examples | branch point | trunk loss | local critical batch | B_simple | B_noise | "
             "B_simple path | B_noise path | grid B_crit |", "|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        local = "–"
        if np.isfinite(row["b_local"]):
            mark = "≥ " if row["saturated"] else "≤ " if row["floor"] else ""
            local = f"{mark}{_g(row['b_local'])} [{_g(row['low'])}, {_g(row['high'])}]"
        grid = "–" if not np.isfinite(row["grid_b_crit"]) else \
            f"{_g(row['grid_b_crit'])} [{_g(row['grid_low'])}, {_g(row['grid_high'])}]"
        lines.append(f"| {_g(row['examples'])} | {row['label']} | {_g(row['loss'])} | {local} | {_g(row['b_simple'])} | "
                     f"{_g(row['b_noise'])} | {_g(row['b_simple_path'])} | {_g(row['b_noise_path'])} | {grid} |")
    lines += ["", "What each way cost:", "", "| method | examples | of which beyond training | runs | seconds of "
              "training | |", "|---|---|---|---|---|---|"]
    for _, row in cost.iterrows():
        lines.append(f"| {row['method']} | {int(row['examples'])} | {int(row['of which beyond training'])} | "
                     f"{_g(row['runs'])} | {row['seconds']:.0f} | {row['note']} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.local_batch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="the branch sweep's directory (python -m sweeps.branch)")
    p.add_argument("--grid", nargs="+", metavar="DIR", help="a grid sweep (or several) of the same task and optimizer")
    p.add_argument("--out", metavar="DIR", help="output folder (default SWEEP_DIR/analysis)")
    p.add_argument("--tolerance", type=float, help="share of the k = 1 branch's progress a larger batch may lose "
                   "(default: the sweep's branches.tolerance)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="resamples of the seeds (1000)")
    p.add_argument("--min-steps", type=float, default=tradeoff.MIN_FIT_STEPS, metavar="S",
                   help="the grid fit's --min-steps (analysis.pareto)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--quiet", action="store_true", help="do not print the summary")
    p.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")
    return p


def run(args: argparse.Namespace) -> Path:
    sweep_dir = Path(args.sweep_dir)
    try:
        trunk, branches = load_branch_sweep(sweep_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise AnalysisError(str(exc)) from None
    if branches.empty:
        raise AnalysisError(f"{sweep_dir}: no finished branch runs of trunk {trunk['run_name']}")
    tolerance = args.tolerance
    if tolerance is None:
        try:
            tolerance = json.loads((sweep_dir / records.SWEEP_FILE).read_text())["branches"]["tolerance"]
        except (OSError, ValueError, KeyError) as exc:
            raise AnalysisError(f"{sweep_dir}: no branches.tolerance in {records.SWEEP_FILE} ({exc}); give --tolerance")
    if not tolerance > 0:
        raise AnalysisError(f"--tolerance {tolerance} must be > 0")
    out_dir = Path(args.out) if args.out else sweep_dir / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    B0 = trunk["config"]["batch_size"]
    points = local_critical_batches(branches, B0, tolerance, n_bootstrap=args.bootstrap)
    points["loss"] = points["start_loss"]
    for column in NOISE_COLUMNS:
        points[column] = trunk_at(trunk, points["trunk_step"], column)
        # at initialisation: the initial probe (the curve has no window there yet)
        initial = trunk["summary"].get(f"{column.removesuffix('_path')}_init")
        points.loc[points["trunk_step"] == 0, column] = math.nan if initial is None else initial
    grid, grid_cost = None, None
    if args.grid:
        grid, *grid_cost = grid_b_crit(args.grid, trunk, args.min_steps)
        grid.to_csv(out_dir / "grid_b_crit.csv", index=False)
    table = one_table(points, grid)
    cost = costs(trunk, branches, grid_cost)
    points.to_csv(out_dir / "local_batch.csv", index=False)
    table.to_csv(out_dir / "critical_batch.csv", index=False)
    cost.to_csv(out_dir / "costs.csv", index=False)
    if not args.no_figures:
        curve = trunk_curve(trunk)
        title = f"{trunk['config']['task']['name']} / {trunk['config']['optimizer']['name']}, trunk B0 = {B0}"
        plots.save_figure(plots.local_critical_batch(points, curve, grid, title), out_dir / "figures", "local_batch")
    summary = markdown(table, cost, trunk, tolerance)
    (out_dir / "summary.md").write_text(summary)
    if not args.quiet:
        print(summary)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    return run_command(run, _parser().parse_args(argv), AnalysisError)


if __name__ == "__main__":
    sys.exit(main())
