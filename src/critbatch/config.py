"""The settings of one run, typed and checked once, before any training starts.

`RunConfig.from_dict` takes what a Hydra config (or a user) hands over as nested dicts, fills in
defaults (a task's from its constructor), checks every field and returns a frozen RunConfig: the
object that travels from the grid (sweeps.grid) through the job (sweeps.jobs) to the training
loop and its step, never parsed again. A bad value raises ConfigError naming the field, the value
and what is allowed.

These dataclasses are the single source of the run settings, their types, ranges and defaults:
sweeps/schema.py builds the launch's Hydra schema from them, and a run's identity
(records.run_id), the keys a sweep copies into every run (sweeps.grid) and what the members of a
pack share (critbatch.packed.pack_key) are derived from their fields. A field added here is typed,
defaulted, checked and part of the identity everywhere, unless it is named in NOT_IDENTITY.

Importing this module loads no torch (records and the analysis use it); the task and optimizer
registries are imported when a config is parsed.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from critbatch.typecheck import describe, field_hints, matches

if TYPE_CHECKING:
    from critbatch.tasks import Task


class Sampling(str, enum.Enum):
    """How a run draws its batches."""
    with_replacement = "with_replacement"   # i.i.d. examples, as the paper's theory assumes
    epoch_shuffle = "epoch_shuffle"         # every example once per epoch, in a fresh order


class Device(str, enum.Enum):
    auto = "auto"   # a CUDA device when torch sees one, else the CPU
    cpu = "cpu"
    cuda = "cuda"


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

#: The run's independent random streams besides training's own (`seed`): each is seeded with
#: seed + its offset (rank r > 0 of a data-parallel run: its dropout stream, seed + offset + r). They are part of what `seed` means (a fixed function of it), not settings.
SEED_OFFSETS = {"initial_loss": 7_919, "hessian_batches": 31_337, "probe": 104_729, "ranks": 611_953}


class ConfigError(ValueError):
    """A run setting that is wrong; the message names the field and the allowed values."""


class UnknownSetting(ConfigError):
    """A key that no settings dataclass has (a typo, or a setting in the wrong place)."""


@dataclass(frozen=True)
class Range:
    """The values a number may take: low/high bounds (None: unbounded), open or closed."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def ranged(default, low=None, high=None, *, low_open: bool = False, high_open: bool = False):
    """A settings field whose value must lie in a range (None passes where the type allows it)."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open)})


POSITIVE = {"low": 0, "low_open": True}


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"              # a name in critbatch.optimizers.OPTIMIZERS
    lr: float = ranged(0.1, **POSITIVE)
    momentum: float = ranged(0.9, 0, 1, high_open=True)   # used by "momentum"
    betas: tuple[float, float] = (0.9, 0.999)             # used by "adam"
    eps: float = ranged(1e-8, **POSITIVE)                 # used by "adam"
    weight_decay: float = ranged(0.0, 0)
    # Your own module that registers the optimizer (critbatch.optimizers.register_optimizer),
    # imported before it is looked up, e.g. "mypkg.optimizers". Not part of the run's identity.
    module: str | None = None


@dataclass(frozen=True)
class GoalsConfig:
    metric: str = "train_error"
    thresholds: list[float] = field(default_factory=lambda: [0.2, 0.1, 0.05])


@dataclass(frozen=True)
class BudgetConfig:
    max_steps: int | None = ranged(20_000, 1)
    max_examples: int | None = ranged(None, 1)
    max_seconds: float | None = ranged(None, **POSITIVE)


@dataclass(frozen=True)
class NoiseScaleConfig:
    enabled: bool = True
    every: int = ranged(10, 1)             # measure B_simple on every n-th step (bounded cost)
    # B_small = B/k, B_big = B, with k the largest divisor of B up to micro_batches: a number at
    # least as large as every B of a sweep measures per-example norms (k = B) at each of them
    micro_batches: int = ranged(4, 2)
    # The estimate is averaged over a window of this fraction of the steps so far (at least
    # min_examples examples), so that at a goal it is the noise scale of the parameters that
    # reached it, in a short run as in a long one.
    relative_window: float = ranged(0.1, 0, 1, low_open=True)
    min_examples: int = ranged(512, 0)
    # ... and measured more often than `every` while the window would hold fewer measurements
    min_per_window: int = ranged(4, 1)
    # Probes: B_simple (and B_noise) at initialisation and at each goal, measured at fixed
    # parameters (at a goal: the kept parameters nearest its crossing, of at most probe_snapshots
    # kept) on batches of their own of max(B, probe_batch_size) examples drawn with replacement,
    # until the standard error is below probe_precision of the value, on at most probe_batches
    # batches (init_probe_batches at initialisation); probe_batches 0: a goal takes the window's
    # estimate when it is noticed.
    probe_batch_size: int = ranged(512, 1)
    probe_precision: float = ranged(0.03, 0, 1, low_open=True)
    probe_batches: int = ranged(32, 0)
    init_probe_batches: int = ranged(200, 1)
    probe_snapshots: int = ranged(32, 1)
    # B_noise = tr(H Sigma)/(G^T H G) from Hessian-vector products (critbatch.curvature) on the
    # batch of every hessian_every-th B_simple measurement (0: never), wherever it can be measured:
    # models without BatchNorm, with at least 3 micro-batches. A run where it cannot skips it and
    # its record says why (summary.b_noise_skipped). Each costs about 3 plain steps.
    hessian_every: int = ranged(10, 0)
    # ... and in the probes: at most hessian_probe_batches batches at a goal (0: none; the goal
    # keeps no B_noise then) and init_hessian_probe_batches at initialisation
    hessian_probe_batches: int = ranged(0, 0)
    init_hessian_probe_batches: int = ranged(64, 0)
    # null: on the measuring step's own micro-batches (B/k examples each, no extra data). A number
    # m: on batches of their own, k micro-batches of m examples drawn with replacement (the
    # estimate is most precise per example at m near B_noise), hessian_draws of them per
    # measurement, their forms averaged. A probe's micro-batches hold at most
    # max_hessian_micro_batch examples.
    hessian_micro_batch: int | None = ranged(None, 1)
    hessian_draws: int = ranged(1, 1)
    max_hessian_micro_batch: int = ranged(4096, 1)


@dataclass(frozen=True)
class SmoothingConfig:
    # The metrics that goals use are EMAs whose window is `relative_window` of the steps taken so
    # far (so a goal's step is resolved to a few % at any B), but never fewer than `min_examples`
    # examples (so small batches are not judged on one noisy batch). A goal met already when the
    # first window fills is recorded as censored: its step is not known.
    relative_window: float = ranged(0.05, 0, 1, low_open=True)
    min_examples: int = ranged(512, 0)
    # Goal metrics that are evaluated rather than measured on the training batches (linreg's exact
    # loss, the clean training error) are evaluated at steps this far apart and smoothed alike
    # (0: every step).
    eval_relative_interval: float = ranged(0.01, 0, 1)


@dataclass(frozen=True)
class DivergenceConfig:
    # diverged when the smoothed loss exceeds this multiple of the initial loss (the initial
    # model's mean loss over smoothing.min_examples examples, not one noisy batch)
    loss_ratio: float = ranged(10.0, 1, low_open=True)
    # Stalled (stopped, treated like diverged) when, after stall_steps steps, neither the smoothed
    # loss nor the smoothed goal metric improved by stall_improvement (relative) over the last half
    # of the run: e.g. stuck at chance after too large an lr. 0 steps: never.
    stall_steps: int = ranged(1000, 0)
    stall_improvement: float = ranged(0.01, 0, 1, low_open=True, high_open=True)


@dataclass(frozen=True)
class LogConfig:
    relative_interval: float = ranged(0.05, 0, 1)       # curve points at geometric steps this far apart (0: every step)
    checkpoint_seconds: float = ranged(30.0, 0)   # save the state and the partial record at most this often
    # A trunk of branch runs (critbatch.branches) saves its step's state (parameters, optimizer)
    # at these steps, and where it first meets each goal when states_at_goals
    states_at_steps: list[int] = field(default_factory=list)
    states_at_goals: bool = False


@dataclass(frozen=True)
class BranchConfig:
    """A branch run (Merrill et al. 2025): it starts from the state its trunk saved at step
    trunk_step (critbatch.branches), at `multiplier` times the trunk's batch size. The trunk is
    named by its run name (task, optimizer, batch size, lr, seed and its id), and its state lies
    in the trunk's run directory beside the branch's, so the branch's identity holds its trunk's."""
    trunk: str = ""
    trunk_step: int = ranged(0, 0)
    multiplier: int = ranged(1, 1)


@dataclass(frozen=True)
class RunConfig:
    task: dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch_size: int = ranged(32, 1)
    seed: int = 0
    goals: GoalsConfig = field(default_factory=GoalsConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    sampling: Sampling = Sampling.with_replacement
    noise_scale: NoiseScaleConfig = field(default_factory=NoiseScaleConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    log: LogConfig = field(default_factory=LogConfig)
    device: Device = Device.auto
    # Replay each training step from a CUDA graph (critbatch.cuda_graphs): auto = on CUDA devices.
    cuda_graphs: bool | str = "auto"
    # A branch run's origin (null: a run from initialisation)
    branch: BranchConfig | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any] | RunConfig) -> RunConfig:
        """The run settings from nested dicts (missing keys take their defaults, a task's options
        its constructor's), checked: an unknown key, a value of the wrong type or out of range
        raises ConfigError naming it. A RunConfig is returned as it is (it was checked)."""
        if isinstance(values, RunConfig):
            return values
        if "task" in values and (not isinstance(values["task"], dict) or "name" not in values["task"]):
            raise ConfigError(f"task must be a mapping with a 'name' (a registered task), got {values['task']!r}")
        from critbatch.tasks import task_options

        config = settings_from_dict(cls, dict(values))
        task = config.validate()
        # the task's defaults from its constructor, the one place they live: part of the identity
        return dataclasses.replace(config, task={"name": task.name, **task_options(task.name), **config.task})

    def to_dict(self) -> dict[str, Any]:
        return to_plain_values(dataclasses.asdict(self))

    def build_task(self) -> Task:
        from critbatch.tasks import TaskError, build_task

        options = {k: v for k, v in self.task.items() if k != "name"}
        try:
            return build_task(self.task.get("name"), **options)
        except TaskError as exc:
            raise ConfigError(str(exc)) from exc

    def validate(self, check_data: bool = False) -> Task:
        """Check what involves more than one field or the registries (each field's type and
        range were checked when parsed); return the (unloaded) task."""
        from critbatch.optimizers import OptimizerError, get_optimizer

        task = self.build_task()
        opt = self.optimizer
        try:
            get_optimizer(opt.name, opt.module)
        except OptimizerError as exc:
            raise ConfigError(str(exc)) from exc
        if not math.isfinite(opt.lr):
            raise ConfigError(f"optimizer.lr={opt.lr!r} must be a finite number > 0")
        size = task.dataset_size
        if self.sampling is Sampling.epoch_shuffle and size is not None and self.batch_size > size:
            raise ConfigError(f"batch_size={self.batch_size} exceeds task {self.task['name']!r}'s "
                              f"{size} training examples, which epoch_shuffle samples without replacement")
        if self.goals.metric not in task.goal_metrics:
            raise ConfigError(f"goals.metric={self.goals.metric!r} is not produced by task "
                              f"{self.task['name']!r}; choose one of {list(task.goal_metrics)}")
        thresholds = self.goals.thresholds
        if not thresholds or not all(math.isfinite(t) for t in thresholds):
            raise ConfigError(f"goals.thresholds={thresholds!r} must be a non-empty list of finite numbers")
        if any(b >= a for a, b in zip(thresholds, thresholds[1:])):
            raise ConfigError(f"goals.thresholds={thresholds!r} must be strictly decreasing "
                              "(easiest goal first, each goal is 'metric <= threshold')")
        budget = self.budget
        if budget.max_steps is None and budget.max_examples is None and budget.max_seconds is None:
            raise ConfigError("budget: set at least one of max_steps, max_examples, max_seconds")
        ns = self.noise_scale
        if ns.enabled and self.batch_size < 2:
            raise ConfigError(f"batch_size={self.batch_size} cannot measure the noise scale, which needs at least two "
                              "micro-batches of one example or more: raise the batch size or set "
                              "noise_scale.enabled=false")
        if ns.hessian_draws > 1 and ns.hessian_micro_batch is None:
            raise ConfigError(f"noise_scale.hessian_draws={ns.hessian_draws} draws batches of their own for B_noise, "
                              "of noise_scale.hessian_micro_batch examples per micro-batch, which is null: set it "
                              "(e.g. near the B_noise you expect) or leave hessian_draws at 1")
        if self.branch is not None:
            if not self.branch.trunk:
                raise ConfigError("branch.trunk is empty: name the trunk run (its run name) the branch starts from")
            if self.batch_size % self.branch.multiplier:
                raise ConfigError(f"batch_size={self.batch_size} is not a multiple of branch.multiplier="
                                  f"{self.branch.multiplier}: a branch trains at multiplier x its trunk's batch size")
        if any(step < 0 for step in self.log.states_at_steps):
            raise ConfigError(f"log.states_at_steps={self.log.states_at_steps!r} must be steps >= 0")
        check_auto_or_bool("cuda_graphs", self.cuda_graphs)
        if self.cuda_graphs is True and self.device is Device.cpu:
            raise ConfigError("cuda_graphs=true needs device=cuda or auto, not device=cpu")
        if check_data:
            from critbatch.tasks import TaskError

            try:
                task.check_data()
            except TaskError as exc:
                raise ConfigError(str(exc)) from exc
        return task


def check_auto_or_bool(name: str, value) -> None:
    """Settings that are on, off, or decided where the run happens (auto)."""
    if value not in (True, False, "auto"):
        raise ConfigError(f"{name}={value!r}; choose true, false or auto")


def curvature_unsupported(config: RunConfig, task: Task) -> str | None:
    """Why B_noise cannot be measured in this run (None: it can)."""
    import torch

    from critbatch.gns import noise_micro_batches
    from critbatch.micro_grads import has_batchnorm

    ns = config.noise_scale
    k = noise_micro_batches(config.batch_size, ns.micro_batches)
    if k < 3:
        return (f"B_noise is measured on micro-batches and needs at least 3 of them; batch_size={config.batch_size} "
                f"with noise_scale.micro_batches={ns.micro_batches} gives {k}")
    with torch.device("meta"):  # the architecture only: no data, no memory
        if has_batchnorm(task.make_model()):
            return f"B_noise is not measured for models with BatchNorm (task {config.task.get('name')!r})"
    return None


def settings_from_dict(cls, values, prefix: str = ""):
    """An instance of the settings dataclass `cls` from nested dicts: each key must be a field
    (an unknown key raises ConfigError naming it, with the closest known ones), each value must
    fit the field's annotation (critbatch.typecheck) and range (`ranged`), and nested dataclass
    fields are read the same way; missing keys take the dataclass's defaults. Works for any
    settings dataclass, so a field added to one is checked without more code. `prefix` names
    where `values` sit ("optimizer.")."""
    if dataclasses.is_dataclass(values) and not isinstance(values, type):
        values = {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = field_hints(cls)
    unknown = sorted(str(key) for key in set(values) - set(hints))
    if unknown:
        near = {u: difflib.get_close_matches(u, list(hints), n=1, cutoff=0.6) for u in unknown}
        hint = "; ".join(f"{prefix}{u}: did you mean {prefix}{m[0]}?" for u, m in near.items() if m)
        raise UnknownSetting(f"unknown setting(s) {[prefix + u for u in unknown]}" + (f" ({hint})" if hint else "")
                          + f"; known: {[prefix + k for k in hints]}")
    ranges = {f.name: f.metadata.get("range") for f in dataclasses.fields(cls)}
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
        elif isinstance(hint, type) and issubclass(hint, enum.Enum):
            value = hint(value)
        elif isinstance(value, (list, tuple)):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        if ranges[name] is not None and value is not None and not ranges[name].admits(value):
            raise ConfigError(f"{key}={value!r} must be {describe(hint).replace(' or null', '')} {ranges[name]}")
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
    top-level field of RunConfig (one that is absent counts as null), less NOT_IDENTITY. An
    optional section that is null by default (`branch`) counts only where set, so adding one
    keeps the identities of the runs recorded before it."""
    optional = {f.name for f in dataclasses.fields(RunConfig) if f.default is None}
    top = [name for name in field_hints(RunConfig) if name not in NOT_IDENTITY
           and not (name in optional and config.get(name) is None)]
    return without({name: config.get(name) for name in top}, NOT_IDENTITY)


def to_plain_values(value):
    """Settings as JSON-ready values: enums as their values, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: to_plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain_values(v) for v in value]
    return value
