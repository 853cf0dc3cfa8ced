"""Time the analysis end to end on many run records (a benchmark, not a test).

    python scripts/bench_analysis.py [--records 10000] [--dir SWEEP_DIR] [--keep] [--bootstrap 200]

Writes N synthetic record.json files (analysis.synthetic: 4 tasks x 14 batch sizes x 6 lrs x
seeds, 3 goals, curves logged every 5% of steps) to --dir (or a temp folder), unless it already
holds records, then times `python -m analysis.pareto SWEEP_DIR` in-process, phase by phase:
loading the records, the analysis (best runs, fits, bootstrap), the tables and the figures.
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from analysis import pareto  # noqa: E402
from analysis.synthetic import Truth, make_record  # noqa: E402
from critbatch import records  # noqa: E402

TASKS = ("synthetic_a", "synthetic_b", "synthetic_c", "synthetic_d")
BATCH_SIZES = tuple(2 ** k for k in range(14))
LR_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


def write_records(sweep_dir: Path, n: int, truth: Truth = Truth()) -> None:
    # itertools.product would materialise count(): seeds go in an outer generator
    settings = ((seed, *rest) for seed in itertools.count()
                for rest in itertools.product(TASKS, BATCH_SIZES, LR_FACTORS))
    for i, (seed, task, b, f) in enumerate(settings):
        if i == n:
            break
        rec = make_record(truth, b, truth.lr_opt(b) * f, seed, task=task, curve_ratio=1.05)
        records.write_record(sweep_dir / records.RUNS_DIR / rec["run_name"] / records.RECORD_FILE, rec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=10_000)
    p.add_argument("--dir", type=Path, help="sweep folder to use (written if it has no records)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    p.add_argument("--bootstrap", type=int, default=200)
    args = p.parse_args(argv)
    sweep = args.dir or Path(tempfile.mkdtemp(prefix="bench_analysis_"))
    try:
        existing = sum(1 for _ in records.iter_record_paths(sweep)) if sweep.exists() else 0
        if existing == 0:
            t = time.perf_counter()
            write_records(sweep, args.records)
            print(f"wrote {args.records} records to {sweep} in {time.perf_counter() - t:.1f} s")
        else:
            print(f"using {existing} records under {sweep}")
        out = sweep / "analysis"
        times = {}
        t0 = t = time.perf_counter()
        runs, notes = pareto.load_records(sweep)
        times["load records (load_sweep)"] = time.perf_counter() - t
        t = time.perf_counter()
        a = pareto.analyse(runs, n_bootstrap=args.bootstrap, notes=notes)
        times[f"best runs + fits (bootstrap {args.bootstrap})"] = time.perf_counter() - t
        t = time.perf_counter()
        files = pareto.write_tables(a, out)
        times["tables"] = time.perf_counter() - t
        t = time.perf_counter()
        fig_files, skipped = pareto.draw_figures(a, out, pareto.curves_of_best_runs)
        times["figures (png + pdf)"] = time.perf_counter() - t
        t = time.perf_counter()
        (out / "summary.md").write_text(pareto.render_summary(a, str(sweep), files + fig_files, skipped, out))
        times["summary"] = time.perf_counter() - t
        total = time.perf_counter() - t0
        print(f"{runs['run_id'].nunique()} runs, {len(runs)} (run, goal) rows, {len(a.fits)} fitted goals, "
              f"{len(fig_files)} figure files")
        for name, seconds in times.items():
            print(f"  {name:<40s} {seconds:7.2f} s")
        print(f"  {'total':<40s} {total:7.2f} s")
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(sweep, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
