"""The run record: its schema, atomic writing, and loading a sweep into a DataFrame.

A record on disk is the only thing that passes between a training job and the analysis
(docs/records.md describes the format). A record is replaced atomically (temp file + rename in
the same directory), so a reader sees the old record or the new one, never a torn one. A job
writes status "running" early and rewrites the record as it goes, so a killed job leaves a
record that says it is partial.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import secrets
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from critbatch.config import GRID_AXES, NOT_IDENTITY, RunConfig, identity_settings, without
from critbatch.typecheck import describe, field_hints, matches

# 3: goals and summaries carry every field of GoalRecord and Summary (null where not measured),
# task options are complete (their constructor defaults filled in), status "interrupted".
# Records of another version are not read: rerun the sweep.
SCHEMA_VERSION = 3
RECORD_FILE = "record.json"
RUNS_DIR = "runs"
SWEEP_FILE = "sweep.json"   # a sweep directory's plan, written by sweeps.launch


class Status(str, enum.Enum):
    """Where a run stands (STATUS_MEANINGS). A relaunch skips `complete` runs and resumes or
    reruns the others."""
    running = "running"
    completed = "completed"
    diverged = "diverged"
    stalled = "stalled"
    budget_exhausted = "budget_exhausted"
    failed = "failed"
    interrupted = "interrupted"

    @property
    def finished(self) -> bool:
        """The run is over: its record is final (a relaunch may still rerun a failed one)."""
        return self not in (Status.running, Status.interrupted)

    @property
    def complete(self) -> bool:
        """A relaunch must not recompute it."""
        return self.finished and self is not Status.failed


STATUS_MEANINGS = {
    Status.running: "training, or killed without a word: a partial record (its checkpoint, if any, lets a relaunch "
                    "resume it)",
    Status.completed: "every goal reached",
    Status.diverged: "non-finite loss, or smoothed loss above divergence.loss_ratio x the initial loss",
    Status.stalled: "stopped by the no-progress rule (divergence.stall_steps); analysed like diverged",
    Status.budget_exhausted: "its steps, examples or seconds were spent",
    Status.failed: "an exception (summary.error says which); a relaunch reruns it",
    Status.interrupted: "stopped by a signal (Ctrl-C, scancel, preemption) at a step boundary with its state "
                        "checkpointed; a relaunch resumes it",
}
RUNNING, COMPLETED, DIVERGED, STALLED = Status.running, Status.completed, Status.diverged, Status.stalled
BUDGET_EXHAUSTED, FAILED, INTERRUPTED = Status.budget_exhausted, Status.failed, Status.interrupted
STATUSES = tuple(s.value for s in Status)
FINISHED_STATUSES = tuple(s.value for s in Status if s.finished)
COMPLETE_STATUSES = tuple(s.value for s in Status if s.complete)


def _doc(text: str, default=None):
    return field(default=default, metadata={"doc": text})


@dataclass(kw_only=True)
class NoiseFields:
    """B_simple as critbatch.gns.NoiseScale estimates it (NoiseScale.state())."""
    b_simple: float | None = _doc("tr(Σ)/|G|², the ratio of the averaged estimates")
    b_simple_se: float | None = _doc("its standard error (delta method)")
    grad_sq_norm: float | None = _doc("|G|², the averaged unbiased estimate")
    grad_sq_norm_se: float | None = _doc("its standard error")
    trace_sigma: float | None = _doc("tr(Σ), the averaged unbiased estimate")
    trace_sigma_se: float | None = _doc("its standard error")
    noise_cov: float | None = _doc("covariance of the two averaged estimates")
    noise_updates: int | None = _doc("measurements averaged")
    b_simple_resolved: bool | None = _doc("|G|² above twice its standard error (else b_simple is a lower bound)")


@dataclass(kw_only=True)
class CurvatureFields:
    """B_noise = tr(HΣ)/(GᵀHG), a NoiseScale fed with curvature forms (critbatch.curvature)."""
    b_noise: float | None = _doc("tr(HΣ)/(GᵀHG)")
    b_noise_se: float | None = _doc("its standard error")
    grad_h_grad: float | None = _doc("GᵀHG, the averaged unbiased estimate")
    grad_h_grad_se: float | None = _doc("its standard error")
    trace_h_sigma: float | None = _doc("tr(HΣ), the averaged unbiased estimate")
    trace_h_sigma_se: float | None = _doc("its standard error")
    curvature_cov: float | None = _doc("covariance of the two averaged estimates")
    curvature_updates: int | None = _doc("measurements averaged")
    b_noise_resolved: bool | None = _doc("GᵀHG above twice its standard error")


@dataclass(kw_only=True)
class PathFields:
    """The noise scales averaged along the path as S = S_min + E_min/B averages them
    (critbatch.monitor.IdealSteps, docs/noise_scales.md)."""
    b_simple_path: float | None = _doc("B_simple averaged along the path to this step")
    b_simple_path_se: float | None = _doc("its standard error (NaN before 8 measurements)")
    b_noise_path: float | None = _doc("B_noise averaged along the path to this step")
    b_noise_path_se: float | None = _doc("its standard error; the analysis counts a path average only where "
                                         "this is at most 25% of it")
    ideal_steps: float | None = _doc("the steps an infinite batch would have needed for the progress made")


@dataclass(kw_only=True)
class GoalCrossing:
    """When a run first met a goal."""
    metric: str = field(metadata={"doc": "the goal's metric, e.g. train_error"})
    threshold: float = field(metadata={"doc": "the goal is met when the smoothed metric is at most this"})
    reached: bool = _doc("the smoothed metric fell to the threshold", False)
    censored: bool = _doc("met already when the first smoothing window filled: its step is only known to be "
                          "at most step_at_most; never fitted", False)
    step: float | None = _doc("the first crossing of the smoothed metric (interpolated, so fractional)")
    examples: float | None = _doc("step × batch size")
    wall_time: float | None = _doc("seconds of training at the crossing")
    step_at_most: float | None = _doc("a censored goal: the step at which it was noticed")
    noise_source: str | None = _doc("probe or window: where the noise fields come from")
    noise_center_step: float | None = _doc("the step at which the window's estimate is centred")
    probed_at: float | None = _doc("the step of the parameters the probe measured")


@dataclass(kw_only=True)
class GoalRecord(PathFields, CurvatureFields, NoiseFields, GoalCrossing):
    """One goal, `metric <= threshold`, and what was measured where the run first met it. The noise
    fields are a probe of the kept parameters nearest the crossing (noise_source "probe") or the
    window's estimate when it was noticed ("window"); B_noise only where probed."""


@dataclass(kw_only=True)
class Summary:
    """How the run went, as a whole."""
    steps: int = _doc("steps taken", 0)
    examples: int = _doc("examples seen (steps × batch size)", 0)
    wall_time: float = _doc("seconds of training (set-up excluded)", 0.0)
    reason: str | None = _doc("why the run stopped")
    error: str | None = _doc("the exception of a failed run")
    initial_loss: float | None = _doc("the initial model's mean loss: the divergence rule's reference")
    b_simple_init: float | None = _doc("B_simple at initialisation (a probe)")
    b_simple_init_se: float | None = _doc("its standard error")
    grad_sq_norm_init: float | None = _doc("|G|² at initialisation")
    trace_sigma_init: float | None = _doc("tr(Σ) at initialisation")
    noise_init_batches: int | None = _doc("batches the initial probe measured")
    b_noise_init: float | None = _doc("B_noise at initialisation, where measured")
    b_noise_se_init: float | None = _doc("its standard error")
    grad_h_grad_init: float | None = _doc("GᵀHG at initialisation")
    trace_h_sigma_init: float | None = _doc("tr(HΣ) at initialisation")
    curvature_updates_init: int | None = _doc("batches of the initial B_noise probe")
    b_noise_skipped: str | None = _doc("why B_noise was not measured in this run, where it was asked for")
    data: dict | None = _doc("what identifies the data beyond the task's options (Task.fingerprint)")
    device: str | None = _doc("where it trained")
    processes: int | None = _doc("ranks that trained it together, each on batch_size/processes examples of every "
                                 "batch (1: one process; critbatch.distributed)")
    path: str | None = _doc("plain or packed")
    packed_members: int | None = _doc("runs trained together as one packed model")
    noise_micro_batches: int | None = _doc("k of a measuring step")
    noise_measurement: str | None = _doc("how the k micro-batch norms were computed (critbatch.steps.NoiseMeasurement)")
    cuda_graphs: bool | None = _doc("steps replayed from CUDA graphs")
    cuda_graph_failure: str | None = _doc("why a capture failed (the step then ran eagerly)")
    setup_seconds: float | None = _doc("set-up time: data, model, the initial probes")
    resumed_at: list | None = _doc("steps at which the run resumed from its checkpoint")
    noise_measurements: int | None = _doc("B_simple measurements along the path (each on the step's own batch)")
    curvature_measurements: int | None = _doc("B_noise measurements along the path (each on hessian_draws batches of "
                                              "its own where noise_scale.hessian_micro_batch is set)")
    branch_states: list | None = _doc("a trunk: the states it saved for branch runs, each {step, examples, label, "
                                      "file, loss} (critbatch.branches)")
    branch_start_loss: float | None = _doc("a branch: its trunk's loss where it starts, on the evaluation set of "
                                           "branch_loss")
    branch_loss: float | None = _doc("a branch: its loss after its window, on a fixed evaluation set (the whole "
                                     "training set or a fixed sample of a large one, or in closed form: "
                                     "critbatch.branches.evaluation_loss)")
    host: str | None = _doc("the machine")
    pid: int | None = _doc("the process")
    torch: str | None = _doc("torch's version")
    python: str | None = _doc("Python's version")


@dataclass(kw_only=True)
class CurveStep:
    step: int = field(metadata={"doc": "the logged step (geometrically spaced, log.relative_interval apart)"})
    examples: int = field(metadata={"doc": "step × batch size"})
    wall_time: float = field(metadata={"doc": "seconds of training"})


@dataclass(kw_only=True)
class CurvePoint(PathFields, CurvatureFields, NoiseFields, CurveStep):
    """The fixed columns of the curve (a column per field, a row per logged step, the window's
    noise estimates at that step); the run's metrics are columns too: train_<m> (smoothed batch
    metric m), the task's evaluated metrics as named, and smoothed_<m> for an evaluated goal metric."""


def field_names(schema) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(schema))


#: per-goal values of the noise scales at the crossing: columns of load_sweep
GOAL_NOISE_COLUMNS = tuple(n for n in field_names(GoalRecord) if n in field_names(NoiseFields)
                           + field_names(CurvatureFields) + field_names(PathFields) and not n.endswith("_resolved"))
#: per-run values of the noise scales at initialisation, from the summary
INIT_NOISE_COLUMNS = ("b_simple_init", "b_simple_init_se", "grad_sq_norm_init", "trace_sigma_init",
                      "b_noise_init", "b_noise_se_init")
#: the curve columns every record has (the metrics' columns are the task's)
CURVE_COLUMNS = tuple(n for n in field_names(CurvePoint) if not n.endswith("_resolved"))

def schema_markdown() -> str:
    """docs/records.md's tables of statuses and fields, made from this schema (the test suite
    checks that the document holds them; regenerate with `python -m critbatch.records`)."""
    lines = ["| status | meaning |", "|---|---|"]
    lines += [f"| {status.value} | {STATUS_MEANINGS[status]} |" for status in Status]
    for title, schema in (("A goal (`goals[i]`)", GoalRecord), ("`summary`", Summary),
                          ("`curve`: one list per column, one value per logged step", CurvePoint)):
        hints = typing.get_type_hints(schema)
        lines += ["", f"{title}:", "", "| field | type | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(schema):
            if schema is CurvePoint and f.name.endswith("_resolved"):
                continue
            meaning = f.metadata.get("doc", "").replace("|", "\\|")
            lines.append(f"| {f.name} | {describe(hints[f.name])} | {meaning} |")
    return "\n".join(lines) + "\n"


# The settings that identify a run: two runs agreeing on these are the same run, so a relaunch
# can skip it. Derived from RunConfig: every field but those in config.NOT_IDENTITY (bookkeeping,
# the device, where the data lives), so a field added to RunConfig is part of the identity.
IDENTITY_KEYS = tuple(name for name in field_hints(RunConfig) if name not in NOT_IDENTITY)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _identity(config: dict) -> dict:
    return identity_settings(config)


def run_id(config: dict) -> str:
    """A short stable hash of the settings that identify a run (every setting of RunConfig
    but config.NOT_IDENTITY)."""
    return hashlib.sha256(_canonical(_identity(config)).encode()).hexdigest()[:12]


def variant_settings(config: dict) -> dict:
    """What the runs of one sweep share: a run's identity less the grid's axes (batch size,
    optimizer.lr, seed: config.GRID_AXES), as flat dotted keys, e.g. {"budget.max_steps": 400, ...}."""
    identity = without(_identity(config), GRID_AXES)
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key in sorted(value):
                walk(f"{prefix}.{key}" if prefix else str(key), value[key])
        else:
            flat[prefix] = value

    walk("", identity)
    return flat


def sweep_variant(config: dict) -> str:
    """A short stable hash of `variant_settings`: one sweep directory holds one variant."""
    return hashlib.sha256(_canonical(variant_settings(config)).encode()).hexdigest()[:12]


def run_name(config: dict) -> str:
    """A readable directory name: task, optimizer, batch size, lr, seed and the id."""
    lr = config["optimizer"]["lr"]
    branch = config.get("branch")
    origin = f"_from{branch['trunk_step']}" if branch else ""  # a branch run: the trunk step it starts from
    return (f"{config['task']['name']}_{config['optimizer']['name']}_B{config['batch_size']}"
            f"_lr{lr:.4g}_s{config['seed']}{origin}_{run_id(config)[:8]}")


def run_dir(sweep_dir: str | os.PathLike, config: dict) -> Path:
    return Path(sweep_dir) / RUNS_DIR / run_name(config)


def make_record(config: dict, status: Status, goals: list[GoalRecord], summary: Summary,
                curve: dict[str, list]) -> dict:
    """A record as it is written: the one place its layout is made. `config` is the run's
    complete settings (RunConfig.to_dict())."""
    return {
        "schema_version": SCHEMA_VERSION, "run_id": run_id(config), "run_name": run_name(config),
        "status": Status(status).value, "config": config,
        "goals": [dataclasses.asdict(goal) for goal in goals], "summary": dataclasses.asdict(summary),
        "curve": curve,
    }


def new_record(config: dict) -> dict:
    """The record of a run that starts now (status running, no goal reached yet)."""
    goals = [GoalRecord(metric=config["goals"]["metric"], threshold=t) for t in config["goals"]["thresholds"]]
    return make_record(config, Status.running, goals, Summary(), {})


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
    """Write `record` to `path` as JSON, atomically (see `write_atomically`)."""
    write_atomically(path, json.dumps(_json_safe(record), allow_nan=False).encode())


def write_atomically(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically: a reader sees the old file or the new one, never half.
    The file gets the permissions the umask gives (0644 under the usual 022, 0664 under 002), so
    lab-mates can read a sweep on shared scratch. A full disk raises OSError(ENOSPC), whose
    message says so, and leaves the old file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:  # not mkstemp: its files are 0600 whatever the umask
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RecordError(ValueError):
    """A record file that cannot be used: unreadable, torn, of an unknown schema, or with a field
    of the wrong type (the message names the file and the field)."""


class NotOwner(RuntimeError):
    """A writer that no longer owns its run (another job took the run over) tried to write the
    record; it is not written (sweeps/lease.py)."""


_NUMBER = (int, float)
_NUMBER_OR_NULL = {int, float, type(None)}


def _is_number(value) -> bool:
    return isinstance(value, _NUMBER) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _check(ok: bool, where: str, expected: str, value) -> None:
    if not ok:
        raise RecordError(f"{where}: expected {expected}, got {_type(value)}")


def _check_layout(record: dict) -> None:
    """What every record has, partial ones included: the top-level keys and their types."""
    missing = [k for k in ("run_id", "status", "config", "goals", "summary", "curve") if k not in record]
    if missing:
        raise RecordError(f"{', '.join(missing)}: missing key (record lacks {', '.join(missing)})")
    if record["status"] not in STATUSES:
        raise RecordError(f"status: unknown status {record['status']!r}; expected one of {STATUSES}")
    _check(isinstance(record["run_id"], str), "run_id", "a string", record["run_id"])
    for key, kind, name in (("config", dict, "an object"), ("goals", list, "a list of goals"),
                            ("summary", dict, "an object"), ("curve", dict, "an object of columns")):
        _check(isinstance(record[key], kind), key, name, record[key])
    if "run_name" in record:
        _check(isinstance(record["run_name"], str), "run_name", "a string", record["run_name"])


def _check_fields(values: dict, schema, where: str) -> None:
    """Each field of the schema dataclass that `values` holds fits its annotation (null allowed
    where the field has a default)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in values:
            _check(not required, f"{where}.{f.name}", describe(hints[f.name]), None)
            continue
        value = values[f.name]
        if value is None and not required:
            continue
        _check(matches(value, hints[f.name]), f"{where}.{f.name}", describe(hints[f.name]), value)


def _check_finished(record: dict) -> None:
    """Every field that the analysis and the launcher read, with its type (GoalRecord, Summary)."""
    config = record["config"]
    for section in ("task", "optimizer"):
        _check(isinstance(config.get(section), dict), f"config.{section}", "an object", config.get(section))
        name = config[section].get("name")
        _check(isinstance(name, str), f"config.{section}.name", "a string", name)
    lr = config["optimizer"].get("lr")
    _check(_is_number(lr), "config.optimizer.lr", "a number", lr)
    for key in ("batch_size", "seed"):
        _check(_is_int(config.get(key)), f"config.{key}", "an integer", config.get(key))
    for i, goal in enumerate(record["goals"]):
        _check(isinstance(goal, dict), f"goals[{i}]", "an object", goal)
        _check_fields(goal, GoalRecord, f"goals[{i}]")
    _check_fields(record["summary"], Summary, "summary")
    length = None
    for key, column in record["curve"].items():
        _check(isinstance(column, list), f"curve.{key}", "a list", column)
        if not {type(v) for v in column} <= _NUMBER_OR_NULL:
            bad = next(v for v in column if type(v) not in _NUMBER_OR_NULL)
            _check(False, f"curve.{key}", "a list of numbers or nulls", bad)
        if length is None:
            length = len(column)
        elif len(column) != length:
            raise RecordError(f"curve.{key}: has {len(column)} values, the curve's other columns {length}")


def read_record(path: str | os.PathLike) -> dict:
    """The record at `path`, checked against its schema: a partial (running) record for its
    layout, a finished one for every field the analysis and the launcher read (docs/records.md).
    Raises RecordError naming the file and the field."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: unreadable record ({exc})") from exc
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not a record (top level is {type(record).__name__})")
    version = record.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RecordError(f"{path}: schema_version {version!r}, this critbatch reads {SCHEMA_VERSION}")
    try:
        _check_layout(record)
        if Status(record["status"]).finished:
            _check_finished(record)
    except RecordError as exc:
        raise RecordError(f"{path}: {exc}") from None
    return record


def is_complete(path: str | os.PathLike) -> bool:
    """True when `path` holds a finished record that a relaunch must not recompute."""
    try:
        return Status(read_record(path)["status"]).complete
    except RecordError:
        return False


def iter_record_paths(sweep_dir: str | os.PathLike) -> Iterator[Path]:
    return iter(sorted(Path(sweep_dir).rglob(RECORD_FILE)))


def _current_variant(sweep_dir: Path) -> str | None:
    """The sweep variant that the directory's sweep.json (written by sweeps.launch) names, if any."""
    try:
        variant = json.loads((sweep_dir / SWEEP_FILE).read_text()).get("variant")
    except (OSError, ValueError, AttributeError):
        return None
    return variant if isinstance(variant, str) else None


def sweep_root(path: Path, given: Path) -> Path:
    """The sweep directory a record belongs to: the one that holds its runs/ folder, or `given`."""
    if path.parent.parent.name == RUNS_DIR and len(path.parents) > 2:
        return path.parents[2]
    return given


def _labels(roots: Sequence[Path]) -> dict[Path, str]:
    """A short unique name per sweep directory: its name, or where names repeat its path below
    the directories' common parent."""
    names = [root.name or str(root) for root in roots]
    if len(set(names)) == len(names):
        return dict(zip(roots, names))
    common = Path(os.path.commonpath([str(r.resolve()) for r in roots]))
    return {root: str(root.resolve().relative_to(common)) if root.resolve() != common else root.name
            for root in roots}


def _read_finished(sweep_dirs) -> tuple[list[tuple[Path, dict, str]], list[dict], list[str]]:
    """Finished records with the label of their sweep, the problems (partial or unreadable
    records, records of a variant other than the one its sweep.json names) named by path, and
    notes (a sweep directory without sweep.json whose records are of several variants)."""
    dirs = [Path(d) for d in ([sweep_dirs] if isinstance(sweep_dirs, (str, os.PathLike)) else sweep_dirs)]
    if not dirs:
        raise ValueError("load_sweep: give at least one sweep directory")
    found: list[tuple[Path, Path]] = []  # (record path, its sweep directory)
    for sweep_dir in dirs:
        if not sweep_dir.is_dir():
            raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
        found += [(path, sweep_root(path, sweep_dir)) for path in iter_record_paths(sweep_dir)]
    roots = list(dict.fromkeys([root for _, root in found] or dirs))
    labels = _labels(roots)
    variants = {root: _current_variant(root) for root in roots}
    finished, problems, seen = [], [], {}
    for path, root in found:
        try:
            record = read_record(path)
        except RecordError as exc:
            problems.append({"path": str(path), "problem": str(exc)})
            continue
        variant, current = sweep_variant(record["config"]), variants[root]
        if current is not None and variant != current:
            problems.append({"path": str(path), "problem": f"a run of sweep variant {variant}, "
                             f"not of the variant {current} that {SWEEP_FILE} names: not counted (another "
                             f"sweep's settings; see sweeps.launch's sweep.allow_new_variant)"})
            continue
        if not Status(record["status"]).finished:
            problems.append({"path": str(path), "problem": f"partial record (status {record['status']}): the job "
                             "was stopped or is still running; relaunch the sweep to finish it"})
            continue
        seen.setdefault(root, {}).setdefault(variant, record["config"])
        finished.append((path, record, labels[root]))
    notes = []
    for root, configs in seen.items():
        if len(configs) > 1:
            differ = _differing(list(configs.values()))
            notes.append(f"{root} holds runs of {len(configs)} sweep variants ({', '.join(configs)}) that differ in "
                         f"{', '.join(differ) or 'their settings'}: they are analysed apart (column variant), "
                         "never pooled; give each sweep its own directory")
    for problem in problems:
        warnings.warn(f"skipping {problem['path']}: {problem['problem']}", stacklevel=3)
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return finished, problems, notes


def _differing(configs: list[dict]) -> list[str]:
    """The variant settings (dotted keys) on which these run configs do not all agree."""
    settings = [variant_settings(c) for c in configs]
    keys = sorted(set().union(*settings))
    return [k for k in keys if len({_canonical(s.get(k)) for s in settings}) > 1]


def _settings(record: dict, path: Path, sweep: str) -> dict:
    config = record["config"]
    return {
        "sweep": sweep, "variant": sweep_variant(config),
        "run_id": record["run_id"], "run_name": record.get("run_name", path.parent.name),
        "run_dir": str(path.parent), "task": config["task"]["name"],
        "optimizer": config["optimizer"]["name"], "batch_size": int(config["batch_size"]),
        "lr": float(config["optimizer"]["lr"]), "seed": config.get("seed"), "status": record["status"],
        # the data where the task's name and options do not say it (Task.fingerprint), e.g. mnist-5k
        "dataset": (record["summary"].get("data") or {}).get("dataset"),
    }


def _num(value) -> float:
    return math.nan if value is None else float(value)


def load_sweep(sweep_dir: str | os.PathLike | Sequence[str | os.PathLike]):
    """All finished runs under one sweep directory (or several) as one row per (run, goal).

    Args:
        sweep_dir: a sweep directory (holding runs/*/record.json), a folder of several sweep
            directories, or a list of either, e.g. to compare two sweeps.

    Returns:
        A pandas DataFrame (columns: docs/records.md), with `sweep` (the name of the run's sweep
        directory, made unique where names repeat) and `variant` (records.sweep_variant: a hash
        of every setting but batch size, lr and seed) to tell experiments apart. Where a sweep's
        sweep.json names its variant, only runs of that variant are read. `attrs["problems"]`
        lists the records not read (partial, unreadable, another variant) with the reason, and
        `attrs["notes"]` the sweep directories whose runs are of several variants (each problem
        and note is also a warning).

    >>> import tempfile
    >>> from critbatch.train import train
    >>> sweep = tempfile.mkdtemp()
    >>> config = {"task": {"name": "digits", "hidden": 32}, "batch_size": 64, "device": "cpu",
    ...           "goals": {"metric": "train_error", "thresholds": [0.5, 0.2]}}
    >>> record = train(config)                     # a run of the sweep, written where sweeps put it
    >>> write_record(run_dir(sweep, record["config"]) / RECORD_FILE, record)
    >>> frame = load_sweep(sweep)
    >>> frame[["task", "batch_size", "lr", "goal", "reached"]].values.tolist()
    [['digits', 64, 0.1, 'train_error<=0.5', True], ['digits', 64, 0.1, 'train_error<=0.2', True]]
    >>> frame["variant"].iloc[0] == sweep_variant(record["config"])
    True
    """
    import pandas as pd

    finished, problems, notes = _read_finished(sweep_dir)
    rows = []
    for path, record, sweep in finished:
        settings = _settings(record, path, sweep)
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
    columns = ["sweep", "variant", "run_id", "run_name", "run_dir", "task", "dataset", "optimizer", "batch_size", "lr",
               "seed", "status", "goal_metric", "goal_threshold", "goal", "reached", "censored", "steps", "examples",
               "wall_time", *GOAL_NOISE_COLUMNS, *INIT_NOISE_COLUMNS, "total_steps", "total_examples"]
    frame = pd.DataFrame(rows, columns=columns)
    frame.attrs["problems"] = problems
    frame.attrs["notes"] = notes
    return frame


def load_curves(sweep_dir: str | os.PathLike | Sequence[str | os.PathLike]):
    """Every finished run's logged curve, one row per (run, logged step); see load_sweep."""
    import pandas as pd

    finished, problems, notes = _read_finished(sweep_dir)
    frames = []
    for path, record, sweep in finished:
        curve = pd.DataFrame(record["curve"])
        for key, value in _settings(record, path, sweep).items():
            curve[key] = value
        frames.append(curve)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    frame.attrs["problems"] = problems
    frame.attrs["notes"] = notes
    return frame


if __name__ == "__main__":  # python -m critbatch.records [DOC]: rewrite the schema tables of docs/records.md
    import sys

    doc = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/records.md")
    begin, end = "<!-- schema tables: python -m critbatch.records -->", "<!-- end of schema tables -->"
    text = doc.read_text()
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(f"{head}{begin}\n{schema_markdown()}{end}{tail}")
