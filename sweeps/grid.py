"""Expand a sweep config into runs and groups of runs, and check every run before anything is queued.

Plain values in, plain values out (no Hydra here), so the expansion is easy to test and to reuse.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from critbatch.config import ConfigError, RunConfig
from critbatch.records import run_id, run_name

GROUP_BY = ("batch_size", "run", "all")

# Settings copied from the top level of the composed config into every run.
RUN_KEYS = ("goals", "budget", "sampling", "noise_scale", "smoothing", "divergence", "log", "device", "cuda_graphs")


class SweepError(ConfigError):
    """A sweep that cannot be launched; the message names the field and what to change."""


@dataclass(frozen=True)
class Run:
    name: str
    run_id: str
    config: dict[str, Any]


def centred_lr(batch_size: int, eps_star: float, b_star: float, alpha: float) -> float:
    """The paper's (App. A.2) guess for the best lr: eps* / (1 + B*/B)^alpha."""
    return eps_star / (1.0 + b_star / batch_size) ** alpha


def lr_grid(batch_size: int, lr: dict) -> list[float]:
    """The learning rates to try at one batch size: explicit, or `count` values `factor` apart
    centred on eps*/(1 + B*/B)^alpha."""
    values = lr.get("values")
    if values is not None:
        if isinstance(values, dict):  # per batch size: {B: [lr, ...]}
            values = values.get(batch_size, values.get(str(batch_size)))
            if values is None:
                raise SweepError(f"sweep.lr.values has no entry for batch size {batch_size}; "
                                 f"give one per batch size or a single list")
        return [float(v) for v in values]
    centre = lr.get("centre")
    if centre is None:
        raise SweepError("sweep.lr: give either values (a list, or a mapping batch size -> list) or "
                         "centre: {eps_star, b_star, alpha} with factor and count")
    for key in ("eps_star", "b_star", "alpha"):
        if not isinstance(centre.get(key), (int, float)) or not math.isfinite(centre[key]) or centre[key] < 0:
            raise SweepError(f"sweep.lr.centre.{key}={centre.get(key)!r} must be a finite number >= 0")
    factor, count = lr.get("factor", 2.0), lr.get("count", 5)
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
    seeds = sweep.get("seeds", [cfg.get("seed", 0)])
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
                    runs.append(Run(run_name(plain), rid, plain))
    return runs


def check_data(runs: list[Run]) -> None:
    """Fail on the submitting machine when a dataset is missing (the message has the download command)."""
    checked = set()
    for run in runs:
        key = repr(sorted(run.config["task"].items()))
        if key not in checked:
            checked.add(key)
            RunConfig.from_dict(run.config).validate(check_data=True)


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
