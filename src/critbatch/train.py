"""Train one (task, optimizer, batch size, lr, seed) until its goals are met, and record it.

Reads top to bottom: set up, then one loop. Every step draws a batch (i.i.d. with replacement by
default, as the theory assumes), computes the full-batch gradient, and every `noise_scale.every`
steps computes it as k micro-batch gradients instead, which also gives the two squared norms
that the B_simple estimator needs. Goals are judged on training metrics smoothed by an EMA whose
window grows with the step count (a fixed fraction of it), and whose centre of mass is tracked,
so the step at which a goal is crossed is known to a few percent whatever the batch size.
At geometrically spaced steps the loop logs a curve point, checks divergence and the budget, and
now and then rewrites the partial record, so a killed job leaves a record marked "running".
"""
from __future__ import annotations

import math
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from critbatch import records
from critbatch.config import ConfigError, RunConfig
from critbatch.gns import NoiseScale, micro_batch_sq_norms
from critbatch.tasks import Task


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; use device=auto or device=cpu")
    return torch.device(name)


def make_optimizer(params, opt) -> torch.optim.Optimizer:
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, weight_decay=opt.weight_decay)
    if opt.name == "momentum":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.Adam(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay)


class BatchSampler:
    """Indices of each batch, on the data's device: i.i.d. with replacement, or epoch shuffling."""

    def __init__(self, size: int, batch_size: int, mode: str, generator: torch.Generator, device):
        self.size, self.batch_size, self.mode = size, batch_size, mode
        self.generator, self.device = generator, device
        self._order = torch.empty(0, dtype=torch.long, device=device)

    def next(self) -> torch.Tensor:
        if self.mode == "with_replacement":
            return torch.randint(self.size, (self.batch_size,), generator=self.generator, device=self.device)
        while self._order.numel() < self.batch_size:  # a batch may straddle two epochs
            perm = torch.randperm(self.size, generator=self.generator, device=self.device)
            self._order = torch.cat([self._order, perm])
        batch, self._order = self._order[:self.batch_size], self._order[self.batch_size:]
        return batch


def next_batch(task: Task, sampler: BatchSampler | None, batch_size: int, generator: torch.Generator):
    if sampler is None:
        return task.sample(batch_size, generator)
    index = sampler.next()
    return task.inputs.index_select(0, index), task.targets.index_select(0, index)


def noise_micro_batches(batch_size: int, wanted: int) -> int:
    """The largest k <= wanted that splits the batch into equal micro-batches (1: cannot measure)."""
    for k in range(min(wanted, batch_size), 1, -1):
        if batch_size % k == 0:
            return k
    return 1


@torch.no_grad()
def initial_mean_loss(model: nn.Module, task: Task, batch_size: int, min_examples: int, seed: int,
                      device) -> float:
    """Loss of the initial model over at least min_examples examples: the reference that divergence
    is judged against. (The first batch alone will not do at small B: at B=1 one example's loss can
    be ~0, and a healthy run would then look diverged.) Uses its own random stream, so the training
    batches are unchanged, and restores the model's buffers (batch-norm statistics)."""
    generator = torch.Generator(device=device).manual_seed(seed + 7_919)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    batches = max(1, math.ceil(min_examples / batch_size))
    total = 0.0
    for _ in range(batches):
        if task.dataset_size is None:
            x, y = task.sample(batch_size, generator)
        else:
            index = torch.randint(task.dataset_size, (batch_size,), generator=generator, device=device)
            x, y = task.inputs.index_select(0, index), task.targets.index_select(0, index)
        total += float(task.loss(model(x), y))
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    return total / batches


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    small_sq_norm: torch.Tensor | None = None  # mean |g|^2 over micro-batches of B/k
    big_sq_norm: torch.Tensor | None = None    # |g|^2 of the full batch B


def compute_gradients(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor,
                      micro_batches: int = 1) -> StepResult:
    """Set p.grad to the full-batch gradient of the mean loss; with k > 1 micro-batches, also
    return the squared norms that the noise-scale estimator needs (the update is unchanged,
    because the mean of the k micro-batch gradients is exactly the full-batch gradient)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if micro_batches <= 1:
        output = model(x)
        loss = task.loss(output, y)
        loss.backward()
        return StepResult(loss.detach(), task.metrics(output, y, loss))
    micro_grads, outputs, losses = [], [], []
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        output = model(xs)
        loss = task.loss(output, ys)
        micro_grads.append(torch.autograd.grad(loss, params))
        outputs.append(output.detach())
        losses.append(loss.detach())
    for p, *grads in zip(params, *micro_grads):
        p.grad = torch.stack(grads).mean(0)
    loss = torch.stack(losses).mean()
    small, big = micro_batch_sq_norms(micro_grads)
    return StepResult(loss, task.metrics(torch.cat(outputs), y, loss), small, big)


class SmoothedMetrics:
    """EMAs of the per-batch metrics whose window is max(relative_window * step, min_examples / B)
    steps, and the EMA of the step index with the same weights: the smoothed value estimates the
    metric at that centre step, which removes the EMA's lag to first order. Lives on the device."""

    def __init__(self, names, batch_size: int, relative_window: float, min_examples: int, device):
        self.names = tuple(names)
        self.values = torch.zeros(len(self.names), device=device)
        self.center_step = 0.0
        self.relative_window, self.min_steps = relative_window, min_examples / batch_size
        self.count = 0

    def update(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        """Add the metrics measured on the parameters after `step` updates."""
        self.count += 1
        window = max(self.relative_window * step, self.min_steps, 1.0)
        alpha = 1.0 / min(self.count, window)  # a plain running mean until the window fills
        new = torch.stack([metrics[n].float() for n in self.names])
        self.values.mul_(1 - alpha).add_(new, alpha=alpha)
        self.center_step = (1 - alpha) * self.center_step + alpha * step

    @property
    def ready(self) -> bool:
        """True once the average covers at least min_examples examples; goals wait until then."""
        return self.count >= self.min_steps

    def as_dict(self) -> dict[str, float]:
        return {f"train_{n}": v for n, v in zip(self.names, self.values.tolist())}


class GoalTracker:
    """First crossing of each 'metric <= threshold' goal. Smoothed training metrics are checked on
    the device every step (no host sync); metrics evaluated only at logged steps are interpolated
    in log-step between the two logged points around the crossing."""

    def __init__(self, metric: str, thresholds, smoothed_index: int | None, device):
        self.metric, self.thresholds = metric, list(thresholds)
        self.smoothed_index = smoothed_index
        self._threshold_tensor = torch.tensor(self.thresholds, device=device)
        self.crossed_at = torch.full((len(self.thresholds),), -1.0, device=device)  # step, or -1
        self.reported: list[dict | None] = [None] * len(self.thresholds)
        self._last_eval: tuple[float, float] | None = None

    def update_smoothed(self, smoothed: SmoothedMetrics) -> None:
        if self.smoothed_index is None or not smoothed.ready:  # not on one noisy batch
            return
        value = smoothed.values[self.smoothed_index]
        newly = (self.crossed_at < 0) & (value <= self._threshold_tensor)
        self.crossed_at = torch.where(newly, torch.full_like(self.crossed_at, smoothed.center_step), self.crossed_at)

    def update_evaluated(self, value: float, step: int) -> None:
        if self.smoothed_index is not None:
            return
        crossed = self.crossed_at.tolist()
        for i, threshold in enumerate(self.thresholds):
            if crossed[i] < 0 and value <= threshold:
                crossed[i] = self._interpolate(threshold, value, step)
        self.crossed_at = torch.tensor(crossed, device=self.crossed_at.device)
        self._last_eval = (step, value)

    def _interpolate(self, threshold: float, value: float, step: int) -> float:
        if self._last_eval is None or step == 0:
            return float(step)
        prev_step, prev_value = self._last_eval
        if prev_value == value or prev_step <= 0:
            return float(step)
        frac = (prev_value - threshold) / (prev_value - value)
        return float(math.exp(math.log(prev_step) + frac * (math.log(step) - math.log(prev_step))))

    def newly_reached(self) -> list[tuple[int, float]]:
        """Goals crossed since the last call, as (index, step); syncs with the device."""
        crossed = self.crossed_at.tolist()
        return [(i, s) for i, s in enumerate(crossed) if s >= 0 and self.reported[i] is None]

    @property
    def all_reached(self) -> bool:
        return all(r is not None for r in self.reported)


def _log_steps(relative_interval: float):
    """Steps 1, 2, 3, ... then geometrically spaced, `relative_interval` apart."""
    step = 1
    while True:
        yield step
        step = max(step + 1, int(step * (1 + relative_interval)))


def train(config: RunConfig | dict, out_dir: str | Path | None = None) -> dict:
    """Run one configuration to its goals and return its record (also written to out_dir/record.json)."""
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    task = config.validate()
    plain = config.to_dict()
    path = Path(out_dir) / records.RECORD_FILE if out_dir is not None else None
    record = {
        "schema_version": records.SCHEMA_VERSION, "run_id": records.run_id(plain),
        "run_name": records.run_name(plain), "status": records.RUNNING, "config": plain,
        "goals": [{"metric": config.goals.metric, "threshold": t, "reached": False}
                  for t in config.goals.thresholds],
        "summary": {"steps": 0, "examples": 0, "wall_time": 0.0, "reason": None, "error": None,
                    "host": socket.gethostname(), "torch": torch.__version__, "python": platform.python_version()},
        "curve": {},
    }

    def save():
        if path is not None:
            records.write_record(path, record)

    save()
    try:
        _train_loop(config, task, record, save)
    except Exception as exc:  # recorded, so the sweep goes on and the analysis sees the failure
        record["status"] = records.FAILED
        record["summary"]["error"] = f"{type(exc).__name__}: {exc}"
        record["summary"]["reason"] = "exception"
        save()
        raise
    save()
    return record


def _train_loop(config: RunConfig, task: Task, record: dict, save) -> None:
    setup_start = time.perf_counter()
    device = pick_device(config.device)
    record["summary"]["device"] = str(device)
    B = config.batch_size
    torch.manual_seed(config.seed)
    task.load(device)
    model = task.make_model().to(device)
    model.train()
    optimizer = make_optimizer(model.parameters(), config.optimizer)
    data_generator = torch.Generator(device=device).manual_seed(config.seed)
    sampler = None if task.dataset_size is None else BatchSampler(task.dataset_size, B, config.sampling,
                                                                   data_generator, device)
    smoothed = SmoothedMetrics(task.batch_metrics, B, config.smoothing.relative_window,
                               config.smoothing.min_examples, device)
    goal_metric = config.goals.metric
    smoothed_index = (smoothed.names.index(goal_metric[len("train_"):])
                      if goal_metric.startswith("train_") and goal_metric[len("train_"):] in smoothed.names else None)
    goals = GoalTracker(goal_metric, config.goals.thresholds, smoothed_index, device)
    noise = NoiseScale(beta=config.noise_scale.beta)
    k = noise_micro_batches(B, config.noise_scale.micro_batches) if config.noise_scale.enabled else 1
    budget = config.budget
    max_steps = min(s for s in (budget.max_steps,
                                math.ceil(budget.max_examples / B) if budget.max_examples else None,
                                ) if s is not None) if (budget.max_steps or budget.max_examples) else math.inf
    initial_loss = initial_mean_loss(model, task, B, config.smoothing.min_examples, config.seed, device)
    curve: dict[str, list] = {}
    record["curve"] = curve
    record["summary"]["setup_seconds"] = time.perf_counter() - setup_start
    record["summary"]["noise_micro_batches"] = k

    start = time.perf_counter()
    last_save = start
    log_points = _log_steps(config.log.relative_interval)
    next_log = 0  # log the initial evaluation (step 0) before training
    step = 0
    status, reason = None, None
    while True:
        # ---- logging, goals, divergence and budget, at geometrically spaced steps ----
        if step == next_log or step >= max_steps:
            now = time.perf_counter() - start
            point = {"step": step, "examples": step * B, "wall_time": now}
            point.update(smoothed.as_dict() if step > 0 else {f"train_{n}": math.nan for n in smoothed.names})
            evaluated = task.evaluate(model) if task.eval_metrics else {}
            point.update(evaluated)
            point.update(noise.state())
            if goal_metric in evaluated:
                goals.update_evaluated(evaluated[goal_metric], step)
            for i, crossed in goals.newly_reached():
                goals.reported[i] = record["goals"][i]
                record["goals"][i].update(_goal_entry(crossed, B, curve, step, now, noise))
            for key, value in point.items():
                curve.setdefault(key, []).append(value)
            train_loss = point.get("train_loss", math.nan)
            if step > 0 and not math.isfinite(train_loss):
                status, reason = records.DIVERGED, f"smoothed training loss is {train_loss}"
            elif step > 0 and train_loss > config.divergence.loss_ratio * initial_loss:
                status, reason = records.DIVERGED, (f"smoothed training loss {train_loss:.4g} exceeds "
                                                    f"{config.divergence.loss_ratio} x the initial {initial_loss:.4g}")
            elif goals.all_reached:
                status, reason = records.COMPLETED, "every goal reached"
            elif step >= max_steps:
                status, reason = records.BUDGET_EXHAUSTED, f"step budget of {max_steps} steps spent"
            elif budget.max_seconds is not None and now >= budget.max_seconds:
                status, reason = records.BUDGET_EXHAUSTED, f"time budget of {budget.max_seconds} s spent"
            record["summary"].update(steps=step, examples=step * B, wall_time=now)
            if status is not None:
                break
            if time.perf_counter() - last_save > config.log.checkpoint_seconds:
                save()
                last_save = time.perf_counter()
            while next_log <= step:
                next_log = next(log_points)

        # ---- one training step ----
        x, y = next_batch(task, sampler, B, data_generator)
        measure = k > 1 and step % config.noise_scale.every == 0
        optimizer.zero_grad(set_to_none=True)
        result = compute_gradients(model, task, x, y, k if measure else 1)
        if measure:
            noise.update(result.small_sq_norm, result.big_sq_norm, B // k, B)
        smoothed.update(result.metrics, step)
        goals.update_smoothed(smoothed)
        optimizer.step()
        step += 1
        if budget.max_seconds is not None and step % 64 == 0 and time.perf_counter() - start >= budget.max_seconds:
            next_log = step  # log and stop at the top of the loop

    record["status"] = status
    record["summary"]["reason"] = reason


def _goal_entry(crossed_step: float, batch_size: int, curve: dict, step: int, now: float,
                noise: NoiseScale) -> dict:
    """What a goal records at its first crossing: step and examples (fractional: the smoothed
    estimate), the wall time interpolated along the curve, and the noise scale there."""
    wall = float(np.interp(crossed_step, curve.get("step", []) + [step], curve.get("wall_time", []) + [now]))
    return {"reached": True, "step": crossed_step, "examples": crossed_step * batch_size,
            "wall_time": wall, **{k: v for k, v in noise.state().items() if k != "updates"}}
