"""The settings of one run, as plain values, checked before any training starts.

`RunConfig.from_dict` takes what a Hydra config (or a user) hands over as nested dicts, fills in
defaults and raises ConfigError naming the field, the value and what is allowed. Sweeps call it
for every point of a grid before submitting anything.

These dataclasses are the single source of the run settings, their types and their defaults:
sweeps/schema.py builds the launch's Hydra schema from them, and a run's identity
(records.run_id), the keys a sweep copies into every run (sweeps.grid) and what the members of a
pack share (critbatch.packed.pack_key) are derived from their fields. A field added here is typed,
defaulted, checked and part of the identity everywhere, unless it is named in NOT_IDENTITY.

Importing this module loads no torch (records and the analysis use it); the task and optimizer
registries are imported when a config is validated.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from critbatch.typecheck import describe, field_hints, matches

if TYPE_CHECKING:
    from critbatch.tasks import Task

SAMPLING = ("with_replacement", "epoch_shuffle")
DEVICES = ("auto", "cpu", "cuda")

#: Settings that do not change what a run computes (dora-style exclude list, as dotted paths):
#: every other field of RunConfig, including any added later, is part of a run's identity
#: (records.run_id), so a relaunch never takes a run trained with other settings for done.
#: Bookkeeping (log), where it ran (device, cuda_graphs: the same numbers up to float rounding)
#: and where the data and code live (data_dir, module: the task and optimizer names identify them).
NOT_IDENTITY = ("log", "device", "cuda_graphs", "task.data_dir", "task.module", "optimizer.module")
#: The axes of a sweep's grid: the runs of one sweep differ in these only (records.sweep_variant).
GRID_AXES = ("batch_size", "optimizer.lr", "seed")
#: What the members of one pack may differ in (critbatch.packed.pack_key): the rest they share.
PACK_AXES = ("optimizer.lr", "log")


class ConfigError(ValueError):
    """A run setting that is wrong; the message names the field and the allowed values."""


@dataclass
class OptimizerConfig:
    name: str = "sgd"              # a name in critbatch.optimizers.OPTIMIZERS
    lr: float = 0.1
    momentum: float = 0.9          # used by "momentum"
    betas: tuple[float, float] = (0.9, 0.999)  # used by "adam"
    eps: float = 1e-8              # used by "adam"
    weight_decay: float = 0.0
    # Your own module that registers the optimizer (critbatch.optimizers.register_optimizer),
    # imported before it is looked up, e.g. "mypkg.optimizers". Not part of the run's identity.
    module: str | None = None


@dataclass
class GoalsConfig:
    metric: str = "train_error"
    thresholds: list[float] = field(default_factory=lambda: [0.2, 0.1, 0.05])


@dataclass
class BudgetConfig:
    max_steps: int | None = 20_000
    max_examples: int | None = None
    max_seconds: float | None = None


@dataclass
class NoiseScaleConfig:
    every: int = 10            # measure on every n-th step (bounded cost)
    micro_batches: int = 4     # B_small = B / micro_batches, B_big = B
    # The estimate is averaged over a window of this fraction of the steps so far (at least
    # smoothing.min_examples examples), so that at a goal it is the noise scale of the parameters
    # that reached it, in a short run as in a long one.
    relative_window: float = 0.1
    min_examples: int = 512    # ... and never fewer examples than this
    # Probes: B_simple (and B_noise) at initialisation and at each goal, measured at fixed
    # parameters (at a goal: the kept parameters nearest its crossing) on batches of their own of
    # max(B, probe_batch_size) examples, drawn with replacement, until the standard error is below
    # probe_precision of the value, on at most probe_batches batches (200 at initialisation); 0
    # probe_batches: a goal takes the window's estimate when it is noticed.
    probe_batch_size: int = 512
    probe_precision: float = 0.03
    probe_batches: int = 32
    # B_noise = tr(H Sigma)/(G^T H G) from Hessian-vector products (critbatch.curvature) on the
    # batch of a B_simple measurement at most every `every` x hessian_every steps (0: never; needs
    # micro_batches >= 3), and at a goal on at most hessian_probe_batches probe batches (0: none;
    # the window's estimate is far off at goals, docs/noise_scales.md). Each costs about 3 plain steps, and B_noise needs hundreds of batches to
    # be resolved: the defaults keep its cost a few % and leave it rough (docs/noise_scales.md).
    # null: DEFAULT_HESSIAN_EVERY where B_noise can be measured and never where it cannot (BatchNorm,
    # fewer than 3 micro-batches), so one sweep can span such runs; a number where it cannot is refused.
    hessian_every: int | None = None
    hessian_probe_batches: int = 0
    # null: B_noise is measured on the measuring step's own micro-batches (B/k examples each,
    # no extra data). A number m: on batches of its own, k micro-batches of m examples drawn with
    # replacement. The two-batch estimate is most precise per example at m near B_noise, so a run
    # at B/k << B_noise buys precision with it. hessian_draws such batches per measurement (their
    # forms averaged): where few Hessian directions dominate, one measurement's spread does not
    # shrink with m (linreg: ~1.5x the value), only with more draws.
    hessian_micro_batch: int | None = None
    hessian_draws: int = 1
    enabled: bool = True


@dataclass
class SmoothingConfig:
    # The metrics that goals use are EMAs whose window is `relative_window` of the steps taken so
    # far (so a goal's step is resolved to a few % at any B), but never fewer than `min_examples`
    # examples (so small batches are not judged on one noisy batch). A goal met already when the
    # first window fills is recorded as censored: its step is not known.
    relative_window: float = 0.05
    min_examples: int = 512
    # Goal metrics that are evaluated rather than measured on the training batches (linreg's exact
    # loss, the clean training error) are evaluated at steps this far apart and smoothed alike.
    eval_relative_interval: float = 0.01


@dataclass
class DivergenceConfig:
    loss_ratio: float = 10.0   # diverged when the smoothed loss exceeds this multiple of the initial loss
    # (the initial model's mean loss over smoothing.min_examples examples, not one noisy batch)
    # Stalled (stopped, treated like diverged) when, after stall_steps steps, neither the smoothed
    # loss nor the smoothed goal metric improved by stall_improvement (relative) over the last half
    # of the run: e.g. stuck at chance after too large an lr. 0 steps: never.
    stall_steps: int = 1000
    stall_improvement: float = 0.01


@dataclass
class LogConfig:
    relative_interval: float = 0.05  # curve points at geometrically spaced steps, this far apart
    checkpoint_seconds: float = 30.0  # rewrite the (partial) record at most this often


@dataclass
class RunConfig:
    task: dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch_size: int = 32
    seed: int = 0
    goals: GoalsConfig = field(default_factory=GoalsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    sampling: str = "with_replacement"
    noise_scale: NoiseScaleConfig = field(default_factory=NoiseScaleConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    log: LogConfig = field(default_factory=LogConfig)
    device: str = "auto"
    # Replay each training step from a CUDA graph (critbatch.cuda_graphs): auto = on CUDA devices.
    cuda_graphs: bool | str = "auto"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """The run settings from nested dicts (missing keys take their defaults), checked: an
        unknown key, a value of the wrong type or out of range raises ConfigError naming it."""
        if "task" in values and (not isinstance(values["task"], dict) or "name" not in values["task"]):
            raise ConfigError(f"task must be a mapping with a 'name' (a registered task), got {values['task']!r}")
        config = settings_from_dict(cls, dict(values))
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def _check_curvature(self, task: Task) -> None:
        refusal = _curvature_refusal(self, task)
        if refusal:
            raise ConfigError(refusal)

    def build_task(self) -> Task:
        from critbatch.tasks import TaskError, build_task

        options = {k: v for k, v in self.task.items() if k != "name"}
        try:
            return build_task(self.task.get("name"), **options)
        except TaskError as exc:
            raise ConfigError(str(exc)) from exc

    def validate(self, check_data: bool = False) -> Task:
        """Raise ConfigError on the first bad field; return the (unloaded) task."""
        from critbatch.optimizers import OptimizerError, get_optimizer
        from critbatch.tasks import TASKS

        if not isinstance(self.task, dict) or "name" not in self.task:
            raise ConfigError(f"task must be a mapping with a 'name' (one of {sorted(TASKS)}), got {self.task!r}")
        task = self.build_task()
        opt = self.optimizer
        try:
            get_optimizer(opt.name, opt.module)
        except OptimizerError as exc:
            raise ConfigError(str(exc)) from exc
        if not _is_number(opt.lr) or not math.isfinite(opt.lr) or opt.lr <= 0:
            raise ConfigError(f"optimizer.lr={opt.lr!r} must be a finite number > 0")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size!r} must be an integer > 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed={self.seed!r} must be an integer")
        if self.sampling not in SAMPLING:
            raise ConfigError(f"sampling={self.sampling!r} is not supported; choose one of {SAMPLING}")
        size = task.dataset_size
        if self.sampling == "epoch_shuffle" and size is not None and self.batch_size > size:
            raise ConfigError(f"batch_size={self.batch_size} exceeds task {self.task['name']!r}'s "
                              f"{size} training examples, which epoch_shuffle samples without replacement")
        if self.goals.metric not in task.goal_metrics:
            raise ConfigError(f"goals.metric={self.goals.metric!r} is not produced by task "
                              f"{self.task['name']!r}; choose one of {list(task.goal_metrics)}")
        thresholds = self.goals.thresholds
        if (not isinstance(thresholds, list) or not thresholds
                or not all(_is_number(t) and math.isfinite(t) for t in thresholds)):
            raise ConfigError(f"goals.thresholds={thresholds!r} must be a non-empty list of finite numbers")
        if any(b >= a for a, b in zip(thresholds, thresholds[1:])):
            raise ConfigError(f"goals.thresholds={thresholds!r} must be strictly decreasing "
                              "(easiest goal first, each goal is 'metric <= threshold')")
        budget = self.budget
        for name in ("max_steps", "max_examples", "max_seconds"):
            value = getattr(budget, name)
            if value is not None and (not _is_number(value) or value <= 0):
                raise ConfigError(f"budget.{name}={value!r} must be > 0 or null")
        if budget.max_steps is None and budget.max_examples is None and budget.max_seconds is None:
            raise ConfigError("budget: set at least one of max_steps, max_examples, max_seconds")
        ns = self.noise_scale
        if not isinstance(ns.enabled, bool):
            raise ConfigError(f"noise_scale.enabled={ns.enabled!r} must be true or false")
        for name in ("every", "micro_batches", "probe_batch_size", "min_examples", "probe_batches", "hessian_every",
                     "hessian_probe_batches", "hessian_micro_batch", "hessian_draws"):
            value = getattr(ns, name)
            if name in ("hessian_every", "hessian_micro_batch") and value is None:
                continue
            least = {"micro_batches": 2, "min_examples": 0, "probe_batches": 0, "hessian_every": 0,
                     "hessian_probe_batches": 0}.get(name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"noise_scale.{name}={value!r} must be an integer >= {least}")
        if ns.enabled and ns.micro_batches > self.batch_size:
            raise ConfigError(f"noise_scale.micro_batches={ns.micro_batches} exceeds batch_size={self.batch_size}: "
                              "the noise scale needs at least two micro-batches of one example or more; "
                              "lower micro_batches, raise the batch size or set noise_scale.enabled=false")
        if ns.enabled and ns.hessian_every:
            self._check_curvature(task)
        if ns.hessian_draws > 1 and ns.hessian_micro_batch is None:
            raise ConfigError(f"noise_scale.hessian_draws={ns.hessian_draws} draws batches of their own for B_noise, "
                              "of noise_scale.hessian_micro_batch examples per micro-batch, which is null: set it "
                              "(e.g. near the B_noise you expect) or leave hessian_draws at 1")
        for name, upper in (("relative_window", 1.0), ("probe_precision", 1.0)):
            value = getattr(ns, name)
            if not _is_number(value) or not 0 < value <= upper:
                raise ConfigError(f"noise_scale.{name}={value!r} must lie in (0, {upper:g}]")
        smoothing = self.smoothing
        if not _is_number(smoothing.relative_window) or not 0 < smoothing.relative_window <= 1:
            raise ConfigError(f"smoothing.relative_window={smoothing.relative_window!r} must lie in (0, 1]")
        if not _is_number(smoothing.min_examples) or smoothing.min_examples < 0:
            raise ConfigError(f"smoothing.min_examples={smoothing.min_examples!r} must be a number >= 0")
        if not _is_number(smoothing.eval_relative_interval) or not 0 <= smoothing.eval_relative_interval <= 1:
            raise ConfigError(f"smoothing.eval_relative_interval={smoothing.eval_relative_interval!r} "
                              "must lie in [0, 1] (0 evaluates at every step)")
        div = self.divergence
        if not _is_number(div.loss_ratio) or not div.loss_ratio > 1:
            raise ConfigError(f"divergence.loss_ratio={div.loss_ratio!r} must be a number > 1")
        if not isinstance(div.stall_steps, int) or isinstance(div.stall_steps, bool) or div.stall_steps < 0:
            raise ConfigError(f"divergence.stall_steps={div.stall_steps!r} must be an integer >= 0 (0: never stall)")
        if not _is_number(div.stall_improvement) or not 0 < div.stall_improvement < 1:
            raise ConfigError(f"divergence.stall_improvement={div.stall_improvement!r} must lie in (0, 1)")
        if not 0 <= self.log.relative_interval <= 1:
            raise ConfigError(f"log.relative_interval={self.log.relative_interval} must lie in [0, 1] (0 logs every step)")
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r}; choose one of {DEVICES}")
        if self.cuda_graphs not in (True, False, "auto"):
            raise ConfigError(f"cuda_graphs={self.cuda_graphs!r}; choose true, false or auto")
        if self.cuda_graphs is True and self.device == "cpu":
            raise ConfigError("cuda_graphs=true needs device=cuda or auto, not device=cpu")
        if check_data:
            from critbatch.tasks import TaskError

            try:
                task.check_data()
            except TaskError as exc:
                raise ConfigError(str(exc)) from exc
        return task


DEFAULT_HESSIAN_EVERY = 10


def hessian_interval(config: "RunConfig", task: Task) -> int:
    """How many B_simple measurements apart B_noise is measured (0: never), with
    noise_scale.hessian_every=null resolved for this run's model and batch size."""
    ns = config.noise_scale
    if ns.hessian_every is not None:
        return ns.hessian_every
    return 0 if _curvature_refusal(config, task) else DEFAULT_HESSIAN_EVERY


def _curvature_refusal(config: "RunConfig", task: Task) -> str | None:
    """Why B_noise cannot be measured for this run (None: it can)."""
    import torch

    from critbatch.gns import noise_micro_batches

    ns = config.noise_scale
    k = noise_micro_batches(config.batch_size, ns.micro_batches)
    if k < 3:
        return (f"noise_scale.hessian_every={ns.hessian_every} measures B_noise on micro-batches, which needs at "
                f"least 3 of them, but batch_size={config.batch_size} with noise_scale.micro_batches="
                f"{ns.micro_batches} gives {k}: raise micro_batches (or B), or set noise_scale.hessian_every=0")
    with torch.device("meta"):  # the architecture only: no data, no memory
        model = task.make_model()
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return (f"noise_scale.hessian_every={ns.hessian_every}: B_noise is not measured for models with "
                f"BatchNorm (task {config.task.get('name')!r}): set noise_scale.hessian_every=0")
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def settings_from_dict(cls, values, prefix: str = ""):
    """An instance of the settings dataclass `cls` from nested dicts: each key must be a field
    (an unknown key raises ConfigError naming it, with the closest known ones), each value must
    fit the field's annotation (critbatch.typecheck), and nested dataclass fields are read the same
    way; missing keys take the dataclass's defaults. Works for any settings dataclass, so a field
    added to one is checked without more code. `prefix` names where `values` sit ("optimizer.")."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = dataclasses.asdict(values)
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = field_hints(cls)
    unknown = sorted(str(key) for key in set(values) - set(hints))
    if unknown:
        near = {u: difflib.get_close_matches(u, list(hints), n=1, cutoff=0.6) for u in unknown}
        hint = "; ".join(f"{prefix}{u}: did you mean {prefix}{m[0]}?" for u, m in near.items() if m)
        raise ConfigError(f"unknown setting(s) {[prefix + u for u in unknown]}" + (f" ({hint})" if hint else "")
                          + f"; known: {[prefix + k for k in hints]}")
    kwargs = {}
    for name, value in values.items():
        hint, key = hints[name], prefix + name
        section = _section(hint)
        if section is not None and not (value is None and section is not hint):  # (an optional section may be null)
            value = settings_from_dict(section, value, f"{key}.")
        elif not matches(value, hint):
            if value == "???":
                raise ConfigError(f"{key} is not set (???): give it a value")
            raise ConfigError(f"{key}={value!r} must be {describe(hint)}")
        elif isinstance(value, (list, tuple)):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        kwargs[name] = value
    return cls(**kwargs)


def _section(hint):
    """The settings dataclass a field holds (`Section` or `Section | None`), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


def without(values: dict, paths) -> dict:
    """A copy of the nested dict `values` without the dotted `paths` (absent ones are ignored)."""
    out = dict(values)
    for path in paths:
        head, _, rest = path.partition(".")
        if not rest:
            out.pop(head, None)
        elif isinstance(out.get(head), dict):
            out[head] = without(out[head], [rest])
    return out


def identity_settings(config: dict) -> dict:
    """The settings of a run config (RunConfig.to_dict()) that make it the run it is: every
    top-level field of RunConfig (one that is absent counts as null), less NOT_IDENTITY."""
    top = [name for name in field_hints(RunConfig) if name not in NOT_IDENTITY]
    return without({name: config.get(name) for name in top}, NOT_IDENTITY)


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
