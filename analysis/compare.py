"""B_crit against B_simple across tasks: the paper's summary figure (McCandlish et al. 2018, Fig. 4
and Table 1) for several sweeps at once.

    python -m analysis.compare DIR1 DIR2 ... --out DIR [--labels A B ...] [--min-steps S] [--paper]

For every sweep directory, every experiment in it (task / optimizer) and every goal that its
tradeoff fit resolves (analysis.pareto's fit: best lr per batch size, points reached in at least
--min-steps steps): B_crit with its interval, against B_simple at the goal and B_simple averaged
along the path to it (the medians over the best runs, as analysis.pareto reports them). Writes

    DIR/cross_task.csv          one row per (sweep, experiment, goal): the figure's data
    DIR/cross_task.md           the same as a table, with the ratios (also printed)
    DIR/figures/cross_task.png  (and .pdf) the log-log figure, y = x and the band x/10 .. 10x

Each sweep is labelled by --labels (default: task / optimizer, with the dataset where the task's
name does not say it). Bad input (a --labels count that does not match, a directory without
records, nothing fitted) gives one `error: ...` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import pareto
from analysis.cli import run_command
from critbatch import plots, tradeoff

#: McCandlish et al. (2018) Table 1, the image-classification rows (B_crit and B_simple at the start of
#: training and averaged over it), drawn with --paper for comparison
PAPER_TABLE1 = pd.DataFrame([
    ("MNIST", 20, 200, 50, 900), ("SVHN", 50, 500, 300, 4000), ("CIFAR10", 300, 900, 400, 2000)],
    columns=["task", "b_crit_start", "b_crit_average", "b_simple_start", "b_simple_average"])

COLUMNS = ["label", "sweep_dir", "task", "optimizer", "goal", "goal_threshold", "b_crit", "b_crit_low", "b_crit_high",
           "b_simple", "b_simple_low", "b_simple_high", "b_simple_path", "b_simple_path_min", "b_simple_path_max",
           "b_simple_over_b_crit", "b_simple_path_over_b_crit", "b_simple_within_10x", "b_simple_path_within_10x"]


def paper_points() -> pd.DataFrame:
    """PAPER_TABLE1 as points (label, b_simple, b_crit): each task's start and average."""
    rows = []
    for _, r in PAPER_TABLE1.iterrows():
        rows.append((f"{r['task']} start", r["b_simple_start"], r["b_crit_start"]))
        rows.append((f"{r['task']} average", r["b_simple_average"], r["b_crit_average"]))
    return pd.DataFrame(rows, columns=["label", "b_simple", "b_crit"])


def _within(ratio: pd.Series) -> pd.Series:
    """True / False where the ratio is known, missing where it is not."""
    inside = (ratio >= 1 / plots.ORDER_OF_MAGNITUDE) & (ratio <= plots.ORDER_OF_MAGNITUDE)
    return inside.astype("boolean").mask(ratio.isna())


def sweep_rows(sweep_dir: str | Path, label: str | None, min_steps: float, level: float) -> tuple[pd.DataFrame, list[str]]:
    """The figure's rows for one sweep directory, and notes on the goals left out."""
    runs, _ = pareto.load_records([sweep_dir])
    runs = pareto.name_datasets(runs)
    analysis = pareto.analyse(runs, level=level, n_bootstrap=0, min_steps=min_steps)
    combos = pareto._combos(analysis.fits)
    frames, notes = [], []
    for sel, _ in combos:
        fits = pareto._select(analysis.fits, sel).copy()
        name = " / ".join(str(sel[k]) for k in ("task", "optimizer") if k in sel)
        fits["label"] = (f"{label}: {name}" if len(combos) > 1 else label) if label else name
        fitted = fits["identified"].astype(bool) & np.isfinite(fits["b_crit"])
        for goal in fits.loc[~fitted, "goal"]:
            notes.append(f"{sweep_dir}: {fits['label'].iloc[0]}: goal {goal} is not fitted; left out")
        frames.append(fits[fitted])
    table = pd.concat(frames, ignore_index=True)
    table["sweep_dir"] = str(sweep_dir)
    for column in ("b_simple", "b_simple_path"):
        table[f"{column}_over_b_crit"] = table[column] / table["b_crit"]
        table[f"{column}_within_10x"] = _within(table[f"{column}_over_b_crit"])
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = np.nan
    return table[COLUMNS], notes


def cross_task_table(sweep_dirs, labels=None, min_steps: float = tradeoff.MIN_FIT_STEPS,
                     level: float = 0.95) -> tuple[pd.DataFrame, list[str]]:
    """Every fitted goal of every sweep, as the figure draws them (COLUMNS), and notes."""
    labels = list(labels) if labels else [None] * len(sweep_dirs)
    if len(labels) != len(sweep_dirs):
        raise pareto.AnalysisError(f"--labels: {len(labels)} label(s) for {len(sweep_dirs)} sweep directories; "
                                   "give one label per directory, in the same order")
    for sweep_dir in sweep_dirs:  # every directory checked before any is analysed
        if not Path(sweep_dir).is_dir():
            raise pareto.AnalysisError(f"{sweep_dir}: no such directory (give sweep directories that hold runs/)")
    frames, notes = [], []
    for sweep_dir, label in zip(sweep_dirs, labels):
        rows, left_out = sweep_rows(sweep_dir, label, min_steps, level)
        frames.append(rows)
        notes += left_out
    table = pd.concat(frames, ignore_index=True)
    if table.empty:
        raise pareto.AnalysisError("no goal of any sweep could be fitted: nothing to draw "
                                   "(python -m analysis.pareto SWEEP_DIR says why, per goal)")
    return table, notes


def _g(x) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float, np.floating)) and np.isfinite(x) else "–"


def markdown(table: pd.DataFrame) -> str:
    lines = ["| experiment | goal | B_crit [interval] | B_simple at goal | ratio | B_simple path | ratio |",
             "|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        lines.append(f"| {r['label']} | {r['goal']} | {_g(r['b_crit'])} [{_g(r['b_crit_low'])}, {_g(r['b_crit_high'])}] "
                     f"| {_g(r['b_simple'])} | {_g(r['b_simple_over_b_crit'])} | {_g(r['b_simple_path'])} "
                     f"| {_g(r['b_simple_path_over_b_crit'])} |")
    counted = {c: table[f"{c}_within_10x"].dropna() for c in ("b_simple", "b_simple_path")}
    lines += ["", "Within a factor 10 of B_crit (the paper's order of magnitude): "
              f"B_simple at the goal at {int(counted['b_simple'].sum())} of {len(counted['b_simple'])} goals, "
              f"its path average at {int(counted['b_simple_path'].sum())} of {len(counted['b_simple_path'])}."]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="sweep directories holding runs/*/record.json")
    p.add_argument("--out", metavar="DIR", required=True, help="where cross_task.csv, .md and figures/ go")
    p.add_argument("--labels", nargs="+", metavar="LABEL",
                   help="one label per SWEEP_DIR, in the same order (default: task / optimizer)")
    p.add_argument("--min-steps", type=float, default=tradeoff.MIN_FIT_STEPS, metavar="S",
                   help=f"fit only points reached in at least S steps ({tradeoff.MIN_FIT_STEPS})")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the B_crit intervals (0.95)")
    p.add_argument("--paper", action="store_true", help="also draw the paper's Table 1 rows (grey crosses)")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")
    return p


def run(args: argparse.Namespace) -> Path:
    if not 0 < args.level < 1:
        raise pareto.AnalysisError(f"--level {args.level} must be between 0 and 1")
    if not args.min_steps > 0:
        raise pareto.AnalysisError(f"--min-steps {args.min_steps} must be > 0")
    table, notes = cross_task_table(args.sweep_dirs, args.labels, args.min_steps, args.level)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "cross_task.csv", index=False)
    text = markdown(table)
    (out / "cross_task.md").write_text(text + "\n")
    figure = plots.b_crit_vs_b_simple_across(table, paper_points() if args.paper else None)
    plots.save_figure(figure, out / "figures", "cross_task")
    if not args.quiet:
        print(text)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_command(run, _parser().parse_args(argv), pareto.AnalysisError)


if __name__ == "__main__":
    sys.exit(main())
