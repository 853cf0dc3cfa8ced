"""Expand a sweep config into runs and groups of runs, and check every run before anything is queued.

Plain values in, plain values out (no Hydra here), so the expansion is easy to test and to reuse.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from critbatch.config import ConfigError, RunConfig
from critbatch.records import run_id, run_name
from critbatch.typecheck import field_hints
from sweeps.schema import LrGrid

GROUP_BY = ("batch_size", "run", "all")

# Settings that every run takes from the top level of the composed config: every field of
# RunConfig but those the grid sets per run (a field added to RunConfig is copied too).
PER_RUN_KEYS = ("task", "optimizer", "batch_size", "seed")
RUN_KEYS = tuple(name for name in field_hints(RunConfig) if name not in PER_RUN_KEYS)


class SweepError(ConfigError):
    """A sweep that cannot be launched; the message names the field and what to change."""


@dataclass(frozen=True)
class Run:
    """One run of the grid: its settings, parsed and checked once, and their plain form."""
    name: str
    run_id: str
    settings: RunConfig
    config: dict[str, Any]   # settings.to_dict(): what records and sweep.json hold


def centred_lr(batch_size: int, eps_star: float, b_star: float, alpha: float) -> float:
    """The paper's (App. A.2) guess for the best lr: eps* / (1 + B*/B)^alpha."""
    return eps_star / (1.0 + b_star / batch_size) ** alpha


# How far one unit of gradient moves the parameters, per unit lr, once heavy-ball momentum mu has
# built up its velocity: 1/(1 - mu). A centre tuned for one of these optimizers serves the other
# with its eps* scaled by the ratio (exact where the lr is small against the curvature, i.e. at
# the small batch sizes where noise sets the best lr).
EFFECTIVE_LR_GAIN = {"sgd": lambda opt: 1.0, "momentum": lambda opt: 1.0 / (1.0 - opt.get("momentum", 0.9))}


@dataclass(frozen=True)
class LrCentreChoice:
    """The centre the grid uses for one optimizer, and where it came from: "tuned" (sweep.lr.centre,
    tuned for this optimizer or not said for which), "centres" (its entry in sweep.lr.centres),
    "converted" (from the tuned optimizer's by EFFECTIVE_LR_GAIN) or "untuned" (another
    optimizer's centre, as it is: the launch warns)."""
    centre: dict | None
    source: str
    tuned_for: str | None = None


def lr_centre(lr: dict, optimizer: dict | None) -> LrCentreChoice:
    """The centre of the lr grid `lr` (sweep.lr) for `optimizer` (the optimizer section)."""
    centre, tuned_for = lr.get("centre"), lr.get("tuned_for")
    name = (optimizer or {}).get("name")
    if name is None or tuned_for is None or tuned_for == name:
        return LrCentreChoice(centre, "tuned", tuned_for)
    own = (lr.get("centres") or {}).get(name)
    if own is not None:
        return LrCentreChoice({"alpha": 1.0, **own}, "centres", tuned_for)
    if centre is not None and name in EFFECTIVE_LR_GAIN and tuned_for in EFFECTIVE_LR_GAIN:
        scale = EFFECTIVE_LR_GAIN[tuned_for](optimizer) / EFFECTIVE_LR_GAIN[name](optimizer)
        if math.isfinite(scale) and scale > 0 and isinstance(centre.get("eps_star"), (int, float)):
            return LrCentreChoice({**centre, "eps_star": float(f"{centre['eps_star'] * scale:.6g}")}, "converted",
                                  tuned_for)
    return LrCentreChoice(centre, "untuned", tuned_for)


def lr_grid(batch_size: int, lr: dict, optimizer: dict | None = None) -> list[float]:
    """The learning rates to try at one batch size: explicit, or `count` values `factor` apart
    centred on eps*/(1 + B*/B)^alpha, with the centre for `optimizer` (lr_centre)."""
    lr = {**dataclasses.asdict(LrGrid()), **lr}  # the schema's defaults (count, factor) where not given
    values = lr.get("values")
    if values is not None:
        field = "sweep.lr.values"
        if isinstance(values, dict):  # per batch size: {B: [lr, ...]}
            field = f"sweep.lr.values[{batch_size}]"
            values = values.get(batch_size, values.get(str(batch_size)))
            if values is None:
                raise SweepError(f"sweep.lr.values has no entry for batch size {batch_size}; "
                                 f"give one per batch size or a single list")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{field}={values!r} must be a non-empty list of learning rates "
                             "(an empty grid runs nothing)")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise SweepError(f"{field}={values!r} must be a list of numbers")
        return [float(v) for v in values]
    choice = lr_centre(lr, optimizer)
    centre, where = choice.centre, "sweep.lr.centre"
    if choice.source == "centres":
        where = f"sweep.lr.centres.{optimizer['name']}"
    if centre is None or (centre.get("eps_star") is None and centre.get("b_star") is None):
        raise SweepError("sweep.lr: give either values (a list, or a mapping batch size -> list) or "
                         "centre: {eps_star, b_star, alpha} with factor and count")
    for key in ("eps_star", "b_star", "alpha"):
        if centre.get(key) is None:
            raise SweepError(f"{where}.{key} is not set: the centre needs eps_star and b_star (alpha: 1 unless set)")
        if not isinstance(centre.get(key), (int, float)) or not math.isfinite(centre[key]) or centre[key] < 0:
            raise SweepError(f"{where}.{key}={centre.get(key)!r} must be a finite number >= 0")
    factor, count = lr["factor"], lr["count"]
    if not isinstance(count, int) or count < 1:
        raise SweepError(f"sweep.lr.count={count!r} must be an integer >= 1")
    if not isinstance(factor, (int, float)) or factor <= 1:
        raise SweepError(f"sweep.lr.factor={factor!r} must be > 1 (the ratio between neighbouring lrs)")
    mid = centred_lr(batch_size, centre["eps_star"], centre["b_star"], centre["alpha"])
    return [float(f"{mid * factor ** (i - (count - 1) / 2):.6g}") for i in range(count)]


def lr_grid_note(lr: dict, optimizer: dict) -> tuple[str, str] | None:
    """What the launch says about the lr grid's centre before anything runs, as (level, message):
    a note where the optimizer takes a centre other than sweep.lr.centre (its own, or converted),
    a warning where the centre was tuned for another optimizer and nothing converts it; None where
    it needs no word (explicit values, or sweep.lr.centre tuned for this optimizer)."""
    if lr.get("values") is not None:
        return None
    choice = lr_centre(lr, optimizer)
    name, tuned = optimizer.get("name"), choice.tuned_for
    given = choice.centre or {}
    if choice.source == "centres":
        shown = ", ".join(f"{k}: {given[k]:g}" for k in ("eps_star", "b_star", "alpha"))
        return ("info", f"note: sweep.lr.centre was tuned for {tuned}; {name} takes its own, "
                f"sweep.lr.centres.{name} = {{{shown}}}. To use sweep.lr.centre instead, add "
                f"sweep.lr.tuned_for={name}.")
    if choice.source == "converted":
        return ("info", f"note: sweep.lr.centre was tuned for {tuned}; {name} takes it with eps_star "
                f"{given['eps_star']:g} instead of {lr['centre']['eps_star']:g}, for the same effective step "
                f"(heavy-ball momentum m steps lr/(1 - m) per unit gradient; m = {optimizer.get('momentum', 0.9):g}). "
                f"To use sweep.lr.centre as it is, add sweep.lr.tuned_for={name}.")
    if choice.source == "untuned":
        return ("warning", f"warning: sweep.lr.centre was tuned for {tuned}, and this grid has no centre for {name} "
                f"(sweep.lr.centres.{name}) nor a rule to convert one: {name} will try {tuned}'s lrs, which can be "
                f"off by orders of magnitude (most runs diverging, or crawling to the budget). Give {name} its "
                f"own: 'sweep.lr.centre={{eps_star: E, b_star: B, alpha: A}}' sweep.lr.tuned_for={name}, or "
                "'sweep.lr.values=[...]', or a preset that has one (experiment=NAME).")
    return None


def expand(cfg: dict) -> list[Run]:
    """Every run of the sweep, validated. `cfg` is the composed config as plain containers."""
    sweep = cfg.get("sweep") or {}
    batch_sizes = sweep.get("batch_sizes")
    if not batch_sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in batch_sizes):
        raise SweepError(f"sweep.batch_sizes={batch_sizes!r} must be a non-empty list of integers > 0")
    seeds = sweep.get("seeds")
    if seeds is None:  # not given: the top-level seed
        seeds = [cfg.get("seed", RunConfig.seed)]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           and s >= 0 for s in seeds):
        raise SweepError(f"sweep.seeds={seeds!r} must be a non-empty list of integers >= 0")
    check_goals(cfg.get("goals"))
    task = dict(cfg["task"])
    runs, seen = [], set()
    for batch_size in sorted(set(batch_sizes)):
        for lr in lr_grid(batch_size, sweep.get("lr") or {}, cfg.get("optimizer")):
            for seed in seeds:
                values = {key: cfg[key] for key in RUN_KEYS if key in cfg}
                values.update(task=task, optimizer={**cfg["optimizer"], "lr": lr},
                              batch_size=batch_size, seed=seed)
                try:
                    config = RunConfig.from_dict(values)
                except ConfigError as exc:
                    raise SweepError(f"run (batch_size={batch_size}, lr={lr:g}, seed={seed}): {exc}") from exc
                plain = config.to_dict()
                rid = run_id(plain)
                if rid not in seen:
                    seen.add(rid)
                    runs.append(Run(run_name(plain), rid, config, plain))
    warn_batch_sizes_above_dataset(runs)
    return runs


def warn_batch_sizes_above_dataset(runs: list[Run]) -> None:
    """A batch larger than the dataset repeats examples within a batch (drawn with replacement):
    legal, but rarely what was meant; said once per sweep, before anything runs."""
    if not runs:
        return
    size = runs[0].settings.build_task().dataset_size
    above = sorted({run.settings.batch_size for run in runs if size is not None and run.settings.batch_size > size})
    if above:
        warnings.warn(f"sweep.batch_sizes {above} exceed task {runs[0].settings.task['name']!r}'s {size} training "
                      "examples: each such batch draws examples with replacement, repeating many of them; "
                      "drop these batch sizes unless that is what you want", stacklevel=2)


def goal_range(metric: str) -> tuple[float, float | None] | None:
    """The open interval in which a goal `metric <= threshold` can be met, but not before training
    starts, judged from the metric's name: an error rate lies in [0, 1], so a threshold must lie
    in (0, 1); a loss is >= 0, so a threshold must be > 0 (linreg's exact_loss has a noise floor
    above 0, which is not checked here). None: a metric of unknown range."""
    if metric.endswith("error"):
        return 0.0, 1.0
    if metric.endswith("loss"):
        return 0.0, None
    return None


def check_goals(goals) -> None:
    """Goals that can never be met, or are met before the first step, are errors."""
    if not isinstance(goals, dict):
        return  # RunConfig names what is wrong
    metric, thresholds = goals.get("metric"), goals.get("thresholds")
    if not isinstance(metric, str) or not isinstance(thresholds, list):
        return
    bounds = goal_range(metric)
    if bounds is None:
        return
    low, high = bounds
    for t in thresholds:
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            return  # RunConfig names what is wrong
        if t <= low:
            raise SweepError(f"goals.thresholds={thresholds!r}: the goal {metric} <= {t:g} can never be met "
                             f"({metric} is never below {low:g}); each threshold must be > {low:g}")
        if high is not None and t >= high:
            raise SweepError(f"goals.thresholds={thresholds!r}: the goal {metric} <= {t:g} is met before "
                             f"training starts ({metric} is at most {high:g}); each threshold must lie in "
                             f"({low:g}, {high:g})")


def _overridden(overrides, key: str) -> str | None:
    """The value that a command-line override (key=v, +key=v, ++key=v) gave `key`, or None."""
    found = None
    for override in overrides or ():
        name, eq, value = override.partition("=")
        if eq and name.lstrip("+") == key:
            found = value
    return found


def check_overrides(cfg: dict, overrides) -> None:
    """Settings given on the command line that the sweep overrides would be silently ignored:
    refuse them, naming the key that decides. `overrides`: Hydra's task overrides, as typed."""
    sweep = cfg.get("sweep") or {}
    seed = _overridden(overrides, "seed")
    if seed is not None and sweep.get("seeds") is not None and sweep["seeds"] != [cfg.get("seed")]:
        raise SweepError(f"seed={seed} is overridden by sweep.seeds={sweep['seeds']!r}: a sweep runs every seed "
                         f"of sweep.seeds; use sweep.seeds=[{seed}] (or a list of seeds) instead")
    lr = _overridden(overrides, "optimizer.lr")
    if lr is not None:
        raise SweepError(f"optimizer.lr={lr} is overridden by the sweep's lr grid (sweep.lr): every run "
                         f"takes its lr from the grid; use 'sweep.lr.values=[{lr}]' instead")
    batch_size = _overridden(overrides, "batch_size")
    if batch_size is not None:
        raise SweepError(f"batch_size={batch_size} is not read by a sweep: the batch sizes come from "
                         f"sweep.batch_sizes; use 'sweep.batch_sizes=[{batch_size}]' instead")


def check_data(runs: list[Run]) -> None:
    """Fail on the submitting machine when a dataset is missing (the message has the download command)."""
    checked = set()
    for run in runs:
        key = repr(sorted(run.config["task"].items()))
        if key not in checked:
            checked.add(key)
            run.settings.validate(check_data=True)


def group_runs(runs: list[Run], group_by: str) -> list[list[Run]]:
    """Runs packed into jobs: one per batch size (every lr of it), one per run, or all in one."""
    if group_by not in GROUP_BY:
        raise SweepError(f"launcher.group_by={group_by!r}; choose one of {GROUP_BY}")
    if group_by == "run":
        return [[run] for run in runs]
    if group_by == "all":
        return [list(runs)] if runs else []
    groups: dict[int, list[Run]] = defaultdict(list)
    for run in runs:
        groups[run.config["batch_size"]].append(run)
    return [groups[b] for b in sorted(groups)]
