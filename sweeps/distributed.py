"""One run on several processes, the launcher's side: how many ranks, checked before anything is
queued, and started as torchrun or SLURM would start them.

    launcher.processes=N                   local and submitit_local: the job spawns N ranks on this
                                           machine (spawn_ranks, torchrun-like: env:// rendezvous on
                                           127.0.0.1, one process per rank)
    launcher.tasks_per_node=T launcher.nodes=M
                                           slurm: each job is T x M SLURM tasks (srun), one rank each;
                                           submitit's TorchDistributedEnvironment exports the env
    launcher.rank_timeout_s                how long a rank waits for the others in a collective: a
                                           rank that hangs fails the run after it, one that dies at once

The number of ranks is a launcher setting, not a run setting, and not part of a run's identity:
it changes the order of float additions only, like `device` (critbatch.distributed says why).

Every rank of a job runs sweeps.jobs.run_group: rank 0 claims the runs (their leases and
heartbeats are per run, held by rank 0) and tells the others which; all train them together.
When a rank fails, the job fails: the ranks left record the run as failed and exit non-zero, and
whatever still runs is killed (here after KILL_GRACE_S; on SLURM by srun --kill-on-bad-exit), so
no job hangs. Ranks spawned here also die with the process that spawned them (`die_with`): a
spawner killed outright (kill -9, the OOM killer, a test's timeout) has no chance to stop them,
and a rank waiting in a collective runs no signal handler until rank_timeout_s has passed.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import sys
import pickle
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from critbatch.distributed import LOCAL_RANK, RANK, WORLD_SIZE, RankFailure, data_parallel_problem
from sweeps.grid import SweepError

#: After one rank ended with a failure, the others get this long to record it and end on their
#: own (a dead peer is noticed at once; a hung one after rank_timeout_s, by the ranks that wait
#: on it); then what is left is killed.
KILL_GRACE_S = 15.0
#: A rank other than 0 that took part in an interrupt by SLURM's SIGUSR2 waits this long for
#: rank 0 to requeue the job (SLURM then ends every task), rather than exit and have srun kill
#: rank 0 before it could.
REQUEUE_WAIT_S = 120.0


@dataclass(frozen=True)
class RankSpec:
    """How many ranks train each run of a job, and how long a collective waits for them."""
    processes: int = 1
    timeout_s: float = 300.0
    spawn: bool = True   # start the ranks here (local launchers); false: SLURM started them


def rank_spec(launcher: dict) -> RankSpec:
    """The ranks the launcher settings ask for (checked by check_launch)."""
    timeout = float(launcher.get("rank_timeout_s") or RankSpec.timeout_s)
    if launcher.get("name") == "slurm":
        return RankSpec(int(launcher.get("tasks_per_node") or 1) * int(launcher.get("nodes") or 1), timeout, False)
    return RankSpec(int(launcher.get("processes") or 1), timeout, True)


def slurm_parameters(launcher: dict) -> dict:
    """submitit executor parameters for a job of several tasks (none for one task)."""
    spec = rank_spec(launcher)
    if spec.processes == 1:
        return {}
    # a task that fails ends the job step: the ranks it leaves behind may be hung in a collective
    return {"tasks_per_node": int(launcher.get("tasks_per_node") or 1), "nodes": int(launcher.get("nodes") or 1),
            "slurm_srun_args": ["--kill-on-bad-exit=1"]}


# ------------------------------------------------------------------------------------------
# checked before anything is written or queued

def _positive_int(launcher: dict, key: str) -> int:
    value = launcher.get(key, 1)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SweepError(f"launcher.{key}={value!r} must be an integer >= 1")
    return value


def check_launch(launcher: dict, runs, packing: dict | None = None, run=subprocess.run) -> None:
    """The rank settings against the launcher, every run and (SLURM) the cluster; raises
    SweepError naming the field."""
    processes, tasks, nodes = (_positive_int(launcher, key) for key in ("processes", "tasks_per_node", "nodes"))
    timeout = launcher.get("rank_timeout_s", RankSpec.timeout_s)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
        raise SweepError(f"launcher.rank_timeout_s={timeout!r} must be a number of seconds > 0")
    slurm = launcher.get("name") == "slurm"
    if slurm and processes > 1:
        raise SweepError(f"launcher.processes={processes} is for the local launchers; on SLURM set "
                         f"launcher.tasks_per_node={processes} (and launcher.nodes) instead")
    if not slurm and (tasks > 1 or nodes > 1):
        raise SweepError(f"launcher.tasks_per_node={tasks} and launcher.nodes={nodes} are SLURM settings; with "
                         f"launcher={launcher.get('name')} set launcher.processes instead")
    field = "launcher.tasks_per_node x launcher.nodes" if slurm and nodes > 1 else \
        "launcher.tasks_per_node" if slurm else "launcher.processes"
    size = rank_spec(launcher).processes
    if size == 1:
        return
    if (packing or {}).get("enabled") is True:
        raise SweepError(f"packing.enabled=true with {field}={size}: a run on several ranks trains alone; "
                         "set packing.enabled=auto or false")
    for config in {run_.run_id: run_.settings for run_ in runs}.values():
        problem = data_parallel_problem(config, size, field)
        if problem is not None:
            raise SweepError(f"run (batch_size={config.batch_size}, lr={config.optimizer.lr:g}): {problem}")
    if slurm:
        check_cluster_tasks(launcher, run)


def check_cluster_tasks(launcher: dict, run=subprocess.run) -> None:
    """launcher.nodes nodes of the partition, each with CPUs for tasks_per_node x cpus_per_task,
    against what `sinfo` reports (no check when it does not answer)."""
    from sweeps.cluster import SINFO_FORMAT, parse_sinfo

    try:
        out = run(["sinfo", "-h", "-N", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return
    nodes = parse_sinfo(out.stdout) if out.returncode == 0 else []
    if not nodes:
        return
    wanted = launcher.get("partition")
    partitions = set(wanted.split(",")) if wanted else {n.partition for n in nodes if n.default}
    mine = {n.name: n for n in nodes if n.partition in partitions}
    if not mine:
        return  # cluster.check_cluster names a missing partition
    tasks, count, cpus = launcher.get("tasks_per_node", 1), launcher.get("nodes", 1), launcher.get("cpus_per_task", 1)
    label = f"partition {','.join(sorted(partitions))!r}"
    if count > len(mine):
        raise SweepError(f"launcher.nodes={count}: {label} has {len(mine)} node(s); the job would never start")
    fit = [n for n in mine.values() if n.cpus >= tasks * cpus]
    if len(fit) < count:
        most = max(n.cpus for n in mine.values())
        raise SweepError(f"launcher.tasks_per_node={tasks} with launcher.cpus_per_task={cpus} needs {tasks * cpus} "
                         f"CPUs on each of launcher.nodes={count} node(s); {label} has {len(fit)} such node(s) "
                         f"(at most {most} CPUs per node); the job would never start")


# ------------------------------------------------------------------------------------------
# ranks on this machine

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: prctl(2) option: the signal the kernel sends this process when the thread that started it ends.
PR_SET_PDEATHSIG = 1


def die_with(parent: int) -> None:
    """SIGKILL this process as soon as `parent` (the pid that started it) ends, however it ends.

    An orphaned rank is otherwise left behind: a healthy one trains on with nobody to collect its
    result, and one whose peer is gone waits in a collective, where its Python SIGTERM handler
    (critbatch.train.Interrupt) cannot run, for rank_timeout_s. Linux: the kernel sends the
    signal (prctl PR_SET_PDEATHSIG; it fires when the *thread* that started this process ends, so
    spawn_ranks waits for its ranks in the thread that started them); elsewhere a thread polls."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if libc is None or libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="die with parent", daemon=True).start()
    if os.getppid() != parent:  # it ended before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def _rank_main(function, args, kwargs, rank: int, size: int, port: int, queue, parent: int) -> None:
    die_with(parent)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), RANK: str(rank), WORLD_SIZE: str(size),
                       LOCAL_RANK: str(rank), "LOCAL_WORLD_SIZE": str(size)})
    try:
        result = function(*args, **kwargs)
    except BaseException as exc:
        try:
            pickle.dumps(exc)
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        queue.put((rank, False, exc))
        sys.stdout.flush()
        sys.stderr.flush()
        # not SystemExit: the interpreter's teardown destroys a process group whose peer is gone,
        # which can wait on it (NCCL); the failure is reported, nothing is left to clean up
        os._exit(1)
    queue.put((rank, True, result if rank == 0 else None))


def _ended(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def spawn_ranks(function, args: tuple, kwargs: dict, spec: RankSpec):
    """Run function(*args, **kwargs) in spec.processes fresh processes, one rank each, and return
    rank 0's result. SIGTERM, SIGINT and SIGUSR2 are passed on to every rank. When a rank ends
    with a failure, the others get KILL_GRACE_S to end on their own, then are killed; then rank
    0's exception is raised (else the first one's; else a RankFailure naming how the rank ended)."""
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch state
    queue = context.SimpleQueue()
    port = _free_port()
    ranks = [context.Process(target=_rank_main, name=f"rank {rank}",
                             args=(function, args, kwargs, rank, spec.processes, port, queue, os.getpid()))
             for rank in range(spec.processes)]

    def forward(signum, frame):
        for process in ranks:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signum)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in handled} if main_thread else {}
    reports: dict[int, tuple[bool, object]] = {}
    try:
        for process in ranks:
            process.start()
        failed_at = None
        while any(process.exitcode is None for process in ranks) or not queue.empty():
            while not queue.empty():
                rank, ok, value = queue.get()
                reports[rank] = (ok, value)
            if failed_at is None and (any(process.exitcode not in (None, 0) for process in ranks)
                                      or any(not ok for ok, _ in reports.values())):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > KILL_GRACE_S:
                for process in ranks:
                    if process.exitcode is None:
                        process.kill()
            time.sleep(0.05)
        for process in ranks:
            process.join()
    finally:
        for process in ranks:
            if process.exitcode is None and process.pid is not None:
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    ok, value = reports.get(0, (False, None))
    if ok and all(process.exitcode == 0 for process in ranks):
        return value
    errors = [reports[r][1] for r in sorted(reports) if not reports[r][0]]
    if errors:
        raise errors[0]
    ended = "; ".join(f"rank {r} ended with {_ended(p.exitcode)}" for r, p in enumerate(ranks) if p.exitcode)
    raise RankFailure(f"{ended or 'a rank ended without a result'}: the run cannot go on")


def slurm_rank_environment() -> bool:
    """In a SLURM job of several tasks: export what torch.distributed needs (submitit); True
    when this process is one of several ranks."""
    import submitit

    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    submitit.helpers.TorchDistributedEnvironment().export()
    return True

