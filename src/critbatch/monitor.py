"""What a training loop keeps track of besides the parameters: smoothed metrics, goal crossings,
the noise scale, the curve, the stopping decision and the record. Shared by the plain loop
(critbatch.train) and the packed one (critbatch.packed), so a run is judged the same either way.

SmoothedMetrics and GoalCrossings hold a leading "member" dimension (1 for a plain run, M for M
packed runs) and live on the device: they are updated every step without a host sync. A RunMonitor
is one run's host-side book: it is consulted at the logged steps only.
"""
from __future__ import annotations

import math
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np
import torch

from critbatch import records
from critbatch.config import RunConfig
from critbatch.gns import NoiseScale


def log_steps(relative_interval: float):
    """Steps 1, 2, 3, ... then geometrically spaced, `relative_interval` apart."""
    step = 1
    while True:
        yield step
        step = max(step + 1, int(step * (1 + relative_interval)))


def max_steps(config: RunConfig) -> float:
    """The step budget implied by max_steps and max_examples (inf when neither is set)."""
    budget = config.budget
    limits = [budget.max_steps, math.ceil(budget.max_examples / config.batch_size) if budget.max_examples else None]
    limits = [s for s in limits if s is not None]
    return min(limits) if limits else math.inf


class SmoothedMetrics:
    """EMAs of the per-batch metrics whose window is max(relative_window * step, min_examples / B)
    steps, and the EMA of the step index with the same weights: the smoothed value estimates the
    metric at that centre step, which removes the EMA's lag to first order. Shape [members, metrics]."""

    def __init__(self, names, members: int, batch_size: int, relative_window: float, min_examples: int, device):
        self.names = tuple(names)
        self.values = torch.zeros(members, len(self.names), device=device)
        self.center_step = 0.0
        self.relative_window, self.min_steps = relative_window, min_examples / batch_size
        self.count = 0

    def update(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        """Add the metrics (0-d, or one per member) measured on the parameters after `step` updates."""
        self.count += 1
        window = max(self.relative_window * step, self.min_steps, 1.0)
        alpha = 1.0 / min(self.count, window)  # a plain running mean until the window fills
        new = torch.stack([metrics[n].float().reshape(-1) for n in self.names], dim=-1)
        self.values.mul_(1 - alpha).add_(new, alpha=alpha)
        self.center_step = (1 - alpha) * self.center_step + alpha * step

    @property
    def ready(self) -> bool:
        """True once the average covers at least min_examples examples; goals wait until then."""
        return self.count >= self.min_steps

    def keep(self, members: torch.Tensor) -> None:
        self.values = self.values[members]

    def member_dicts(self) -> list[dict[str, float]]:
        return [{f"train_{n}": v for n, v in zip(self.names, row)} for row in self.values.tolist()]


class GoalCrossings:
    """The centre step at which each member's smoothed goal metric first fell to each threshold
    (-1: not yet), checked on the device every step. Shape [members, goals]."""

    def __init__(self, thresholds, metric_index: int, members: int, device):
        self.metric_index = metric_index
        self.thresholds = torch.tensor(list(thresholds), device=device)
        self.crossed_at = torch.full((members, len(thresholds)), -1.0, device=device)

    def update(self, smoothed: SmoothedMetrics) -> None:
        if not smoothed.ready:  # not on one noisy batch
            return
        value = smoothed.values[:, self.metric_index].unsqueeze(1)
        newly = (self.crossed_at < 0) & (value <= self.thresholds)
        self.crossed_at = torch.where(newly, torch.full_like(self.crossed_at, smoothed.center_step), self.crossed_at)

    def keep(self, members: torch.Tensor) -> None:
        self.crossed_at = self.crossed_at[members]


def smoothed_goal_index(goal_metric: str, batch_metrics) -> int | None:
    """Index of the goal's metric among the smoothed batch metrics (None: an evaluated metric)."""
    name = goal_metric[len("train_"):] if goal_metric.startswith("train_") else None
    return tuple(batch_metrics).index(name) if name in tuple(batch_metrics) else None


class RunMonitor:
    """One run's record: curve, goals, noise scale and status, written atomically as it goes."""

    def __init__(self, config: RunConfig, out_dir: str | Path | None):
        self.config = config
        plain = config.to_dict()
        self.path = Path(out_dir) / records.RECORD_FILE if out_dir is not None else None
        self.noise = NoiseScale(beta=config.noise_scale.beta)
        self.curve: dict[str, list] = {}
        self.record = {
            "schema_version": records.SCHEMA_VERSION, "run_id": records.run_id(plain),
            "run_name": records.run_name(plain), "status": records.RUNNING, "config": plain,
            "goals": [{"metric": config.goals.metric, "threshold": t, "reached": False}
                      for t in config.goals.thresholds],
            "summary": {"steps": 0, "examples": 0, "wall_time": 0.0, "reason": None, "error": None,
                        "host": socket.gethostname(), "pid": os.getpid(), "torch": torch.__version__,
                        "python": platform.python_version()},
            "curve": self.curve,
        }
        self.max_steps = max_steps(config)
        self.initial_loss = math.nan
        self._last_save = time.perf_counter()
        self._last_eval: tuple[int, float] | None = None
        self.save()

    @property
    def status(self) -> str:
        return self.record["status"]

    @property
    def finished(self) -> bool:
        return self.status != records.RUNNING

    def save(self) -> None:
        if self.path is not None:
            records.write_record(self.path, self.record)
        self._last_save = time.perf_counter()

    def started(self, initial_loss: float, **facts) -> None:
        """Set-up done: the reference loss for divergence, and facts for the summary (device, ...)."""
        self.initial_loss = initial_loss
        self.record["summary"].update(facts)

    def log(self, step: int, now: float, smoothed: dict[str, float], evaluated: dict[str, float],
            crossed_at: list[float]) -> bool:
        """A curve point at `step`; record newly reached goals; decide whether the run is over."""
        config, B = self.config, self.config.batch_size
        point = {"step": step, "examples": step * B, "wall_time": now}
        point.update(smoothed if step > 0 else {k: math.nan for k in smoothed})
        point.update(evaluated)
        point.update(self.noise.state())
        goal_metric = config.goals.metric
        if goal_metric in evaluated:
            crossed_at = self._evaluated_crossings(evaluated[goal_metric], step)
        for goal, crossed in zip(self.record["goals"], crossed_at):
            if crossed >= 0 and not goal["reached"]:
                goal.update(self._goal_entry(crossed, step, now))
        for key, value in point.items():
            self.curve.setdefault(key, []).append(value)
        self.record["summary"].update(steps=step, examples=step * B, wall_time=now)

        train_loss = point.get("train_loss", math.nan)
        budget, status, reason = config.budget, None, None
        if step > 0 and not math.isfinite(train_loss):
            status, reason = records.DIVERGED, f"smoothed training loss is {train_loss}"
        elif step > 0 and train_loss > config.divergence.loss_ratio * self.initial_loss:
            status, reason = records.DIVERGED, (f"smoothed training loss {train_loss:.4g} exceeds "
                                                f"{config.divergence.loss_ratio} x the initial {self.initial_loss:.4g}")
        elif all(goal["reached"] for goal in self.record["goals"]):
            status, reason = records.COMPLETED, "every goal reached"
        elif step >= self.max_steps:
            status, reason = records.BUDGET_EXHAUSTED, f"step budget of {self.max_steps} steps spent"
        elif budget.max_seconds is not None and now >= budget.max_seconds:
            status, reason = records.BUDGET_EXHAUSTED, f"time budget of {budget.max_seconds} s spent"
        if status is not None:
            self.record["status"], self.record["summary"]["reason"] = status, reason
        if status is not None or time.perf_counter() - self._last_save > config.log.checkpoint_seconds:
            self.save()  # now and then while running, so a killed job leaves a partial record
        return status is not None

    def fail(self, exc: BaseException) -> None:
        """Record an exception, so the sweep goes on and the analysis sees the failure."""
        self.record["status"] = records.FAILED
        self.record["summary"].update(error=f"{type(exc).__name__}: {exc}", reason="exception")
        self.save()

    def _evaluated_crossings(self, value: float, step: int) -> list[float]:
        """Crossings of a metric evaluated at logged steps only: interpolated in log-step between
        the previous evaluation and this one."""
        crossed = []
        for goal in self.record["goals"]:
            if goal["reached"] or value > goal["threshold"]:
                crossed.append(-1.0)
                continue
            crossed.append(float(step))
            if self._last_eval is not None and step > 0:
                prev_step, prev_value = self._last_eval
                if prev_step > 0 and prev_value != value:
                    frac = (prev_value - goal["threshold"]) / (prev_value - value)
                    crossed[-1] = math.exp(math.log(prev_step) + frac * (math.log(step) - math.log(prev_step)))
        self._last_eval = (step, value)
        return crossed

    def _goal_entry(self, crossed_step: float, step: int, now: float) -> dict:
        """What a goal records at its first crossing: step and examples (fractional: the smoothed
        estimate), the wall time interpolated along the curve, and the noise scale there."""
        wall = float(np.interp(crossed_step, self.curve.get("step", []) + [step],
                               self.curve.get("wall_time", []) + [now]))
        return {"reached": True, "step": crossed_step, "examples": crossed_step * self.config.batch_size,
                "wall_time": wall, **{k: v for k, v in self.noise.state().items() if k != "updates"}}


class NoiseMeasurements:
    """Squared-norm pairs kept on the device as they are measured and handed to each run's
    NoiseScale at the logged steps, in order: the hot loop never waits for the GPU."""

    def __init__(self, small_batch: int, big_batch: int):
        self.small_batch, self.big_batch = small_batch, big_batch
        self._pending: list[torch.Tensor] = []

    def add(self, small_sq_norm: torch.Tensor, big_sq_norm: torch.Tensor) -> None:
        self._pending.append(torch.stack([small_sq_norm.reshape(-1), big_sq_norm.reshape(-1)]))

    def flush(self, monitors: list[RunMonitor]) -> None:
        if not self._pending:
            return
        for small, big in torch.stack(self._pending).tolist():  # [measurements][2][members]
            for monitor, s, b in zip(monitors, small, big):
                monitor.noise.update(s, b, self.small_batch, self.big_batch)
        self._pending.clear()

    def keep(self, members: torch.Tensor) -> None:
        self._pending = [p[:, members] for p in self._pending]
