"""The run record: its schema, atomic writing, and loading a sweep into a DataFrame.

A record on disk is the only thing that passes between a training job and the analysis
(docs/records.md describes the format). A record is replaced atomically (temp file + rename in
the same directory), so a reader sees the old record or the new one, never a torn one. A job
writes status "running" early and rewrites the record as it goes, so a killed job leaves a
record that says it is partial.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

# 2: goals say whether they were censored (met before the first valid measurement) and carry the
# noise estimate's standard errors and its path average; the summary carries B_simple at
# initialisation. Version-1 records are not read: rerun the sweep.
SCHEMA_VERSION = 2
RECORD_FILE = "record.json"
RUNS_DIR = "runs"

RUNNING = "running"
COMPLETED = "completed"
DIVERGED = "diverged"
BUDGET_EXHAUSTED = "budget_exhausted"
FAILED = "failed"
FINISHED_STATUSES = (COMPLETED, DIVERGED, BUDGET_EXHAUSTED, FAILED)
STATUSES = (RUNNING, *FINISHED_STATUSES)

# The settings that identify a run: two runs agreeing on these are the same run, so a relaunch
# can skip it. Wall-clock and bookkeeping settings (log intervals, device) are left out on purpose.
IDENTITY_KEYS = ("task", "optimizer", "batch_size", "seed", "goals", "budget", "sampling",
                 "noise_scale", "smoothing", "divergence")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def run_id(config: dict) -> str:
    """A short stable hash of the settings that identify a run (see IDENTITY_KEYS)."""
    identity = {key: config.get(key) for key in IDENTITY_KEYS}
    # Where the data lives is not what was run: moving a dataset must not redo complete runs.
    identity["task"] = {k: v for k, v in (identity["task"] or {}).items() if k != "data_dir"}
    return hashlib.sha256(_canonical(identity).encode()).hexdigest()[:12]


def run_name(config: dict) -> str:
    """A readable directory name: task, optimizer, batch size, lr, seed and the id."""
    lr = config["optimizer"]["lr"]
    return (f"{config['task']['name']}_{config['optimizer']['name']}_B{config['batch_size']}"
            f"_lr{lr:.4g}_s{config['seed']}_{run_id(config)[:8]}")


def run_dir(sweep_dir: str | os.PathLike, config: dict) -> Path:
    return Path(sweep_dir) / RUNS_DIR / run_name(config)


def new_record(config: dict) -> dict:
    """The record of a run that starts now (status running): the one place its layout is made.
    `config` is the run's complete settings (RunConfig.to_dict())."""
    return {
        "schema_version": SCHEMA_VERSION, "run_id": run_id(config), "run_name": run_name(config),
        "status": RUNNING, "config": config,
        "goals": [{"metric": config["goals"]["metric"], "threshold": t, "reached": False, "censored": False}
                  for t in config["goals"]["thresholds"]],
        "summary": {"steps": 0, "examples": 0, "wall_time": 0.0, "reason": None, "error": None},
        "curve": {},
    }


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN, and a record must stay strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_record(path: str | os.PathLike, record: dict) -> None:
    """Write `record` to `path` atomically: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(record), allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RecordError(ValueError):
    """A record file that cannot be used: unreadable, torn, or of an unknown schema."""


def read_record(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: unreadable record ({exc})") from exc
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not a record (top level is {type(record).__name__})")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema_version {version!r}, this critbatch reads {SCHEMA_VERSION}")
    missing = [k for k in ("run_id", "status", "config", "goals", "summary", "curve") if k not in record]
    if missing:
        raise RecordError(f"{path}: record lacks {', '.join(missing)}")
    if record["status"] not in STATUSES:
        raise RecordError(f"{path}: unknown status {record['status']!r}; expected one of {STATUSES}")
    return record


def is_complete(path: str | os.PathLike) -> bool:
    """True when `path` holds a finished record that a relaunch must not recompute."""
    try:
        return read_record(path)["status"] in (COMPLETED, DIVERGED, BUDGET_EXHAUSTED)
    except RecordError:
        return False


def iter_record_paths(sweep_dir: str | os.PathLike) -> Iterator[Path]:
    return iter(sorted(Path(sweep_dir).rglob(RECORD_FILE)))


def _read_finished(sweep_dir) -> tuple[list[tuple[Path, dict]], list[dict]]:
    """Finished records, and the problems (partial or unreadable records) named by path."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
    finished, problems = [], []
    for path in iter_record_paths(sweep_dir):
        try:
            record = read_record(path)
        except RecordError as exc:
            problems.append({"path": str(path), "problem": str(exc)})
            continue
        if record["status"] == RUNNING:
            problems.append({"path": str(path), "problem": "partial record (status running): the job "
                             "was killed or is still running; relaunch the sweep to finish it"})
            continue
        finished.append((path, record))
    for problem in problems:
        warnings.warn(f"skipping {problem['path']}: {problem['problem']}", stacklevel=3)
    return finished, problems


def _settings(record: dict, path: Path) -> dict:
    config = record["config"]
    return {
        "run_id": record["run_id"], "run_name": record.get("run_name", path.parent.name),
        "run_dir": str(path.parent), "task": config["task"]["name"],
        "optimizer": config["optimizer"]["name"], "batch_size": int(config["batch_size"]),
        "lr": float(config["optimizer"]["lr"]), "seed": config.get("seed"), "status": record["status"],
    }


def _num(value) -> float:
    return math.nan if value is None else float(value)


#: per-goal values of the noise scale at the crossing (docs/records.md)
GOAL_NOISE_COLUMNS = ("b_simple", "b_simple_se", "grad_sq_norm", "grad_sq_norm_se", "trace_sigma",
                      "trace_sigma_se", "noise_cov", "noise_updates", "b_simple_path")
#: per-run values of the noise scale at initialisation, from the summary
INIT_NOISE_COLUMNS = ("b_simple_init", "b_simple_init_se", "grad_sq_norm_init", "trace_sigma_init")


def load_sweep(sweep_dir: str | os.PathLike):
    """All finished runs under `sweep_dir` as one row per (run, goal); see docs/records.md."""
    import pandas as pd

    finished, problems = _read_finished(sweep_dir)
    rows = []
    for path, record in finished:
        settings = _settings(record, path)
        summary = record["summary"]
        init = {k: _num(summary.get(k)) for k in INIT_NOISE_COLUMNS}
        for goal in record["goals"]:
            reached = bool(goal.get("reached"))
            resolved = reached and not goal.get("censored", False)
            rows.append({
                **settings,
                "goal_metric": goal["metric"], "goal_threshold": float(goal["threshold"]),
                "goal": f"{goal['metric']}<={goal['threshold']:g}", "reached": reached,
                "censored": bool(goal.get("censored", False)),
                "steps": _num(goal.get("step")) if resolved else math.nan,
                **{k: _num(goal.get(k)) if resolved else math.nan for k in ("examples", "wall_time") + GOAL_NOISE_COLUMNS},
                **init,
                "total_steps": summary.get("steps"), "total_examples": summary.get("examples"),
            })
    columns = ["run_id", "run_name", "run_dir", "task", "optimizer", "batch_size", "lr", "seed",
               "status", "goal_metric", "goal_threshold", "goal", "reached", "censored", "steps", "examples",
               "wall_time", *GOAL_NOISE_COLUMNS, *INIT_NOISE_COLUMNS, "total_steps", "total_examples"]
    frame = pd.DataFrame(rows, columns=columns)
    frame.attrs["problems"] = problems
    return frame


def load_curves(sweep_dir: str | os.PathLike):
    """Every finished run's logged curve, one row per (run, logged step)."""
    import pandas as pd

    finished, problems = _read_finished(sweep_dir)
    frames = []
    for path, record in finished:
        curve = pd.DataFrame(record["curve"])
        for key, value in _settings(record, path).items():
            curve[key] = value
        frames.append(curve)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    frame.attrs["problems"] = problems
    return frame
