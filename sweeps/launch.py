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

Every setting is typed (sweeps/schema.py): Hydra refuses an unknown key or a wrong type while it
composes, and `launch` checks the composed config again (keys added with `+`), so a bad setting
exits with status 2 before anything runs. This launcher sweeps by itself: Hydra's -m/--multirun
is refused with what to do instead. Messages and progress go through `logging` (Hydra's job log,
SWEEP_DIR/launch.log, keeps them); the results go to stdout.
"""
from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shlex
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from critbatch import records
from critbatch.config import ConfigError, UnknownSetting
from sweeps import cluster, distributed, schema
from sweeps.grid import SweepError, check_data, check_overrides, expand, group_runs
from sweeps.jobs import LOST, RUNNING_ELSEWHERE, packs, run_group, run_group_job
from sweeps.lease import read_lease
from sweeps.status import PENDING, STALE, format_status, sweep_status

MANIFEST = records.SWEEP_FILE
LOCK_FILE = ".sweep.lock"
ALLOW_NEW_VARIANT = "sweep.allow_new_variant=true"
# Summaries of runs that this launch saw fail, whatever their record on disk still says.
FAILED_SUMMARIES = (records.FAILED, "job failed")
JOBS_FILE = "jobs.json"
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


class Progress:
    """A one-line progress bar of runs finished out of the total, on stderr."""

    def __init__(self, total: int, done: int = 0):
        self.total, self.done, self.start = total, done, time.time()
        self._tty = sys.stderr.isatty()
        self._last = None
        self.show()

    def show(self, done: int | None = None, note: str = "") -> None:
        if done is not None:
            self.done = done
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} runs "
                f"{time.time() - self.start:5.0f}s {note}")
        if self._tty:
            sys.stderr.write("\r" + line.ljust(100))
            sys.stderr.flush()
        elif self.done != self._last:  # not a terminal: one log line per finished run
            log.info(line)
        self._last = self.done

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")


class FinishedRuns:
    """Counts the submitted runs whose record this launch has finished (failed included), plus
    those complete before it; a poll re-reads only records not yet seen finished."""

    def __init__(self, sweep_dir: Path, submitted, already_complete: int):
        self.paths = {run.name: records.run_dir(sweep_dir, run.config) / records.RECORD_FILE for run in submitted}
        self.done: set[str] = set()
        self.already_complete = already_complete
        self.since = time.time() - 1.0  # a record from an earlier launch (failed, partial) is not news

    def count(self) -> int:
        for name, path in self.paths.items():
            if name in self.done or not path.exists() or path.stat().st_mtime < self.since:
                continue
            try:
                if records.read_record(path)["status"] in records.FINISHED_STATUSES:
                    self.done.add(name)
            except records.RecordError:
                pass  # being replaced right now, or torn: look again at the next poll
        return self.already_complete + len(self.done)


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


def launch_local(sweep_dir: Path, groups, launcher: dict, packing: dict, progress: Progress) -> list[dict]:
    """Every job on this machine: in this process one after another, or in `workers` processes of
    their own at once (jobs.run_group either way; SIGTERM and SIGINT reach the workers, which
    checkpoint their runs)."""
    workers = local_workers(launcher, groups)
    summaries = []
    if workers == 1:
        for group in groups:
            progress.show(note=f"B={group[0].config['batch_size']}")
            summaries += run_group(str(sweep_dir), [run.settings for run in group], threads=launcher.get("threads"),
                                   packing=packing, ranks=distributed.rank_spec(launcher))
            progress.show(progress.done + len(group))
        return summaries
    threads = launcher.get("threads") or 1
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_group, str(sweep_dir), [run.settings for run in group], threads, packing,
                               distributed.rank_spec(launcher)): group
                   for group in groups}

        def forward(signum, frame):  # the workers stop at a step boundary with their state saved
            for process in list(pool._processes.values()):
                os.kill(process.pid, signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM,)}
        try:
            progress.show(note=f"{workers} workers")
            for future in as_completed(futures):
                group = futures[future]
                try:
                    summaries += future.result()
                except Exception as exc:  # a worker that died: its runs are failed or partial on disk
                    summaries += [{"run": run.name, "status": "job failed", "error": f"{type(exc).__name__}: {exc}"}
                                  for run in group]
                progress.show(progress.done + len(group), note=f"{workers} workers")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return summaries


class CannotRun(Exception):
    """Queued jobs that can never run as submitted; they were cancelled."""


def launch_submitit(sweep_dir: Path, groups, launcher: dict, packing: dict, progress: Progress) -> list[dict]:
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
    progress.show(finished.count())
    for job, group in zip(jobs, groups):
        try:
            summaries += job.results()[0]  # a job of several SLURM tasks: rank 0's
        except Exception as exc:  # a killed or crashed job: its runs are failed or partial on disk
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            summaries += [{"run": run.name, "status": "job failed", "error": f"job {job.job_id}: {reason}"}
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


def final_status(sweep_dir: Path, summaries: list[dict]) -> dict:
    """sweeps.status of the directory, where a run this launch saw fail counts as failed even if
    its record could not say so (a full disk leaves the last record it could write: running)."""
    status = sweep_status(sweep_dir)
    for summary in summaries:
        # (running means a live owner: this launch has let go of its runs, so another launch took it over)
        if summary["status"] in FAILED_SUMMARIES and status["runs"].get(summary["run"]) in (STALE, PENDING):
            status["runs"][summary["run"]] = records.FAILED
    status["counts"] = type(status["counts"])(status["runs"].values())
    return status


def launch(cfg: dict, sweep_dir: Path, overrides: list[str] | tuple = ()) -> int:
    """Check everything, write the plan, run or queue what is not complete. `overrides`: the
    command line's Hydra overrides (settings the grid would silently override are refused)."""
    try:
        cfg = schema.check(cfg)  # every key and type; defaults filled in
    except UnknownSetting:
        check_overrides(cfg, overrides)  # +batch_size=64 and the like: name the key to use instead
        raise
    launcher = cfg["launcher"]
    if launcher.get("name") not in LAUNCHERS:
        raise SweepError(f"launcher.name={launcher.get('name')!r}; choose one of {LAUNCHERS}")
    cluster.check_settings(launcher)
    runs = expand(cfg)
    check_overrides(cfg, overrides)
    allow = allow_new_variant(cfg)
    check_data(runs)
    group_runs(runs, launcher["group_by"])  # bad group_by or packing settings
    packs([], cfg.get("packing"))                              # fail before any work
    check_local_device(runs, launcher)
    distributed.check_launch(launcher, runs, cfg.get("packing"))  # ranks per run: launcher, runs, sinfo
    if launcher["name"] == "slurm":
        notes = cluster.check_cluster(launcher)
        if notes is None:
            log.warning("note: sinfo did not answer: the partition, CPUs and memory were not checked against "
                        "the cluster")
        for note in notes or []:
            log.warning(f"note: {note}")
    try:
        with sweep_lock(sweep_dir):
            previous = read_manifest(sweep_dir)
            check_variant(sweep_dir, previous, runs, allow)
            write_manifest(sweep_dir, runs, cfg, previous)
    except OSError as exc:  # e.g. the disk is full
        raise SweepError(f"cannot write {sweep_dir / MANIFEST}: {exc}") from exc
    pending = [run for run in runs
               if not records.is_complete(records.run_dir(sweep_dir, run.config) / records.RECORD_FILE)]
    elsewhere = [run for run in pending if (lease := read_lease(records.run_dir(sweep_dir, run.config)))
                 is not None and lease.live]
    todo = [run for run in pending if run not in elsewhere]
    log.info(f"sweep {sweep_dir}: {len(runs)} runs, {len(runs) - len(pending)} already complete, "
             + (f"{len(elsewhere)} running elsewhere (another launch or job owns them), " if elsewhere else "")
             + f"{len(todo)} to run")
    summaries = []
    if todo:
        groups = group_runs(todo, launcher["group_by"])
        progress = Progress(len(runs), len(runs) - len(pending))
        try:
            if launcher["name"] == "local":
                summaries = launch_local(sweep_dir, groups, launcher, cfg.get("packing"), progress)
            else:
                summaries = launch_submitit(sweep_dir, groups, launcher, cfg.get("packing"), progress)
        except CannotRun as exc:
            progress.close()
            log.error(f"error: {exc}")
            return 1
        progress.close()
        if launcher["name"] != "local" and not launcher["wait"]:
            results.info(f"\nDetached. Check on it:   {command('sweeps.status', sweep_dir)}\n"
                         f"Collect when done:      {command('analysis.pareto', sweep_dir)}\n"
                         f"Rerun what failed:      {relaunch_command(overrides, sweep_dir)}")
            return 0
    failed = [s for s in summaries if s["status"] in FAILED_SUMMARIES]
    for s in failed:
        log.error(f"FAILED {s['run']}: {s.get('error', '')}")
    owned = [s for s in summaries if s["status"] in (RUNNING_ELSEWHERE, LOST)]
    results.info(format_status(final_status(sweep_dir, summaries)))
    results.info(f"\nrecords: {sweep_dir / records.RUNS_DIR}\nnext:    {command('analysis.pareto', sweep_dir)}")
    if elsewhere or owned:
        log.warning(f"{len(elsewhere) + len(owned)} run(s) running elsewhere (owned by another launch or job): "
                    f"{command('sweeps.status', sweep_dir)} follows them")
    if failed:
        log.error(f"{len(failed)} run(s) failed; rerun them: {relaunch_command(overrides, sweep_dir)}")
        return 1
    return 0


def command(module: str, *args) -> str:
    """A command line that runs `python -m module args` with this interpreter (the venv's)."""
    return shlex.join([sys.executable, "-m", module, *map(str, args)])


def relaunch_command(overrides, sweep_dir: Path) -> str:
    """This launch again, with its own overrides, into the same directory."""
    kept = [o for o in overrides or () if not o.lstrip("+").startswith("hydra.sweep.dir=")]
    return command("sweeps.launch", *kept, f"hydra.sweep.dir={sweep_dir}")


_started = False  # whether Hydra got as far as calling the task (it exits 1 on a config it refuses)


@hydra.main(config_path=schema.config_dir(), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    global _started
    _started = True
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # e.g. hydra.mode=MULTIRUN in a preset
        log.error(f"error: {MULTIRUN_REFUSED}")
        sys.exit(2)
    sweep_dir = Path(hydra_cfg.runtime.output_dir)
    # the command line as typed, for the commands printed to run next: hydra.searchpath and the
    # like too, not where this run's directory went (hydra.sweep.dir is given anew)
    overrides = [o for o in hydra_cfg.overrides.hydra
                 if o.partition("=")[0].lstrip("+") not in ("hydra.mode", "hydra.run.dir", "hydra.sweep.dir")]
    overrides += list(hydra_cfg.overrides.task)
    try:
        code = launch(schema.to_plain(cfg), sweep_dir, overrides)
    except ConfigError as exc:  # bad settings or missing data (SweepError is one too)
        log.error(f"error: {exc}\nnothing was submitted.")
        sys.exit(2)
    sys.exit(code)


def main() -> None:
    """`python -m sweeps.launch`: Hydra composes and checks the config, then `launch` runs it.
    Exit status: 0 done, 1 some runs failed or could never run, 2 a setting was refused
    (nothing ran)."""
    if any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        print(f"error: {MULTIRUN_REFUSED}", file=sys.stderr)
        sys.exit(2)
    try:
        _main()
    except SystemExit as exc:
        if exc.code == 1 and not _started:  # Hydra refused the config (it printed why)
            print("nothing was submitted.", file=sys.stderr)
            sys.exit(2)
        raise


schema.register()

if __name__ == "__main__":
    main()
