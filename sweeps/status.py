"""`python -m sweeps.status SWEEP_DIR`: how far a sweep has got: done / running / failed / pending.

Reads only the files in the sweep directory (the manifest of planned runs, the records and the
runs' leases), so it works the same for a local sweep and for a detached SLURM array.

A run whose record says "running" is running while its owner's lease is live (its heartbeat is
fresh: sweeps/lease.py), however long its steps take; "failed" when its owner marked the lease
failed (the job ended without a final record, e.g. the disk was full); "stale" when there is no
live owner (the job died without a word: SIGKILL, a lost node). Relaunching reruns failed and
stale runs, and unreadable ones (a record that does not match its schema).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from critbatch import records
from sweeps.lease import FAILED as LEASE_FAILED, STALE_SECONDS, read_lease

UNREADABLE, STALE, PENDING = "unreadable", "stale", "pending"


def run_state(run_dir: Path, stale_seconds: float = STALE_SECONDS) -> str:
    """One run's state: a record status, or running / stale / pending / unreadable."""
    path = run_dir / records.RECORD_FILE
    lease = read_lease(run_dir, stale_seconds)
    if not path.exists():
        if lease is not None and lease.state == LEASE_FAILED:
            return records.FAILED  # not even its first record could be written
        return records.RUNNING if lease is not None and lease.live else PENDING
    try:
        status = records.read_record(path)["status"]
    except records.RecordError:
        return UNREADABLE
    if lease is not None and lease.live and status in (records.RUNNING, records.FAILED):
        return records.RUNNING  # owned and (re)training: its record is about to be rewritten
    if status == records.RUNNING:
        return records.FAILED if lease is not None and lease.state == LEASE_FAILED else STALE
    return status


def sweep_status(sweep_dir: str | Path, stale_seconds: float = STALE_SECONDS) -> dict:
    """The state of every run the sweep plans (sweep.json), and the other runs in the directory:
    `unplanned`, finished runs of the sweep's variant that a relaunch dropped from the plan (the
    analysis counts them too), and `other_variant`, runs of an earlier sweep in the directory
    (sweep.allow_new_variant; neither counts them)."""
    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / records.SWEEP_FILE
    if not manifest_path.exists():
        raise FileNotFoundError(f"{sweep_dir} has no sweep.json: not a sweep directory made by sweeps.launch")
    manifest = json.loads(manifest_path.read_text())
    planned = [run["name"] for run in manifest["runs"]]
    runs = {name: run_state(sweep_dir / records.RUNS_DIR / name, stale_seconds) for name in planned}
    unplanned, other_variant = [], []
    variant = manifest.get("variant")
    runs_dir = sweep_dir / records.RUNS_DIR
    for run_dir in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else ():
        if run_dir.name in runs or not (run_dir / records.RECORD_FILE).exists():
            continue
        try:
            record = records.read_record(run_dir / records.RECORD_FILE)
        except records.RecordError:
            continue
        if variant is not None and records.sweep_variant(record["config"]) != variant:
            other_variant.append(run_dir.name)
        elif record["status"] in records.FINISHED_STATUSES:
            unplanned.append(run_dir.name)
    return {"sweep_dir": str(sweep_dir), "runs": runs, "counts": Counter(runs.values()),
            "unplanned": unplanned, "other_variant": other_variant}


def format_status(status: dict) -> str:
    counts = status["counts"]
    done = sum(counts[s] for s in (records.COMPLETED, records.DIVERGED, records.STALLED, records.BUDGET_EXHAUSTED))
    lines = [f"{status['sweep_dir']}: {len(status['runs'])} runs: {done} done "
             f"({counts[records.COMPLETED]} completed, {counts[records.DIVERGED]} diverged, "
             f"{counts[records.STALLED]} stalled, "
             f"{counts[records.BUDGET_EXHAUSTED]} budget exhausted), {counts[records.RUNNING]} running, "
             f"{counts[records.FAILED]} failed, {counts['stale']} stale, {counts['pending']} pending"
             + (f", {counts[records.INTERRUPTED]} interrupted (a relaunch resumes them)"
                if counts[records.INTERRUPTED] else "")
             + (f", {counts[UNREADABLE]} unreadable" if counts[UNREADABLE] else "")]
    lines += [f"  {state:10s} {name}" for name, state in status["runs"].items()
              if state in (records.FAILED, "stale", "unreadable")]
    if status.get("unplanned"):
        lines.append(f"  + {len(status['unplanned'])} finished run(s) of this sweep outside its current plan "
                     "(an earlier launch's grid): the analysis counts them too")
    if status.get("other_variant"):
        lines.append(f"  ({len(status['other_variant'])} run(s) of an earlier sweep in this directory, with other "
                     "settings: counted by neither this status nor the analysis)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.status", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--stale-seconds", type=float, default=STALE_SECONDS,
                        help="a run's owner is gone when its lease's heartbeat is older than this")
    parser.add_argument("--json", action="store_true", help="print the per-run states as JSON")
    args = parser.parse_args(argv)
    try:
        status = sweep_status(args.sweep_dir, args.stale_seconds)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status["runs"], indent=1) if args.json else format_status(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
