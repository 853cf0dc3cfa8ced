"""What one job runs: a group of runs, one after another, each leaving its record.

Runs in the worker (a SLURM array task, a local subprocess, or in-process). It skips runs whose
records are already complete, so a relaunch or a requeued job never recomputes them, and it turns
SIGTERM (scancel, preemption, the time limit) into a "failed" record instead of a silent gap.
"""
from __future__ import annotations

import os
import signal
import traceback
from pathlib import Path

from critbatch import records
from critbatch.train import train


class JobKilled(Exception):
    """The job was sent SIGTERM (cancelled, preempted or out of time)."""


def _raise_killed(signum, frame):
    raise JobKilled(f"job received signal {signal.Signals(signum).name} "
                    f"(cancelled, preempted or out of time); relaunch the sweep to rerun this run")


def run_group(sweep_dir: str, configs: list[dict], threads: int | None = None) -> list[dict]:
    """Train each config under sweep_dir/runs/<run_name>/ unless its record is complete.

    Returns one summary per run: name, status and whether it was skipped. A run that raises is
    recorded as failed by `train` and the group goes on with the next run; a kill ends the group.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    previous = signal.signal(signal.SIGTERM, _raise_killed)
    summaries = []
    try:
        for config in configs:
            out_dir = records.run_dir(sweep_dir, config)
            name = out_dir.name
            if records.is_complete(out_dir / records.RECORD_FILE):
                summaries.append({"run": name, "status": "skipped (complete)", "skipped": True})
                continue
            try:
                record = train(config, out_dir)
                summaries.append({"run": name, "status": record["status"], "skipped": False})
            except JobKilled:
                raise
            except Exception as exc:  # already recorded as failed by train(); keep going
                summaries.append({"run": name, "status": records.FAILED, "skipped": False,
                                  "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc(limit=5)})
    finally:
        signal.signal(signal.SIGTERM, previous)
    return summaries


def job_threads() -> int | None:
    """CPU threads this job may use: SLURM's allocation when there is one."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(cpus) if cpus else None


def run_group_job(sweep_dir: str, configs: list[dict], threads: int | None = None) -> list[dict]:
    """Entry point for submitted jobs (submitit pickles this function by reference)."""
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    return run_group(sweep_dir, configs, threads=threads or job_threads())
