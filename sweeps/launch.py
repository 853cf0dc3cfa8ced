"""`python -m sweeps.launch [overrides]`: run a batch-size x learning-rate grid, locally or on SLURM.

    python -m sweeps.launch                                  # default sweep, on this machine
    python -m sweeps.launch task=linreg sweep=linreg         # another task
    python -m sweeps.launch launcher=slurm launcher.wait=false   # submit a job array and return
    python -m sweeps.launch hydra.sweep.dir=SWEEP_DIR        # relaunch: skips complete runs

Every run of the grid is validated (and its data looked for) before anything is written or
queued: the grid (no empty axis, goals that can be met but not before the first step, no
command-line setting that the grid silently overrides), the launcher settings and, on SLURM, the
request against what `sinfo` reports (sweeps/cluster.py). A bad config fails here in seconds with a
message that names the field, and nothing is submitted. A directory holds one sweep: relaunching
into it with settings that change what its runs are (anything but the batch sizes, lrs and seeds)
is refused unless asked for with +sweep.allow_new_variant=true. Jobs queued on SLURM are watched
until they start; jobs that can never run are cancelled and the launch fails.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from critbatch import records
from critbatch.config import ConfigError
from sweeps import cluster
from sweeps.grid import SweepError, check_data, check_overrides, expand, group_runs
from sweeps.jobs import LOST, RUNNING_ELSEWHERE, packs, run_group, run_group_job
from sweeps.lease import read_lease
from sweeps.status import PENDING, STALE, format_status, sweep_status

MANIFEST = records.SWEEP_FILE
LOCK_FILE = ".sweep.lock"
ALLOW_NEW_VARIANT = "+sweep.allow_new_variant=true"
# Summaries of runs that this launch saw fail, whatever their record on disk still says.
FAILED_SUMMARIES = (records.FAILED, "job failed")
JOBS_FILE = "jobs.json"
LAUNCHERS = ("local", "submitit_local", "slurm")


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
        elif self.done != self._last:  # in a log file, one line per finished run
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
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
        print(f"note: {sweep_dir} held sweep variant {old}; it now holds {new} (+sweep.allow_new_variant=true). "
              "The earlier runs stay on disk but are no longer counted by sweeps.status or the analysis.",
              file=sys.stderr)
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
    import submitit

    folder = sweep_dir / ".submitit" / datetime.now().strftime("%Y%m%d-%H%M%S-%f") / "%j"
    if launcher["name"] == "submitit_local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(timeout_min=launcher.get("timeout_min", 60),
                                   cpus_per_task=launcher.get("cpus_per_task", 1))
        return executor
    # max_requeues: how often a job that reaches its time limit is checkpointed and requeued
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=launcher.get("max_requeues", 3))
    params = {"timeout_min": launcher["timeout_min"], "cpus_per_task": launcher["cpus_per_task"],
              "mem_gb": launcher["mem_gb"], "slurm_array_parallelism": launcher["array_parallelism"],
              "name": launcher.get("job_name") or "critbatch",
              # SIGUSR2 this long before the time limit: the run checkpoints and the job requeues
              "slurm_signal_delay_s": launcher.get("signal_delay_s", 90)}
    if launcher.get("gpus_per_node"):
        params["gpus_per_node"] = launcher["gpus_per_node"]
    for key in ("partition", "account", "qos", "constraint"):
        if launcher.get(key):
            params[f"slurm_{key}"] = launcher[key]
    if launcher.get("setup"):
        params["slurm_setup"] = list(launcher["setup"])
    if launcher.get("additional_parameters"):
        params["slurm_additional_parameters"] = dict(launcher["additional_parameters"])
    executor.update_parameters(**params)
    return executor


def launch_local(sweep_dir: Path, groups, launcher: dict, packing: dict, progress: Progress) -> list[dict]:
    summaries = []
    for group in groups:
        progress.show(note=f"B={group[0].config['batch_size']}")
        summaries += run_group(str(sweep_dir), [run.config for run in group], threads=launcher.get("threads"),
                               packing=packing)
        progress.show(progress.done + len(group))
    return summaries


class CannotRun(Exception):
    """Queued jobs that can never run as submitted; they were cancelled."""


def launch_submitit(sweep_dir: Path, groups, launcher: dict, packing: dict, progress: Progress) -> list[dict]:
    executor = make_executor(sweep_dir, launcher)
    configs = [[run.config for run in group] for group in groups]
    try:
        jobs = executor.map_array(run_group_job, [str(sweep_dir)] * len(configs), configs,
                                  [launcher.get("threads")] * len(configs), [packing] * len(configs))
    except Exception as exc:  # sbatch refused: nothing is queued
        raise SweepError(f"the jobs could not be submitted ({launcher['name']}): {exc}".strip()) from exc
    entry = {"submitted": datetime.now().isoformat(timespec="seconds"), "launcher": launcher["name"],
             "job_ids": [job.job_id for job in jobs], "folder": str(executor.folder),
             "groups": [[run.name for run in group] for group in groups]}
    add_jobs_entry(sweep_dir, entry)
    first = jobs[0].job_id.split("_")[0] if jobs else "?"
    print(f"submitted {len(jobs)} job(s) ({launcher['name']}, array {first}) for {sum(map(len, groups))} runs",
          file=sys.stderr)
    if launcher["name"] == "slurm" and jobs:
        watch = cluster.watch_start([job.job_id for job in jobs])
        if watch.never:
            cluster.cancel([job.job_id for job in jobs])
            entry["cancelled"] = watch.describe()
            add_jobs_entry(sweep_dir, entry)
            raise CannotRun(f"{watch.describe()}; cancelled job array {first}. Change the request (launcher.* "
                            "settings) and relaunch into the same hydra.sweep.dir.")
        print(f"jobs: {watch.describe()}", file=sys.stderr)
    if not launcher.get("wait", True):
        return []
    summaries, finished = [], FinishedRuns(sweep_dir, [run for group in groups for run in group], progress.done)
    while not all(job.done() for job in jobs):
        progress.show(finished.count(), note=f"{sum(not j.done() for j in jobs)} job(s) left")
        time.sleep(2)
    progress.show(finished.count())
    for job, group in zip(jobs, groups):
        try:
            summaries += job.result()
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
    launcher = cfg["launcher"]
    if launcher.get("name") not in LAUNCHERS:
        raise SweepError(f"launcher.name={launcher.get('name')!r}; choose one of {LAUNCHERS}")
    cluster.check_settings(launcher)
    runs = expand(cfg)
    check_overrides(cfg, overrides)
    allow = allow_new_variant(cfg)
    check_data(runs)
    group_runs(runs, launcher.get("group_by", "batch_size"))  # bad group_by or packing settings
    packs([], cfg.get("packing"))                              # fail before any work
    check_local_device(runs, launcher)
    if launcher["name"] == "slurm":
        notes = cluster.check_cluster(launcher)
        if notes is None:
            print("note: sinfo did not answer: the partition, CPUs and memory were not checked against the "
                  "cluster", file=sys.stderr)
        for note in notes or []:
            print(f"note: {note}", file=sys.stderr)
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
    print(f"sweep {sweep_dir}: {len(runs)} runs, {len(runs) - len(pending)} already complete, "
          + (f"{len(elsewhere)} running elsewhere (another launch or job owns them), " if elsewhere else "")
          + f"{len(todo)} to run", file=sys.stderr)
    summaries = []
    if todo:
        groups = group_runs(todo, launcher.get("group_by", "batch_size"))
        progress = Progress(len(runs), len(runs) - len(pending))
        try:
            if launcher["name"] == "local":
                summaries = launch_local(sweep_dir, groups, launcher, cfg.get("packing"), progress)
            else:
                summaries = launch_submitit(sweep_dir, groups, launcher, cfg.get("packing"), progress)
        except CannotRun as exc:
            progress.close()
            print(f"error: {exc}", file=sys.stderr)
            return 1
        progress.close()
        if launcher["name"] != "local" and not launcher.get("wait", True):
            print(f"\nDetached. Check on it:   python -m sweeps.status {sweep_dir}\n"
                  f"Collect when done:      python -m analysis.pareto {sweep_dir}\n"
                  f"Rerun what failed:      python -m sweeps.launch <same overrides> hydra.sweep.dir={sweep_dir}")
            return 0
    failed = [s for s in summaries if s["status"] in FAILED_SUMMARIES]
    for s in failed:
        print(f"FAILED {s['run']}: {s.get('error', '')}", file=sys.stderr)
    owned = [s for s in summaries if s["status"] in (RUNNING_ELSEWHERE, LOST)]
    print(format_status(final_status(sweep_dir, summaries)))
    print(f"\nrecords: {sweep_dir / records.RUNS_DIR}\nnext:    python -m analysis.pareto {sweep_dir}")
    if elsewhere or owned:
        print(f"{len(elsewhere) + len(owned)} run(s) running elsewhere (owned by another launch or job): "
              f"python -m sweeps.status {sweep_dir} follows them", file=sys.stderr)
    if failed:
        print(f"{len(failed)} run(s) failed; relaunch with hydra.sweep.dir={sweep_dir} to rerun them",
              file=sys.stderr)
        return 1
    return 0


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        code = launch(OmegaConf.to_container(cfg, resolve=True), sweep_dir, list(hydra_cfg.overrides.task))
    except ConfigError as exc:  # bad settings or missing data (SweepError is one too)
        print(f"error: {exc}\nnothing was submitted.", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
