"""`python -m sweeps.launch [overrides]`: run a batch-size x learning-rate grid, locally or on SLURM.

    python -m sweeps.launch                                  # default sweep, on this machine
    python -m sweeps.launch task=linreg                      # another task (and its own grid)
    python -m sweeps.launch launcher=slurm launcher.wait=false   # submit a job array and return
    python -m sweeps.launch hydra.sweep.dir=SWEEP_DIR        # relaunch: skips complete runs

Every run of the grid is validated (and its data looked for) before anything is written or
queued: the grid (no empty axis, goals that can be met but not before the first step, no
command-line setting that the grid silently overrides), the launcher settings and, on SLURM, the
request against what `sinfo` reports (sweeps/cluster.py). A bad config fails here in seconds with a
message that names the field, and nothing is submitted. A directory holds one sweep: relaunching
into it with settings that change what its runs are (anything but the batch sizes, lrs and seeds)
is refused unless asked for with sweep.allow_new_variant=true. Jobs queued on SLURM are watched
until they start; jobs that can never run are cancelled and the launch fails.

Every setting is typed (sweeps/schema.py). The command line's config is composed once before
Hydra runs (`preflight`), so that a typo gets one line with the right key or option name; Hydra
refuses an unknown key or a wrong type while it composes, and `launch` checks the composed
config again (keys added with `+`), so a bad setting exits with status 2 before anything runs. A
refused launch writes nothing: the sweep directory, its .hydra/ and launch.log are made only once
every check has passed. This launcher sweeps by itself: Hydra's -m/--multirun is refused with
what to do instead. Messages and progress go through `logging` (SWEEP_DIR/launch.log keeps
them); the results go to stdout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import json
import logging
import multiprocessing
import os
import re
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from critbatch import records
from critbatch.config import ConfigError, UnknownSetting
from sweeps import cluster, distributed, schema
from sweeps.grid import SweepError, check_data, check_overrides, expand, group_runs, lr_grid_note
from sweeps.jobs import LOST, RUNNING_ELSEWHERE, JobKilled, Outcome, RunSummary, packs, run_group, run_group_job
from sweeps.lease import read_lease
from sweeps.status import PENDING, STALE, format_status, sweep_status

MANIFEST = records.SWEEP_FILE
LOCK_FILE = ".sweep.lock"
ALLOW_NEW_VARIANT = "sweep.allow_new_variant=true"
# Summaries of runs that this launch saw fail, whatever their record on disk still says.
FAILED_SUMMARIES = (records.FAILED, Outcome.job_failed)
JOBS_FILE = "jobs.json"
LOG_FILE = "launch.log"
LAUNCHERS = ("local", "submitit_local", "slurm")
MULTIRUN_REFUSED = (
    "-m/--multirun is not supported: this launcher sweeps by itself and runs every (batch size, lr, seed) of "
    "the grid in one launch. List the batch sizes in sweep.batch_sizes (e.g. 'sweep.batch_sizes=[16,64,256]') "
    "and the lrs in sweep.lr. To compare tasks, optimizers or other settings, launch once per setting, each "
    "into its own hydra.sweep.dir (e.g. for o in sgd momentum; do python -m sweeps.launch optimizer=$o "
    "hydra.sweep.dir=runs/$o; done), then compare them: python -m analysis.pareto runs/sgd runs/momentum "
    "--out runs/compare. Nothing was run.")

log = logging.getLogger(__name__)
results = logging.getLogger("sweeps.results")  # the launch's outcome: stdout (and launch.log)


def duration(seconds: float) -> str:
    """45s, 12m05s, 3h20m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A one-line progress bar of runs finished out of the total, with the time left at the rate
    of the runs this launch has finished so far, on stderr (safe to update from a thread). Not on
    a terminal (a log file, a batch job's output): one log line each time the count changes."""

    def __init__(self, total: int, done: int = 0):
        self.total, self.done, self.start = total, done, time.time()
        self.first = done  # complete before this launch: they tell nothing about the rate
        self._tty = sys.stderr.isatty()
        self._last = None
        self._lock = threading.Lock()
        self.show()

    def eta(self) -> float | None:
        """Seconds left at the rate of the runs this launch has finished (None before the first)."""
        finished = self.done - self.first
        if finished <= 0:
            return None
        return (time.time() - self.start) / finished * (self.total - self.done)

    def show(self, done: int | None = None, note: str = "") -> None:
        with self._lock:
            if done is not None:
                self.done = max(self.done, min(done, self.total))
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            left = self.eta()
            line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} runs "
                    f"{duration(time.time() - self.start)}"
                    + ("" if left is None or self.done == self.total else f", about {duration(left)} left")
                    + (f"  {note}" if note else ""))
            if self._tty:
                sys.stderr.write("\r" + line.ljust(100))
                sys.stderr.flush()
            elif self.done != self._last:
                log.info(line)
                self._last = self.done

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")


class FinishedRuns:
    """Counts the submitted runs whose record this launch has finished (failed included), plus
    those complete before it and those of jobs that have returned (`settle`). A poll re-reads only
    the records that changed since it last looked."""

    def __init__(self, sweep_dir: Path, submitted, already_complete: int):
        self.paths = {run.name: records.run_dir(sweep_dir, run.config) / records.RECORD_FILE for run in submitted}
        self.done: set[str] = set()
        self.already_complete = already_complete
        self.since = time.time() - 1.0  # a record from an earlier launch (failed, partial) is not news
        self._seen: dict[str, int] = {}  # run -> the record's mtime when last read
        self._lock = threading.Lock()

    def settle(self, runs) -> int:
        """The runs of a job that has returned are done, whatever their record says."""
        with self._lock:
            self.done.update(run.name for run in runs)
            return self.already_complete + len(self.done)

    def count(self) -> int:
        with self._lock:
            for name, path in self.paths.items():
                if name in self.done:
                    continue
                try:
                    stat = path.stat()
                except OSError:
                    continue
                if stat.st_mtime < self.since or self._seen.get(name) == stat.st_mtime_ns:
                    continue
                try:
                    if records.read_record(path)["status"] in records.FINISHED_STATUSES:
                        self.done.add(name)
                    self._seen[name] = stat.st_mtime_ns
                except records.RecordError:
                    pass  # being replaced right now, or torn: look again at the next poll
            return self.already_complete + len(self.done)


@contextlib.contextmanager
def following(progress: Progress, finished: FinishedRuns, note: str = "", every: float = 1.0):
    """Moves the progress bar from a thread, run by run, while the caller waits on its jobs."""
    stop = threading.Event()

    def poll():
        while not stop.wait(every):
            progress.show(finished.count(), note=note)

    thread = threading.Thread(target=poll, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path):
    """One launch at a time reads and rewrites the directory's sweep.json and jobs.json (an
    flock, released if the launch dies; where the file system has none, no lock)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(sweep_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield
        return
    try:
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_manifest(sweep_dir: Path) -> dict | None:
    try:
        manifest = json.loads((sweep_dir / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SweepError(f"{sweep_dir / MANIFEST} is unreadable ({exc}); launch into a new hydra.sweep.dir, "
                         "or remove it if you know the directory holds one sweep") from exc
    return manifest if isinstance(manifest, dict) else None


def _manifest_variant(manifest: dict) -> tuple[str | None, dict]:
    """The variant a manifest names; for one written before variants were stored, from its config."""
    if isinstance(manifest.get("variant"), str):
        return manifest["variant"], manifest.get("variant_settings") or {}
    try:
        config = expand(manifest["config"])[0].config
    except Exception:  # an old or odd manifest: nothing to compare with
        return None, {}
    return records.sweep_variant(config), records.variant_settings(config)


def check_variant(sweep_dir: Path, manifest: dict | None, runs, allow: bool) -> None:
    """Refuse (before anything is written) a launch whose runs are another sweep than the one the
    directory holds: a run identity that differs in more than batch size, lr and seed."""
    if manifest is None or not runs:
        return
    old, old_settings = _manifest_variant(manifest)
    new, new_settings = records.sweep_variant(runs[0].config), records.variant_settings(runs[0].config)
    if old is None or old == new:
        return
    if allow:
        log.warning(f"note: {sweep_dir} held sweep variant {old}; it now holds {new} ({ALLOW_NEW_VARIANT}). "
                    "The earlier runs stay on disk but are no longer counted by sweeps.status or the analysis.")
        return
    missing = object()
    changed = [f"  {key}: {old_settings.get(key, missing)!r} -> {new_settings.get(key, missing)!r}".replace(
        repr(missing), "(not set)") for key in sorted(set(old_settings) | set(new_settings))
        if old_settings.get(key, missing) != new_settings.get(key, missing)]
    raise SweepError(
        f"hydra.sweep.dir={sweep_dir} holds another sweep (variant {old}); these settings differ from it "
        f"(in the directory -> now):\n" + ("\n".join(changed) or "  (settings not recorded)") + "\n"
        "Only sweep.batch_sizes, the lr grid (sweep.lr) and sweep.seeds may change between launches into one "
        "directory; other settings change what every run is, and mixing the two would count a (batch size, "
        f"lr, seed) twice. To keep both: launch into a new directory (hydra.sweep.dir=...), or add "
        f"{ALLOW_NEW_VARIANT} to make this the directory's sweep (the earlier runs stay on disk, no longer counted).")


def write_manifest(sweep_dir: Path, runs, cfg: dict, previous: dict | None = None) -> None:
    """The planned runs, so `sweeps.status` can tell pending from done, and the sweep's variant
    (what its runs share), so a relaunch with other settings can be refused."""
    manifest = {"created": datetime.now().isoformat(timespec="seconds"), "config": cfg,
                "runs": [{"name": r.name, "run_id": r.run_id, "batch_size": r.config["batch_size"],
                          "lr": r.config["optimizer"]["lr"], "seed": r.config["seed"]} for r in runs]}
    if runs:
        manifest["variant"] = records.sweep_variant(runs[0].config)
        manifest["variant_settings"] = records.variant_settings(runs[0].config)
    if previous is not None:
        earlier = list(previous.get("earlier_variants") or [])
        old, _ = _manifest_variant(previous)
        if old is not None and old != manifest.get("variant"):
            earlier.append({"variant": old, "until": manifest["created"]})
        if earlier:
            manifest["earlier_variants"] = earlier
    records.write_record(sweep_dir / MANIFEST, manifest)


def add_jobs_entry(sweep_dir: Path, entry: dict) -> None:
    with sweep_lock(sweep_dir):  # concurrent launches: no entry lost
        jobs_path = sweep_dir / JOBS_FILE
        history = json.loads(jobs_path.read_text()) if jobs_path.exists() else []
        records.write_record(jobs_path, [e for e in history if e.get("folder") != entry.get("folder")] + [entry])


def make_executor(sweep_dir: Path, launcher: dict):
    """A submitit executor for the launcher settings (checked and complete: schema.check)."""
    import submitit

    folder = sweep_dir / ".submitit" / datetime.now().strftime("%Y%m%d-%H%M%S-%f") / "%j"
    if launcher["name"] == "submitit_local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(timeout_min=launcher["timeout_min"], cpus_per_task=launcher["cpus_per_task"])
        return executor
    # max_requeues: how often a job that reaches its time limit is checkpointed and requeued
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=launcher["max_requeues"])
    params = {"timeout_min": launcher["timeout_min"], "cpus_per_task": launcher["cpus_per_task"],
              "mem_gb": launcher["mem_gb"], "slurm_array_parallelism": launcher["array_parallelism"],
              "name": launcher["job_name"],
              # SIGUSR2 this long before the time limit: the run checkpoints and the job requeues
              "slurm_signal_delay_s": launcher["signal_delay_s"]}
    if launcher.get("gpus_per_node"):
        params["gpus_per_node"] = launcher["gpus_per_node"]
    for key in ("partition", "account", "qos", "constraint"):
        if launcher.get(key):
            params[f"slurm_{key}"] = launcher[key]
    if launcher.get("setup"):
        params["slurm_setup"] = list(launcher["setup"])
    if launcher.get("additional_parameters"):
        params["slurm_additional_parameters"] = dict(launcher["additional_parameters"])
    params.update(distributed.slurm_parameters(launcher))
    executor.update_parameters(**params)
    return executor


def local_workers(launcher: dict, groups) -> int:
    """How many jobs the local launcher runs at once: launcher.workers, 0 meaning one per CPU core,
    never more than there are jobs."""
    workers = launcher.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise SweepError(f"launcher.workers={workers!r} must be an integer >= 0 (0: one per CPU core)")
    return max(1, min(workers or len(os.sched_getaffinity(0)), len(groups)))


def launch_local(sweep_dir: Path, groups, launcher: dict, packing: dict, progress: Progress) -> list[RunSummary]:
    """Every job on this machine: in this process one after another, or in `workers` processes of
    their own at once (jobs.run_group either way; SIGTERM and SIGINT reach the workers, which
    checkpoint their runs). The progress bar moves as each run's record is finished."""
    workers = local_workers(launcher, groups)
    finished = FinishedRuns(sweep_dir, [run for group in groups for run in group], progress.done)
    summaries = []
    if workers == 1:
        for group in groups:
            note = f"B={group[0].config['batch_size']}"
            progress.show(note=note)
            with following(progress, finished, note, every=launcher.get("progress_seconds", 1.0)):
                summaries += run_group(str(sweep_dir), [run.settings for run in group], threads=launcher.get("threads"),
                                       packing=packing, ranks=distributed.rank_spec(launcher))
            progress.show(finished.settle(group))
        return summaries
    threads = launcher.get("threads") or 1
    note = f"{workers} workers"
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
    # the workers (and their ranks) die with the launch: killed outright, it cannot stop them
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=distributed.die_with,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(run_group, str(sweep_dir), [run.settings for run in group], threads, packing,
                               distributed.rank_spec(launcher)): group
                   for group in groups}

        def forward(signum, frame):  # the workers stop at a step boundary with their state saved
            for process in list(pool._processes.values()):
                os.kill(process.pid, signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM,)}
        interrupted = False
        try:
            progress.show(note=note)
            running = set(futures)
            while running:
                try:
                    done, running = wait(running, timeout=launcher.get("progress_seconds", 1.0), return_when=FIRST_COMPLETED)
                except KeyboardInterrupt:  # Ctrl-C: the workers checkpoint at their next step boundary
                    interrupted = True
                    forward(signal.SIGINT, None)  # (a SIGINT sent to this process alone reaches them too)
                    continue
                for future in done:
                    group = futures[future]
                    try:
                        summaries += future.result()
                    except JobKilled:
                        interrupted = True
                    except Exception as exc:  # a worker that died: its runs are failed or partial on disk
                        summaries += [RunSummary(run=run.name, status=Outcome.job_failed.value,
                                                 error=f"{type(exc).__name__}: {exc}") for run in group]
                    finished.settle(group)
                progress.show(finished.count(), note=note)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if interrupted:
        raise LaunchInterrupted("SIGINT")
    return summaries


class LaunchInterrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped a local launch; its runs are checkpointed."""


class CannotRun(Exception):
    """Queued jobs that can never run as submitted; they were cancelled."""


def launch_submitit(sweep_dir: Path, groups, launcher: dict, packing: dict, progress: Progress) -> list[RunSummary]:
    executor = make_executor(sweep_dir, launcher)
    configs = [[run.settings for run in group] for group in groups]
    try:
        jobs = executor.map_array(run_group_job, [str(sweep_dir)] * len(configs), configs,
                                  [launcher.get("threads")] * len(configs), [packing] * len(configs),
                                  [distributed.rank_spec(launcher)] * len(configs))
    except Exception as exc:  # sbatch refused: nothing is queued
        raise SweepError(f"the jobs could not be submitted ({launcher['name']}): {exc}".strip()) from exc
    entry = {"submitted": datetime.now().isoformat(timespec="seconds"), "launcher": launcher["name"],
             "job_ids": [job.job_id for job in jobs], "folder": str(executor.folder),
             "groups": [[run.name for run in group] for group in groups]}
    add_jobs_entry(sweep_dir, entry)
    first = jobs[0].job_id.split("_")[0] if jobs else "?"
    log.info(f"submitted {len(jobs)} job(s) ({launcher['name']}, array {first}) for {sum(map(len, groups))} runs")
    if launcher["name"] == "slurm" and jobs:
        watch = cluster.watch_start([job.job_id for job in jobs])
        if watch.never:
            cluster.cancel([job.job_id for job in jobs])
            entry["cancelled"] = watch.describe()
            add_jobs_entry(sweep_dir, entry)
            raise CannotRun(f"{watch.describe()}; cancelled job array {first}. Change the request (launcher.* "
                            "settings) and relaunch into the same hydra.sweep.dir.")
        log.info(f"jobs: {watch.describe()}")
    if not launcher["wait"]:
        return []
    summaries, finished = [], FinishedRuns(sweep_dir, [run for group in groups for run in group], progress.done)
    while not all(job.done() for job in jobs):
        progress.show(finished.count(), note=f"{sum(not j.done() for j in jobs)} job(s) left")
        time.sleep(2)
    for group in groups:
        finished.settle(group)
    progress.show(finished.count())
    for job, group in zip(jobs, groups):
        try:
            summaries += job.results()[0]  # a job of several SLURM tasks: rank 0's
        except Exception as exc:  # a killed or crashed job: its runs are failed or partial on disk
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            summaries += [RunSummary(run=run.name, status=Outcome.job_failed.value, error=f"job {job.job_id}: {reason}")
                          for run in group]
    return summaries


def check_local_device(runs, launcher: dict) -> None:
    """Local launchers train on this machine: a CUDA request it cannot meet fails now, once,
    rather than in every run. (A cluster's nodes are not this machine; their runs check there.)"""
    import torch

    if launcher["name"] == "slurm" or torch.cuda.is_available():
        return
    if any(run.config["device"] == "cuda" for run in runs):
        raise SweepError("device=cuda, but this machine has no CUDA device and launcher="
                         f"{launcher['name']} trains here; use device=auto or device=cpu")
    if any(run.config["cuda_graphs"] is True for run in runs):
        raise SweepError("cuda_graphs=true, but this machine has no CUDA device and launcher="
                         f"{launcher['name']} trains here; use cuda_graphs=auto")


def allow_new_variant(cfg: dict) -> bool:
    allow = (cfg.get("sweep") or {}).get("allow_new_variant", False)
    if not isinstance(allow, bool):
        raise SweepError(f"sweep.allow_new_variant={allow!r} must be true or false")
    return allow


def final_status(sweep_dir: Path, summaries: list[RunSummary]) -> dict:
    """sweeps.status of the directory, where a run this launch saw fail counts as failed even if
    its record could not say so (a full disk leaves the last record it could write: running)."""
    status = sweep_status(sweep_dir)
    for summary in summaries:
        # (running means a live owner: this launch has let go of its runs, so another launch took it over)
        if summary["status"] in FAILED_SUMMARIES and status["runs"].get(summary["run"]) in (STALE, PENDING):
            status["runs"][summary["run"]] = records.FAILED
    status["counts"] = type(status["counts"])(status["runs"].values())
    return status


def check_modules(cfg: dict) -> None:
    """A task or optimizer of the user's own (task.module, optimizer.module) must import here and
    in every job: say how to make it so, before anything is written."""
    for section in ("task", "optimizer"):
        module = (cfg.get(section) or {}).get("module")
        if not module:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
                raise SweepError(f"{section}.module={module!r} cannot be imported: {exc}") from exc
            top = module.split(".")[0]
            raise SweepError(
                f"{section}.module={module!r} cannot be imported ({exc}): Python finds no {top!r} here. Run the "
                f"launch from the folder that holds {top}/, or add that folder to PYTHONPATH (PYTHONPATH=/abs/path "
                f"python -m sweeps.launch ...; jobs inherit it), or pip install your package into "
                f"{sys.prefix}") from exc
        except Exception as exc:  # the module itself fails: its own error, named
            raise SweepError(f"{section}.module={module!r} cannot be imported: {type(exc).__name__}: {exc}") from exc


@dataclasses.dataclass
class Trained:
    """What train_pending did: the jobs' run summaries, the runs another launch or job owned, and
    whether the launch is over already (exit_code: 1 the jobs could never run, 130 interrupted)
    or left its jobs queued (detached)."""
    summaries: list[RunSummary]
    elsewhere: list
    exit_code: int | None = None
    detached: bool = False


def train_pending(sweep_dir: Path, runs, launcher: dict, packing: dict | None, resume: str, what: str) -> Trained:
    """Train (local) or queue (submitit launchers) those of `runs` whose records are not complete
    and that no live launch or job owns. Ctrl-C stops a local launch at a step boundary with its
    runs' states saved: one line says how many and the command that resumes them (`resume`)."""
    pending = [run for run in runs
               if not records.is_complete(records.run_dir(sweep_dir, run.config) / records.RECORD_FILE)]
    elsewhere = [run for run in pending if (lease := read_lease(records.run_dir(sweep_dir, run.config)))
                 is not None and lease.live]
    todo = [run for run in pending if run not in elsewhere]
    log.info(f"{what} {sweep_dir}: {len(runs)} runs, {len(runs) - len(pending)} already complete, "
             + (f"{len(elsewhere)} running elsewhere (another launch or job owns them), " if elsewhere else "")
             + f"{len(todo)} to run")
    if not todo:
        return Trained([], elsewhere)
    groups = group_runs(todo, launcher["group_by"])
    progress = Progress(len(runs), len(runs) - len(pending))
    try:
        if launcher["name"] == "local":
            summaries = launch_local(sweep_dir, groups, launcher, packing, progress)
        else:
            summaries = launch_submitit(sweep_dir, groups, launcher, packing, progress)
    except CannotRun as exc:
        progress.close()
        log.error(f"error: {exc}")
        return Trained([], elsewhere, exit_code=1)
    except (KeyboardInterrupt, JobKilled, LaunchInterrupted):
        progress.close()
        if launcher["name"] == "local":
            stopped = sweep_status(sweep_dir)["counts"][records.INTERRUPTED]
            log.error(f"interrupted: {stopped} run(s) stopped with their state saved; resume with: {resume}")
        else:
            log.error(f"stopped waiting: the jobs go on. Follow them: {command('sweeps.status', sweep_dir)}")
        return Trained([], elsewhere, exit_code=130)
    progress.close()
    return Trained(summaries, elsewhere, detached=launcher["name"] != "local" and not launcher["wait"])


def check_launcher(cfg: dict) -> None:
    """The launcher's own settings, and the modules of a task or optimizer of the user's own."""
    launcher = cfg["launcher"]
    if launcher.get("name") not in LAUNCHERS:
        raise SweepError(f"launcher.name={launcher.get('name')!r}; choose one of {LAUNCHERS}")
    cluster.check_settings(launcher)
    check_modules(cfg)


def check_placement(cfg: dict, runs) -> None:
    """Where `runs` will train, before any work: the grouping and packing settings, this machine's
    device for a local launcher, the request against the cluster on SLURM (notes only)."""
    launcher = cfg["launcher"]
    group_runs(runs, launcher["group_by"])
    packs([], cfg.get("packing"))
    check_local_device(runs, launcher)
    distributed.check_launch(launcher, runs, cfg.get("packing"))  # ranks per run: launcher, runs, sinfo
    if launcher["name"] == "slurm":
        notes = cluster.check_cluster(launcher)
        if notes is None:
            log.warning("note: sinfo did not answer: the partition, CPUs and memory were not checked against "
                        "the cluster")
        for note in notes or []:
            log.warning(f"note: {note}")


def launch(cfg: dict, sweep_dir: Path, overrides: list[str] | tuple = (), on_accepted=None) -> int:
    """Check everything, write the plan, run or queue what is not complete. `overrides`: the
    command line's Hydra overrides (settings the grid would silently override are refused).
    Nothing is written before every check has passed; then `on_accepted()` is called (the
    command line's: SWEEP_DIR/.hydra and launch.log), with the directory made."""
    try:
        cfg = schema.check(cfg)  # every key and type; defaults filled in
    except UnknownSetting:
        check_overrides(cfg, overrides)  # +batch_size=64 and the like: name the key to use instead
        raise
    launcher = cfg["launcher"]
    check_launcher(cfg)
    runs = expand(cfg)
    check_overrides(cfg, overrides)
    allow = allow_new_variant(cfg)
    check_data(runs)
    check_placement(cfg, runs)
    check_variant(sweep_dir, read_manifest(sweep_dir), runs, allow)  # refused here, the directory is untouched
    grid_note = lr_grid_note((cfg.get("sweep") or {}).get("lr") or {}, cfg["optimizer"])
    if grid_note is not None:
        getattr(log, grid_note[0])(grid_note[1])
    try:
        with sweep_lock(sweep_dir):
            previous = read_manifest(sweep_dir)
            check_variant(sweep_dir, previous, runs, allow)  # again: another launch may have written it since
            if on_accepted is not None:
                on_accepted()
            write_manifest(sweep_dir, runs, cfg, previous)
    except OSError as exc:  # e.g. the disk is full
        raise SweepError(f"cannot write {sweep_dir / MANIFEST}: {exc}") from exc
    rerun = relaunch_command(overrides, sweep_dir)
    trained = train_pending(sweep_dir, runs, launcher, cfg.get("packing"), rerun, "sweep")
    return report(sweep_dir, trained, command("analysis.pareto", sweep_dir), rerun)


def report(sweep_dir: Path, trained: Trained, analysis: str, rerun: str) -> int:
    """What a launch says once train_pending is done, and its exit status: the failed runs, the
    sweep's status, what to run next (`analysis`, and `rerun` to retry what failed), or how to
    follow jobs left queued."""
    if trained.exit_code is not None:
        return trained.exit_code
    if trained.detached:
        results.info(f"\nDetached. Check on it:   {command('sweeps.status', sweep_dir)}\n"
                     f"Collect when done:      {analysis}\n"
                     f"Rerun what failed:      {rerun}")
        return 0
    summaries = trained.summaries
    failed = [s for s in summaries if s["status"] in FAILED_SUMMARIES]
    for s in failed:
        log.error(f"FAILED {s['run']}: {s.get('error', '')}")
    owned = [s for s in summaries if s["status"] in (RUNNING_ELSEWHERE, LOST)]
    results.info(format_status(final_status(sweep_dir, summaries)))
    results.info(f"\nrecords: {sweep_dir / records.RUNS_DIR}\nnext:    {analysis}")
    if trained.elsewhere or owned:
        log.warning(f"{len(trained.elsewhere) + len(owned)} run(s) running elsewhere (owned by another launch or job): "
                    f"{command('sweeps.status', sweep_dir)} follows them")
    if failed:
        log.error(f"{len(failed)} run(s) failed; rerun them: {rerun}")
        return 1
    return 0


def command(module: str, *args) -> str:
    """A command line that runs `python -m module args` with this interpreter (the venv's)."""
    return shlex.join([sys.executable, "-m", module, *map(str, args)])


def relaunch_command(overrides, sweep_dir: Path, module: str = "sweeps.launch") -> str:
    """This launch (`python -m module`) again, with its own overrides, into the same directory."""
    kept = [o for o in overrides or () if not o.lstrip("+").startswith("hydra.sweep.dir=")]
    return command(module, *kept, f"hydra.sweep.dir={sweep_dir}")


# ---------------------------------------------------------------------------------------------
# the command line: Hydra composes, `launch` checks and runs


class HeldLogs(logging.Handler):
    """Keeps what the launch says before its checks have passed: written to SWEEP_DIR/launch.log
    once they have, dropped with a refused launch (which writes nothing)."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(record)


def save_hydra_files(sweep_dir: Path, cfg: DictConfig) -> None:
    """What Hydra would have written to SWEEP_DIR/.hydra (hydra.output_subdir is null so that a
    refused launch writes nothing): the composed config, Hydra's and the overrides."""
    hydra_cfg = HydraConfig.instance().cfg
    folder = sweep_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "hydra.yaml").write_text(OmegaConf.to_yaml(hydra_cfg))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))


def run_composed(cfg: DictConfig, launch_fn, multirun_refused: str) -> None:
    """Inside @hydra.main: `launch_fn(cfg, sweep_dir, overrides, on_accepted)` on the composed
    config, then exit with its status (2 where a setting is refused). What it logs before its
    checks pass is held, and written to SWEEP_DIR/launch.log with SWEEP_DIR/.hydra/ only once
    they have (on_accepted), so a refused launch writes nothing."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # e.g. hydra.mode=MULTIRUN in a preset
        log.error(f"error: {multirun_refused}")
        sys.exit(2)
    sweep_dir = Path(os.path.abspath(hydra_cfg.sweep.dir))
    # the command line as typed, for the commands printed to run next: hydra.searchpath and the
    # like too, not where this run's directory went (hydra.sweep.dir is given anew)
    overrides = [o for o in hydra_cfg.overrides.hydra
                 if o.partition("=")[0].lstrip("+") not in ("hydra.mode", "hydra.run.dir", "hydra.sweep.dir")]
    overrides += list(hydra_cfg.overrides.task)
    loggers = [logging.getLogger(), results]
    held = HeldLogs()
    for logger in loggers:
        logger.addHandler(held)

    def accepted():
        save_hydra_files(sweep_dir, cfg)
        to_file = logging.FileHandler(sweep_dir / LOG_FILE)
        to_file.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
        for logger in loggers:
            logger.removeHandler(held)
            logger.addHandler(to_file)
        for record in held.held:
            to_file.handle(record)

    try:
        code = launch_fn(schema.to_plain(cfg), sweep_dir, overrides, on_accepted=accepted)
    except ConfigError as exc:  # bad settings or missing data (SweepError is one too)
        log.error(f"error: {exc}\nnothing was submitted.")
        sys.exit(2)
    finally:
        for logger in loggers:
            logger.removeHandler(held)
    sys.exit(code)


# Hydra flags that do not launch anything: Hydra answers them itself.
NOT_A_LAUNCH = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun", "config_path",
                "config_name", "config_dir")


def compose_command_line(overrides: list[str]) -> DictConfig:
    """The config (with Hydra's own node) that `python -m sweeps.launch OVERRIDES` composes."""
    from hydra import compose, initialize_config_dir

    import warnings

    schema.register()
    with warnings.catch_warnings():  # (Hydra warns again, or the error says it in its own words)
        warnings.simplefilter("ignore")
        with initialize_config_dir(config_dir=schema.config_dir(), version_base="1.3", job_name="launch"):
            return compose("config", overrides=list(overrides), return_hydra_config=True)


def preflight(argv: list[str]) -> None:
    """Compose the command line's config as Hydra will, before Hydra creates anything: a typo, an
    unknown option of a config group or a refused setting raises ConfigError with one line that
    names the fix."""
    from hydra._internal.utils import get_args_parser

    if "--version" in argv:
        return
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return  # Hydra says what is wrong with its own flags
    if any(getattr(args, flag, None) for flag in NOT_A_LAUNCH):
        return
    overrides = list(args.overrides)
    for override in overrides:
        if override.partition("=")[0].lstrip("+~") == "hydra.run.dir":
            raise ConfigError(f"{override}: hydra.run.dir is not where a sweep goes; the records go to "
                              f"hydra.sweep.dir: use hydra.sweep.dir={override.partition('=')[2]}")
    try:
        composed = compose_command_line(overrides)
    except Exception as exc:  # Hydra's and OmegaConf's errors: say what to type instead
        raise ConfigError(explain_composition_error(exc, overrides)) from None
    if composed.hydra.mode == RunMode.MULTIRUN:
        raise ConfigError(MULTIRUN_REFUSED)


def _chain(exc: BaseException) -> list[BaseException]:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _near(word: str, options) -> str | None:
    found = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return found[0] if found else None


def explain_composition_error(exc: BaseException, overrides: list[str]) -> str:
    """Hydra's composition error as one line that says what to type: the near-miss of an unknown
    key or group option, the type a key takes, where a config of your own must be."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    chain = _chain(exc)
    missing = next((e for e in chain if isinstance(e, MissingConfigException)), None)
    if missing is not None and missing.missing_cfg_file and "/" in missing.missing_cfg_file:
        return _unknown_option(missing, overrides)
    unparsed = next((e for e in chain if isinstance(e, OverrideParseException)), None)
    if unparsed is not None:
        return (f"cannot read the override {unparsed.override!r}: each argument is KEY=VALUE or GROUP=OPTION "
                "(quote a value that holds a space or brackets, e.g. 'sweep.batch_sizes=[16,64]')")
    keyed = next((e for e in chain if getattr(e, "full_key", None)), None)
    if isinstance(keyed, (ConfigAttributeError, ConfigKeyError)):
        return _unknown_key(str(keyed.full_key), overrides)
    if isinstance(keyed, ValidationError):
        wanted = _schema_hint(str(keyed.full_key))
        given = next((o.partition("=")[2] for o in reversed(overrides) if _override_key(o) == keyed.full_key),
                     None)  # the last one: Hydra applies them in order
        if wanted is not None and given is not None:
            return f"{keyed.full_key}={given} must be {wanted}"
    return schema.composition_error(exc)


def _schema_hint(key: str) -> str | None:
    """What the schema's `key` takes, in words (None where the schema does not say)."""
    import dataclasses

    from critbatch.typecheck import describe, field_hints

    hint = schema.LaunchConfig
    for part in key.split("."):
        section = hint if dataclasses.is_dataclass(hint) else next(
            (a for a in getattr(hint, "__args__", ()) if dataclasses.is_dataclass(a)), None)
        if section is None or part not in field_hints(section):
            return None
        hint = field_hints(section)[part]
    return describe(hint)


def _unknown_option(missing, overrides: list[str]) -> str:
    """GROUP=OPTION where the group has no such option: the near-miss, the options, and where an
    option of your own must be for Hydra to find it."""
    group, _, option = missing.missing_cfg_file.rpartition("/")
    options = list(missing.options or schema.options(group))
    where = re.match(r"In '([^']+)'", str(missing))
    near = _near(option, options)
    said = (f"{group}={option}" if where is None or where.group(1) == "config"
            else f"{where.group(1)}.yaml's defaults name {group}/{option}, but")
    message = f"{said} does not exist" if said.startswith(group) else f"{said} there is no such {group}"
    if near is not None:
        return message + f" (did you mean {group}={near}?); the {group} options: {', '.join(options)}"
    message += f"; the {group} options: {', '.join(options)}"
    searchpath = next((o.partition("=")[2] for o in overrides if _override_key(o) == "hydra.searchpath"), None)
    folders = [Path(f) for f in re.findall(r"file://([^,\]\s'\"]+)", searchpath or "")]
    for folder in folders:
        if (folder / f"{option}.yaml").is_file():
            return (message + f". hydra.searchpath names {folder}, which holds {option}.yaml itself: name the folder "
                    f"that holds {group}/ instead: 'hydra.searchpath=[file://{folder.parent}]'")
        if not folder.is_dir():
            return message + f". hydra.searchpath names {folder}, which is not a folder here"
    if folders:
        return message + f". None of the folders on hydra.searchpath holds {group}/{option}.yaml"
    return (message + f". If {option} is your own, put it in {group}/{option}.yaml under a folder of yours and "
            f"add that folder to Hydra's search path: 'hydra.searchpath=[file:///abs/path/myconf]' "
            f"(myconf/{group}/{option}.yaml)")


def _unknown_key(key: str, overrides: list[str]) -> str:
    """KEY=VALUE where the schema has no KEY: the near-miss among the keys beside it (a task's
    options included: those its yaml does not list take a leading +)."""
    parent, _, leaf = key.rpartition(".")
    rest = [o for o in overrides if not (_override_key(o) == key or _override_key(o).startswith(key + "."))]
    known: list[str] = []
    with contextlib.suppress(Exception):
        node = compose_command_line(rest)
        node = OmegaConf.select(node, parent) if parent else node
        known = [str(k) for k in node.keys() if parent or k != "hydra"] if isinstance(node, DictConfig) else []
        if parent == "task" and node.get("name") is not None:
            from critbatch.tasks import TASKS, task_options

            if node.get("module"):
                importlib.import_module(str(node.module))  # a task of the user's own registers itself
            if node.name in TASKS:
                options = ["module", *task_options(str(node.name))]
                if leaf in options:
                    given = next((o.partition("=")[2] for o in reversed(overrides) if _override_key(o) == key),
                                 "VALUE")
                    return (f"{key} is an option of task {node.name!r} that its yaml does not set: add it "
                            f"with a leading +: '+{key}={given}'")
                known += [o for o in options if o not in known]
    prefix = f"{parent}." if parent else ""
    near = _near(leaf, known)
    message = f"{key} is not a setting" + (f" (did you mean {prefix}{near}?)" if near else "")
    if known:
        message += f"; the settings {'under ' + parent if parent else 'at the top'}: {', '.join(known)}"
    return message + (". Every key with its type: python -m sweeps.launch --cfg job" if not near else "")


def command_line(config_name: str, launch_fn, multirun_refused: str, check_first=None):
    """The main() of a launch command (sweeps.launch, sweeps.branch): `check_first(argv)` (e.g.
    preflight), then Hydra composes `config_name` and run_composed calls `launch_fn` on it. Exit
    status: 0 done, 1 some runs failed or could never run, 2 a setting was refused (nothing ran,
    nothing was written)."""
    started = False  # whether Hydra got as far as calling the task (it exits 1 on a config it refuses)

    def task(cfg: DictConfig) -> None:
        nonlocal started
        started = True
        run_composed(cfg, launch_fn, multirun_refused)

    hydra_main = hydra.main(config_path=schema.config_dir(), config_name=config_name, version_base="1.3")(task)

    def main() -> None:
        if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
            print(f"error: {multirun_refused}", file=sys.stderr)
            sys.exit(2)
        try:
            if check_first is not None:
                check_first(sys.argv[1:])
        except ConfigError as exc:
            print(f"error: {exc}\nnothing was submitted.", file=sys.stderr)
            sys.exit(2)
        try:
            hydra_main()
        except SystemExit as exc:
            if exc.code == 1 and not started:  # Hydra refused the config (it printed why)
                print("nothing was submitted.", file=sys.stderr)
                sys.exit(2)
            raise

    return main


#: `python -m sweeps.launch`: Hydra composes and checks the config, then `launch` runs it.
main = command_line("config", launch, MULTIRUN_REFUSED, check_first=preflight)

schema.register()

if __name__ == "__main__":
    main()
