"""`python -m sweeps.launch [overrides]`: run a batch-size x learning-rate grid, locally or on SLURM.

    python -m sweeps.launch                                  # default sweep, on this machine
    python -m sweeps.launch task=linreg sweep=linreg         # another task
    python -m sweeps.launch launcher=slurm launcher.wait=false   # submit a job array and return
    python -m sweeps.launch hydra.sweep.dir=SWEEP_DIR        # relaunch: skips complete runs

Every run of the grid is validated (and its data looked for) before anything is queued; a bad
config fails here in seconds with a message that names the field, and nothing is submitted.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from critbatch import records
from critbatch.config import ConfigError
from sweeps.grid import SweepError, check_data, expand, group_runs
from sweeps.jobs import packs, run_group, run_group_job
from sweeps.status import format_status, sweep_status

MANIFEST = "sweep.json"
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


def write_manifest(sweep_dir: Path, runs, cfg: dict) -> None:
    """The planned runs, so `sweeps.status` can tell pending from done."""
    manifest = {"created": datetime.now().isoformat(timespec="seconds"), "config": cfg,
                "runs": [{"name": r.name, "run_id": r.run_id, "batch_size": r.config["batch_size"],
                          "lr": r.config["optimizer"]["lr"], "seed": r.config["seed"]} for r in runs]}
    records.write_record(sweep_dir / MANIFEST, manifest)


def make_executor(sweep_dir: Path, launcher: dict):
    import submitit

    folder = sweep_dir / ".submitit" / datetime.now().strftime("%Y%m%d-%H%M%S-%f") / "%j"
    if launcher["name"] == "submitit_local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(timeout_min=launcher.get("timeout_min", 60),
                                   cpus_per_task=launcher.get("cpus_per_task", 1))
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params = {"timeout_min": launcher["timeout_min"], "cpus_per_task": launcher["cpus_per_task"],
              "mem_gb": launcher["mem_gb"], "slurm_array_parallelism": launcher["array_parallelism"],
              "name": launcher.get("job_name") or "critbatch"}
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


def launch_submitit(sweep_dir: Path, groups, launcher: dict, packing: dict, progress: Progress) -> list[dict]:
    executor = make_executor(sweep_dir, launcher)
    configs = [[run.config for run in group] for group in groups]
    jobs = executor.map_array(run_group_job, [str(sweep_dir)] * len(configs), configs,
                              [launcher.get("threads")] * len(configs), [packing] * len(configs))
    entry = {"submitted": datetime.now().isoformat(timespec="seconds"), "launcher": launcher["name"],
             "job_ids": [job.job_id for job in jobs], "folder": str(executor.folder),
             "groups": [[run.name for run in group] for group in groups]}
    jobs_path = sweep_dir / JOBS_FILE
    history = json.loads(jobs_path.read_text()) if jobs_path.exists() else []
    records.write_record(jobs_path, history + [entry])
    first = jobs[0].job_id.split("_")[0] if jobs else "?"
    print(f"submitted {len(jobs)} job(s) ({launcher['name']}, array {first}) for {sum(map(len, groups))} runs",
          file=sys.stderr)
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


def launch(cfg: dict, sweep_dir: Path) -> int:
    launcher = cfg["launcher"]
    if launcher.get("name") not in LAUNCHERS:
        raise SweepError(f"launcher.name={launcher.get('name')!r}; choose one of {LAUNCHERS}")
    runs = expand(cfg)
    check_data(runs)
    group_runs(runs, launcher.get("group_by", "batch_size"))  # bad group_by or packing settings
    packs([], cfg.get("packing"))                              # fail before any work
    check_local_device(runs, launcher)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(sweep_dir, runs, cfg)
    pending = [run for run in runs
               if not records.is_complete(records.run_dir(sweep_dir, run.config) / records.RECORD_FILE)]
    print(f"sweep {sweep_dir}: {len(runs)} runs, {len(runs) - len(pending)} already complete, "
          f"{len(pending)} to run", file=sys.stderr)
    summaries = []
    if pending:
        groups = group_runs(pending, launcher.get("group_by", "batch_size"))
        progress = Progress(len(runs), len(runs) - len(pending))
        if launcher["name"] == "local":
            summaries = launch_local(sweep_dir, groups, launcher, cfg.get("packing"), progress)
        else:
            summaries = launch_submitit(sweep_dir, groups, launcher, cfg.get("packing"), progress)
        progress.close()
        if launcher["name"] != "local" and not launcher.get("wait", True):
            print(f"\nDetached. Check on it:   python -m sweeps.status {sweep_dir}\n"
                  f"Collect when done:      python -m analysis.pareto {sweep_dir}\n"
                  f"Rerun what failed:      python -m sweeps.launch <same overrides> hydra.sweep.dir={sweep_dir}")
            return 0
    failed = [s for s in summaries if s["status"] in (records.FAILED, "job failed")]
    for s in failed:
        print(f"FAILED {s['run']}: {s.get('error', '')}", file=sys.stderr)
    print(format_status(sweep_status(sweep_dir)))
    print(f"\nrecords: {sweep_dir / records.RUNS_DIR}\nnext:    python -m analysis.pareto {sweep_dir}")
    if failed:
        print(f"{len(failed)} run(s) failed; relaunch with hydra.sweep.dir={sweep_dir} to rerun them",
              file=sys.stderr)
        return 1
    return 0


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    sweep_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        code = launch(OmegaConf.to_container(cfg, resolve=True), sweep_dir)
    except ConfigError as exc:  # bad settings or missing data (SweepError is one too)
        print(f"error: {exc}\nnothing was submitted.", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
