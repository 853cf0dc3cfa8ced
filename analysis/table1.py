"""The paper's Table 1 for sweeps run here: B_crit and the noise scales at the start of training and
averaged over it, one row per sweep.

    python -m analysis.table1 SWEEP_DIR [SWEEP_DIR ...] [--min-steps S] [--labels A B ...]

McCandlish et al. (2018) Table 1 gives, per task, B_crit at the start of training and averaged
over training, and B_simple likewise. Here, from each sweep's records (critbatch.tradeoff):

- B_crit start: the fit at the easiest goal that is fitted (a goal met within the first steps is
  censored, not fitted); B_crit average: the fit at the hardest fitted goal. Because
  S = S_min + E_min/B integrates 1 + B_noise/B along the path, B_crit of a goal is B_noise averaged
  along the path to it, so the hardest goal's B_crit is the average over (that much of) training.
- B_simple start: measured at initialisation, the median over the best runs; B_simple average:
  averaged along the path to the hardest fitted goal (IdealSteps, as B_crit averages it), the
  median over the best runs whose path average is resolved (standard error at most 25% of it;
  tradeoff.MAX_PATH_RELATIVE_SE).
- B_noise start, where measured (at initialisation, on at most 64 batches: rough); B_noise
  average: as B_simple's, "–" where no best run resolves it: at the default settings B_noise is
  measured too rarely for that (docs/noise_scales.md says what resolves it).
Intervals: B_crit's from the fit (and, in parentheses, from resampling seeds when there are two or
more); the noise scales' are the range over the best runs. Also: the number of runs and their
training time (the records' summed wall time; the launch's own wall time is the Makefile's to
measure).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.pareto import name_datasets
from critbatch import records, tradeoff

COLUMNS = ["task", "runs", "training time", "goals fitted", "B_crit start", "B_crit average",
           "B_simple start", "B_simple average", "B_noise start", "B_noise average"]


def _g(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float, np.floating)) and math.isfinite(x) else "–"


def _with(value: float, low: float, high: float) -> str:
    return _g(value) + (f" [{_g(low)}, {_g(high)}]" if math.isfinite(low) and math.isfinite(high) else "")


def table1_row(sweep_dir: str | Path, label: str | None = None, min_steps: float = tradeoff.MIN_FIT_STEPS,
               n_bootstrap: int = 200) -> dict:
    """One row of Table 1 for a sweep directory (see the module docstring)."""
    runs = name_datasets(records.load_sweep(sweep_dir))
    if runs.empty:
        raise ValueError(f"{sweep_dir}: no finished run records")
    best = tradeoff.best_runs(runs)
    fits = tradeoff.fit_all_goals(best, runs=runs, n_bootstrap=n_bootstrap, min_steps=min_steps)
    fitted = fits[fits["identified"].astype(bool)]
    if "goal_threshold" in fitted.columns:  # easiest goal first: the largest threshold
        fitted = fitted.sort_values("goal_threshold", ascending=False)
    totals = runs.drop_duplicates("run_id")
    wall = sum(float(records.read_record(Path(d) / records.RECORD_FILE)["summary"].get("wall_time") or 0.0)
               for d in totals["run_dir"])
    row = {"task": label or f"{runs['task'].iloc[0]} / {runs['optimizer'].iloc[0]}",
           "runs": int(totals["run_id"].nunique()), "training time": f"{wall / 60:.1f} min",
           "goals fitted": f"{len(fitted)} of {len(fits)}"}
    if fitted.empty:
        return {**row, **{c: "–" for c in COLUMNS[4:]}}
    start, end = fitted.iloc[0], fitted.iloc[-1]

    def b_crit(fit) -> str:
        text = _with(fit["b_crit"], fit["b_crit_low"], fit["b_crit_high"])
        if math.isfinite(fit.get("b_crit_seed_low", math.nan)):
            text += f" ({_g(fit['b_crit_seed_low'])}, {_g(fit['b_crit_seed_high'])})"
        return text + f" at {fit['goal']}"

    row["B_crit start"], row["B_crit average"] = b_crit(start), b_crit(end)
    for name in ("b_simple", "b_noise"):
        label_name = "B_simple" if name == "b_simple" else "B_noise"
        inits = pd.to_numeric(runs.drop_duplicates("run_id").get(f"{name}_init"), errors="coerce").dropna()
        row[f"{label_name} start"] = _with(float(np.median(inits)), float(inits.min()), float(inits.max())) \
            if len(inits) else "–"
    for label_name, name in (("B_simple average", "b_simple_path"), ("B_noise average", "b_noise_path")):
        row[label_name] = _with(end[name], end[f"{name}_min"], end[f"{name}_max"])
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.table1", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR")
    parser.add_argument("--labels", nargs="*", help="row labels, one per SWEEP_DIR (default: task / optimizer, "
                        "with the dataset where the task's name does not say it)")
    parser.add_argument("--min-steps", type=float, default=tradeoff.MIN_FIT_STEPS,
                        help=f"fit only points reached in at least this many steps ({tradeoff.MIN_FIT_STEPS})")
    args = parser.parse_args(argv)
    labels = args.labels or [None] * len(args.sweep_dirs)
    if len(labels) != len(args.sweep_dirs):
        print(f"error: {len(labels)} labels for {len(args.sweep_dirs)} sweep directories", file=sys.stderr)
        return 2
    rows = []
    for sweep_dir, label in zip(args.sweep_dirs, labels):
        if not Path(sweep_dir).is_dir():
            print(f"error: {sweep_dir}: no such directory", file=sys.stderr)
            return 2
        try:
            rows.append(table1_row(sweep_dir, label, args.min_steps))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
