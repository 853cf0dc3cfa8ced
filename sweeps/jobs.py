"""What one job runs: a group of runs, one after another, each leaving its record.

Runs in the worker (a SLURM array task, a local subprocess, or in-process). It skips runs whose
records are already complete, so a relaunch or a requeued job never recomputes them. SIGTERM
(scancel, preemption) and SIGUSR2 (submitit's warning before the time limit) stop the run being
trained at a step boundary with its whole state checkpointed; the job is requeued (SIGUSR2) or
a relaunch resumes it, losing at most the steps since the signal.

Each run has one owner (sweeps/lease.py): a job trains a run only after claiming its lease, skips
runs that another live launch or job owns ("running elsewhere"), writes the record only while it
still owns the run (the lease's `holds()` guards RunBook.save), and lets go when the run is over:
the lease is removed when the record is final, and marked failed when it is not (a write failed,
the job was stopped), so that sweeps.status says failed and a relaunch takes the run over at once.

A job may train each run on several ranks (sweeps/distributed.py): every rank runs run_group,
rank 0 decides what to train and claims it, and a rank that fails ends the job.
"""
from __future__ import annotations

import enum
import os
import signal
import time
import traceback
from pathlib import Path
from typing import TypedDict

import submitit

from critbatch import records
from critbatch.config import RunConfig, check_auto_or_bool
from critbatch.distributed import RankFailure, Ranks, in_rank_environment, join, leave
from critbatch.packed import pack_key, packable
from critbatch.train import Interrupt, Interrupted, train_pack
from sweeps.distributed import REQUEUE_WAIT_S, RankSpec, slurm_rank_environment, spawn_ranks
from sweeps.lease import Lease, read_lease


class Outcome(str, enum.Enum):
    """What a job did with a run, beyond the statuses of records.Status it trained it to."""
    skipped = "skipped (complete)"            # its record was complete already
    elsewhere = "running elsewhere"           # another live launch or job owns it
    lost = "taken over by another job"        # this job stalled past the lease's staleness; the taker trains it
    job_failed = "job failed"                 # the job died; its runs are failed or partial on disk


RUNNING_ELSEWHERE, LOST = Outcome.elsewhere, Outcome.lost


class RunSummary(TypedDict, total=False):
    """One run's line in a job's (and the launch's) summary."""
    run: str                     # the run's name
    status: str                  # a records.Status or an Outcome
    skipped: bool
    error: str
    traceback: str
    owner: str | None            # a run running elsewhere: who owns it
    path: str | None             # plain or packed


class JobKilled(Exception):
    """The job was sent SIGTERM (cancelled, preempted or out of time) or SIGINT (Ctrl-C); the run
    it trained was checkpointed, and a relaunch resumes it."""


def packs(configs: list[RunConfig], packing: dict | None) -> list[tuple[list[RunConfig], bool]]:
    """(runs, packed) pairs: runs that may train as one packed model (they differ only in lr, B is
    small enough for packing to pay, and the model has no BatchNorm: decided here, before any data
    is loaded), at most packing.max_members each, with packed=True; every other run alone, with
    packed=False. A pack of one trains plain: vmap over one member gains nothing."""
    import torch

    packing = packing or {}
    enabled = packing.get("enabled", False)
    check_auto_or_bool("packing.enabled", enabled)
    # auto: packing pays where kernel launches dominate, on a GPU; on a CPU the plain loop is as fast.
    on_gpu = torch.cuda.is_available()
    by_key: dict[tuple, list[RunConfig]] = {}  # (packed?, what the pack shares) -> runs
    for config in configs:
        wanted = enabled is True or (enabled == "auto" and on_gpu and config.device != "cpu")
        small = config.batch_size <= packing.get("max_batch_size", 256)
        key = (True, pack_key(config)) if wanted and small and packable(config) else (False, len(by_key))
        by_key.setdefault(key, []).append(config)
    size = max(1, int(packing.get("max_members", 32)))
    chunks = [(group[i:i + size], packed) for (packed, _), group in by_key.items() for i in range(0, len(group), size)]
    # vmap over one member is slower than the plain loop, which replays its steps from CUDA graphs too
    return [(chunk, packed and len(chunk) > 1) for chunk, packed in chunks]


def _run_dir(sweep_dir: str, config: RunConfig) -> Path:
    return records.run_dir(sweep_dir, config.to_dict())


def _failed(name: str, error: str, tb: str | None = None) -> RunSummary:
    summary = RunSummary(run=name, status=records.Status.failed.value, skipped=False, error=error)
    if tb:
        summary["traceback"] = tb
    return summary


def _status_on_disk(run_dir) -> records.Status | None:
    try:
        return records.Status(records.read_record(run_dir / records.RECORD_FILE)["status"])
    except records.RecordError:
        return None


def _claim(sweep_dir: str, pack: list[RunConfig], owned: list[RunConfig], held: list[Lease]) -> list[RunSummary]:
    """Claim the runs of `pack`: those this job now owns go to `owned` (their leases to `held`);
    returns summaries of the others."""
    others = []
    for config in pack:
        run_dir = _run_dir(sweep_dir, config)
        try:
            lease = Lease.acquire(run_dir)
        except OSError as exc:  # e.g. the disk is full: the run cannot even be claimed
            others.append(_failed(run_dir.name, f"cannot write the run's lease: {type(exc).__name__}: {exc}"))
            continue
        if lease is None:
            info = read_lease(run_dir)
            others.append(RunSummary(run=run_dir.name, status=Outcome.elsewhere.value, skipped=True,
                                     owner=info.owner if info else None))
        elif records.is_complete(run_dir / records.RECORD_FILE):  # finished by its last owner meanwhile
            lease.log("skip-complete")
            lease.release()
            others.append(RunSummary(run=run_dir.name, status=Outcome.skipped.value, skipped=True))
        else:
            held.append(lease)
            owned.append(config)
    return others


def _run_pack(sweep_dir: str, pack: list[RunConfig], packed: bool,
              interrupt: Interrupt | None = None, ranks: Ranks | None = None) -> list[RunSummary]:
    ranks = ranks or Ranks.single()
    owned, held, summaries = [], [], []
    error = "the job ended before the run's record was final"
    try:
        if ranks.main:  # the run's lease and heartbeat: one per run, held by rank 0
            summaries += _claim(sweep_dir, pack, owned, held)
        owned, tokens = ranks.from_main((owned, [lease.token for lease in held]))
        if not owned:
            return summaries
        for lease in held:
            lease.log("train", ranks=ranks.size)
        dirs = [_run_dir(sweep_dir, c) for c in owned]
        if ranks.main:
            guard = lambda: all(lease.holds() for lease in held)  # noqa: E731
        else:  # another rank writes only a failure, and only while rank 0's lease is still there
            guard = lambda: all(getattr(read_lease(d), "token", None) == t for d, t in zip(dirs, tokens))  # noqa: E731
        for record in train_pack(owned, dirs, packed=packed and len(owned) > 1, guard=guard, interrupt=interrupt,
                                 ranks=ranks):
            summaries.append(RunSummary(run=record["run_name"], status=record["status"], skipped=False,
                                        path=record["summary"].get("path")))
    except (JobKilled, Interrupted, RankFailure) as exc:  # the job cannot go on
        error = str(exc)
        raise
    except records.NotOwner as exc:  # another job took a run over: it is its record now
        summaries += [RunSummary(run=_run_dir(sweep_dir, c).name, status=Outcome.lost.value, skipped=False,
                                 error=str(exc)) for c in owned]
        error = f"NotOwner: {exc}"
    except Exception as exc:  # recorded as failed by train() where the disk allowed; keep going
        error = f"{type(exc).__name__}: {exc}"
        summaries += [_failed(_run_dir(sweep_dir, c).name, error, traceback.format_exc(limit=5)) for c in owned]
    finally:
        for config, lease in zip(owned, held):
            status = _status_on_disk(_run_dir(sweep_dir, config))
            if status is not None and (status.finished or status is records.Status.interrupted):
                lease.release()  # an interrupted run has no owner until a relaunch resumes it
            else:
                lease.mark_failed(error)
    return summaries


def run_group(sweep_dir: str, configs: list[RunConfig], threads: int | None = None,
              packing: dict | None = None, ranks: RankSpec | None = None) -> list[RunSummary]:
    """Train each config under sweep_dir/runs/<run_name>/ unless its record is complete or
    another live launch or job owns it.

    Returns one summary per run: name, status ("running elsewhere" for a run owned elsewhere) and
    whether it was skipped. A run (or pack) that raises is recorded as failed and the group goes
    on with the next one. SIGTERM (cancelled, preempted) or SIGUSR2 (submitit's warning before the
    time limit) stop training at the next step boundary with its state saved in the run's
    checkpoint; a relaunch, or the job submitit requeues after SIGUSR2, resumes from there.

    `ranks`: each run on spec.processes ranks. Started here (spec.spawn), run_group runs again
    in each of them (sweeps.distributed.spawn_ranks) and returns rank 0's summaries; in each
    rank it joins the others, trains on its slice of every batch, and raises RankFailure when a
    rank died or hung.
    """
    import torch

    spec = ranks or RankSpec()
    if spec.processes > 1 and spec.spawn and not in_rank_environment():
        try:
            return spawn_ranks(run_group, (sweep_dir, configs), {"threads": threads, "packing": packing,
                                                                 "ranks": spec}, spec)
        except RankFailure as exc:  # the ranks are gone; the run they trained is recorded failed
            return [_failed(_run_dir(sweep_dir, c).name, str(exc)) for c in map(RunConfig.from_dict, configs)
                    if not records.is_complete(_run_dir(sweep_dir, c) / records.RECORD_FILE)]
    if threads:
        torch.set_num_threads(threads)
    configs = [RunConfig.from_dict(c) for c in configs]  # (a RunConfig is taken as it is)
    group = join(spec.timeout_s, configs[0].device.value if configs else "auto") if spec.processes > 1 \
        else Ranks.single()
    if group.size > 1:
        packing = {"enabled": False}  # a run on several ranks trains alone
    interrupt = Interrupt()
    # submitit's own SIGUSR2 handler checkpoints the job and requeues it: called once the
    # training state is saved (handling it mid-step would save a half-updated state)
    requeue = signal.getsignal(signal.SIGUSR2)
    summaries, todo = [], []
    for config in configs if group.main else ():
        run_dir = _run_dir(sweep_dir, config)
        if records.is_complete(run_dir / records.RECORD_FILE):
            summaries.append(RunSummary(run=run_dir.name, status=Outcome.skipped.value, skipped=True))
        else:
            todo.append(config)
    todo = group.from_main(todo)
    # SIGINT too: Ctrl-C stops a local launch's runs at a step boundary, checkpointed
    with interrupt.handling((signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)):
        try:
            for pack, packed in packs(todo, packing):
                summaries += _run_pack(sweep_dir, pack, packed, interrupt, group)
                signal_name = group.agreed_signal(interrupt.requested, 0)
                if signal_name:
                    interrupt.requested = interrupt.requested or signal_name
                    raise Interrupted(f"{signal_name} between runs")
        except Interrupted as exc:
            stopped = exc
        else:
            leave()
            return summaries
    if interrupt.requested == "SIGUSR2" and callable(requeue):
        requeue(signal.SIGUSR2, None)  # checkpoint (GroupJob.checkpoint) and requeue; exits
        if not group.main:  # submitit requeues from rank 0 only; SLURM ends this task with the job
            time.sleep(REQUEUE_WAIT_S)
            return summaries
    why = "interrupted" if interrupt.requested == "SIGINT" else "cancelled, preempted or out of time"
    raise JobKilled(f"job received {interrupt.requested} ({why}): {stopped}")


def job_threads() -> int | None:
    """CPU threads this job may use: SLURM's allocation when there is one."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(cpus) if cpus else None


class GroupJob(submitit.helpers.Checkpointable):
    """What a submitted job runs: run_group over its configs. Checkpointable in submitit's sense:
    before the time limit (or on preemption) submitit requeues the same job, which skips the runs
    already complete and resumes the interrupted one from its checkpoint."""

    def __call__(self, sweep_dir: str, configs: list[RunConfig], threads: int | None = None,
                 packing: dict | None = None, ranks: RankSpec | None = None) -> list[RunSummary]:
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        if ranks is not None and not ranks.spawn and ranks.processes > 1 and not slurm_rank_environment():
            raise RankFailure(f"this job was asked for {ranks.processes} ranks but runs as one SLURM task")
        return run_group(sweep_dir, configs, threads=threads or job_threads(), packing=packing, ranks=ranks)


run_group_job = GroupJob()  # submitit pickles it and calls it in the job
