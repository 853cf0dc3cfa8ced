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


def lr_grid(batch_size: int, lr: dict) -> list[float]:
    """The learning rates to try at one batch size: explicit, or `count` values `factor` apart
    centred on eps*/(1 + B*/B)^alpha."""
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
    centre = lr.get("centre")
    if centre is None:
        raise SweepError("sweep.lr: give either values (a list, or a mapping batch size -> list) or "
                         "centre: {eps_star, b_star, alpha} with factor and count")
    for key in ("eps_star", "b_star", "alpha"):
        if not isinstance(centre.get(key), (int, float)) or not math.isfinite(centre[key]) or centre[key] < 0:
            raise SweepError(f"sweep.lr.centre.{key}={centre.get(key)!r} must be a finite number >= 0")
    factor, count = lr["factor"], lr["count"]
    if not isinstance(count, int) or count < 1:
        raise SweepError(f"sweep.lr.count={count!r} must be an integer >= 1")
    if not isinstance(factor, (int, float)) or factor <= 1:
        raise SweepError(f"sweep.lr.factor={factor!r} must be > 1 (the ratio between neighbouring lrs)")
    mid = centred_lr(batch_size, centre["eps_star"], centre["b_star"], centre["alpha"])
    return [float(f"{mid * factor ** (i - (count - 1) / 2):.6g}") for i in range(count)]


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
        for lr in lr_grid(batch_size, sweep.get("lr") or {}):
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
