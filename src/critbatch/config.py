"""The settings of one run, as plain values, checked before any training starts.

`RunConfig.from_dict` takes what a Hydra config (or a user) hands over as nested dicts, fills in
defaults and raises ConfigError naming the field, the value and what is allowed. Sweeps call it
for every point of a grid before submitting anything.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from critbatch.tasks import TASKS, Task, TaskError, build_task

OPTIMIZERS = ("sgd", "momentum", "adam")
SAMPLING = ("with_replacement", "epoch_shuffle")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A run setting that is wrong; the message names the field and the allowed values."""


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9          # used by "momentum"
    betas: tuple[float, float] = (0.9, 0.999)  # used by "adam"
    eps: float = 1e-8              # used by "adam"
    weight_decay: float = 0.0


@dataclass
class GoalsConfig:
    metric: str = "train_error"
    thresholds: list[float] = field(default_factory=lambda: [0.2, 0.1, 0.05])


@dataclass
class BudgetConfig:
    max_steps: int | None = 100_000
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
    # B_simple at initialisation: measured before training on batches of init_batch_size (or B if
    # larger), until its standard error is below init_precision of it (at most INIT_MAX_BATCHES).
    init_batch_size: int = 512
    init_precision: float = 0.03
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
        config = _from_dict(cls, dict(values), "")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def build_task(self) -> Task:
        options = {k: v for k, v in self.task.items() if k != "name"}
        try:
            return build_task(self.task.get("name"), **options)
        except TaskError as exc:
            raise ConfigError(str(exc)) from exc

    def validate(self, check_data: bool = False) -> Task:
        """Raise ConfigError on the first bad field; return the (unloaded) task."""
        if not isinstance(self.task, dict) or "name" not in self.task:
            raise ConfigError(f"task must be a mapping with a 'name' (one of {sorted(TASKS)}), got {self.task!r}")
        task = self.build_task()
        opt = self.optimizer
        if opt.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name={opt.name!r} is not supported; choose one of {OPTIMIZERS}")
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
        for name in ("every", "micro_batches", "init_batch_size", "min_examples"):
            value = getattr(ns, name)
            least = {"micro_batches": 2, "min_examples": 0}.get(name, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"noise_scale.{name}={value!r} must be an integer >= {least}")
        if ns.enabled and ns.micro_batches > self.batch_size:
            raise ConfigError(f"noise_scale.micro_batches={ns.micro_batches} exceeds batch_size={self.batch_size}: "
                              "the noise scale needs at least two micro-batches of one example or more; "
                              "lower micro_batches, raise the batch size or set noise_scale.enabled=false")
        for name, upper in (("relative_window", 1.0), ("init_precision", 1.0)):
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
            try:
                task.check_data()
            except TaskError as exc:
                raise ConfigError(str(exc)) from exc
        return task


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The nested sections of RunConfig, by the annotation string their fields carry.
_SECTIONS = {section.__name__: section for section in (OptimizerConfig, GoalsConfig, BudgetConfig, NoiseScaleConfig,
                                                       SmoothingConfig, DivergenceConfig, LogConfig)}


def _from_dict(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting(s) {[prefix + u for u in unknown]}; "
                          f"known: {[prefix + k for k in fields]}")
    kwargs = {}
    for name, value in values.items():
        sub = _SECTIONS.get(fields[name].type)
        if sub is not None:
            value = _from_dict(sub, dict(value) if isinstance(value, dict) else value, f"{prefix}{name}.")
        elif name == "thresholds":
            value = list(value) if isinstance(value, (list, tuple)) else value
        kwargs[name] = value
    return cls(**kwargs)


def _to_plain(value):
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
