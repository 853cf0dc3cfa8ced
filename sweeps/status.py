"""`python -m sweeps.status SWEEP_DIR`: how far a sweep has got: done / running / failed / pending.

Reads only the files in the sweep directory (the manifest of planned runs and the records), so it
works the same for a local sweep and for a detached SLURM array.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections import Counter
from pathlib import Path

from critbatch import records

# A "running" record not rewritten for this long, or whose process on this machine is gone, is
# reported as stale: its job died without a chance to record it (SIGKILL, node failure).
# Relaunching reruns it.
STALE_SECONDS = 600


def _died_here(record: dict) -> bool:
    """A running record whose process, on this very machine, no longer exists."""
    summary = record["summary"]
    if summary.get("host") != socket.gethostname() or not summary.get("pid"):
        return False
    try:
        os.kill(summary["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def sweep_status(sweep_dir: str | Path, stale_seconds: float = STALE_SECONDS) -> dict:
    sweep_dir = Path(sweep_dir)
    manifest_path = sweep_dir / "sweep.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{sweep_dir} has no sweep.json: not a sweep directory made by sweeps.launch")
    planned = [run["name"] for run in json.loads(manifest_path.read_text())["runs"]]
    runs = {}
    now = time.time()
    for name in planned:
        path = sweep_dir / records.RUNS_DIR / name / records.RECORD_FILE
        if not path.exists():
            runs[name] = "pending"
            continue
        try:
            record = records.read_record(path)
        except records.RecordError:
            runs[name] = "unreadable"
            continue
        status = record["status"]
        if status == records.RUNNING and (now - path.stat().st_mtime > stale_seconds or _died_here(record)):
            status = "stale"
        runs[name] = status
    return {"sweep_dir": str(sweep_dir), "runs": runs, "counts": Counter(runs.values())}


def format_status(status: dict) -> str:
    counts = status["counts"]
    done = sum(counts[s] for s in (records.COMPLETED, records.DIVERGED, records.BUDGET_EXHAUSTED))
    lines = [f"{status['sweep_dir']}: {len(status['runs'])} runs: {done} done "
             f"({counts[records.COMPLETED]} completed, {counts[records.DIVERGED]} diverged, "
             f"{counts[records.BUDGET_EXHAUSTED]} budget exhausted), {counts[records.RUNNING]} running, "
             f"{counts[records.FAILED]} failed, {counts['stale']} stale, {counts['pending']} pending"]
    lines += [f"  {state:10s} {name}" for name, state in status["runs"].items()
              if state in (records.FAILED, "stale", "unreadable")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.status", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--stale-seconds", type=float, default=STALE_SECONDS)
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
