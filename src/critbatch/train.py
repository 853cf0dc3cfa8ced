"""Train one (task, optimizer, batch size, lr, seed) until its goals are met, and record it.

Reads top to bottom: set up, then one loop. Every step draws a batch (i.i.d. with replacement by
default, as the theory assumes), computes the full-batch gradient, and every `noise_scale.every`
steps also the k micro-batch gradients' squared norms that the B_simple estimator needs — from the
same pass (critbatch.micro_grads), or from k passes of B/k for layers it has no rule for.
Goals are judged on training metrics smoothed by an EMA whose window grows with the step count
(a fixed fraction of it), and whose centre of mass is tracked, so the step at which a goal is
crossed is known to a few percent whatever the batch size.
At geometrically spaced steps the loop logs a curve point, checks divergence and the budget, and
now and then rewrites the partial record, so a killed job leaves a record marked "running".
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from critbatch.config import ConfigError, RunConfig
from critbatch.cuda_graphs import TrainSteps, use_cuda_graphs
from critbatch.gns import micro_batch_sq_norms
from critbatch.micro_grads import MicroBatchNorms
from critbatch.monitor import (GoalCrossings, NoiseMeasurements, RunMonitor, SmoothedMetrics, log_steps,
                               smoothed_goal_index)
from critbatch.tasks import Task


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; use device=auto or device=cpu")
    return torch.device(name)


def make_optimizer(params, opt, capturable: bool = False) -> torch.optim.Optimizer:
    """capturable: Adam keeps its step count on the device, so that a CUDA graph can replay it."""
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, weight_decay=opt.weight_decay)
    if opt.name == "momentum":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.Adam(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                            capturable=capturable)


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
    sampler = None if task.dataset_size is None else BatchSampler(task.dataset_size, batch_size,
                                                                   "with_replacement", generator, device)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    batches = max(1, math.ceil(min_examples / batch_size))
    total = 0.0
    for _ in range(batches):
        x, y = next_batch(task, sampler, batch_size, generator)
        total += float(task.loss(model(x), y))
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    return total / batches


def has_batchnorm(model: nn.Module) -> bool:
    """BatchNorm couples the examples of a batch (and updates statistics in place)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    small_sq_norm: torch.Tensor | None = None  # mean |g|^2 over micro-batches of B/k
    big_sq_norm: torch.Tensor | None = None    # |g|^2 of the full batch B


def compute_gradients(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor,
                      micro_batches: int = 1, norms: MicroBatchNorms | None = None) -> StepResult:
    """Set p.grad to the full-batch gradient of the mean loss; with k > 1 micro-batches, also
    return the squared norms that the noise-scale estimator needs. With `norms` (a supported
    MicroBatchNorms of this model) they come from the same single pass; else from k passes of
    B/k examples, whose mean gradient is again exactly the full-batch gradient."""
    if micro_batches <= 1 or norms is not None:
        with norms.recording() if micro_batches > 1 else contextlib.nullcontext():
            output = model(x)
            loss = task.loss(output, y)
            loss.backward()
        result = StepResult(loss.detach(), task.metrics(output, y, loss))
        if micro_batches > 1:
            result.small_sq_norm, result.big_sq_norm = norms.sq_norms(micro_batches)
        return result
    params = [p for p in model.parameters() if p.requires_grad]
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


class PlainSteps(TrainSteps):
    """The plain loop's step: gradients (with the noise-scale norms when measuring), then the
    optimizer's update; replayed from CUDA graphs when `graphs` is on."""

    def __init__(self, model: nn.Module, task: Task, optimizer: torch.optim.Optimizer, micro_batches: int,
                 norms: MicroBatchNorms | None, graphs: bool):
        self.model, self.task, self.optimizer, self.norms = model, task, optimizer, norms
        super().__init__(micro_batches, graphs)

    def _step(self, x, y, micro_batches) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        result = compute_gradients(self.model, self.task, x, y, micro_batches, self.norms)
        self.optimizer.step()
        return result


def train(config: RunConfig | dict, out_dir: str | Path | None = None) -> dict:
    """Run one configuration to its goals and return its record (also written to out_dir/record.json)."""
    if isinstance(config, dict):
        config = RunConfig.from_dict(config)
    task = config.validate()
    monitor = RunMonitor(config, out_dir)
    try:
        _train_loop(config, task, monitor)
    except Exception as exc:
        monitor.fail(exc)
        raise
    return monitor.record


def _train_loop(config: RunConfig, task: Task, monitor: RunMonitor) -> None:
    setup_start = time.perf_counter()
    device = pick_device(config.device)
    graphs = use_cuda_graphs(config.cuda_graphs, device, config.batch_size)
    B = config.batch_size
    torch.manual_seed(config.seed)
    task.load(device)
    model = task.make_model().to(device)
    model.train()
    optimizer = make_optimizer(model.parameters(), config.optimizer, capturable=graphs)
    data_generator = torch.Generator(device=device).manual_seed(config.seed)
    sampler = None if task.dataset_size is None else BatchSampler(task.dataset_size, B, config.sampling,
                                                                   data_generator, device)
    smoothed = SmoothedMetrics(task.batch_metrics, 1, B, config.smoothing.relative_window,
                               config.smoothing.min_examples, device)
    goal_index = smoothed_goal_index(config.goals.metric, task.batch_metrics)
    goals = None if goal_index is None else GoalCrossings(config.goals.thresholds, goal_index, 1, device)
    k = noise_micro_batches(B, config.noise_scale.micro_batches) if config.noise_scale.enabled else 1
    noise = NoiseMeasurements(B // k, B)
    norms = MicroBatchNorms(model)  # measuring steps in one pass where the model's layers allow
    norms = norms if norms.supported else None
    monitor.started(initial_mean_loss(model, task, B, config.smoothing.min_examples, config.seed, device),
                    device=str(device), setup_seconds=time.perf_counter() - setup_start,
                    noise_micro_batches=k, noise_measurement=None if k == 1 else "one pass" if norms else f"{k} passes",
                    path="plain", cuda_graphs=graphs)

    train_step = PlainSteps(model, task, optimizer, k, norms, graphs)

    start = time.perf_counter()
    schedule = log_steps(config.log.relative_interval)
    next_log, step = 0, 0  # log the initial state (step 0) before training
    while True:
        # ---- at geometrically spaced steps: curve point, goals, divergence, budget, checkpoint ----
        if step == next_log or step >= monitor.max_steps:
            noise.flush([monitor])
            crossed = goals.crossed_at[0].tolist() if goals is not None else [-1.0] * len(config.goals.thresholds)
            evaluated = task.evaluate(model) if task.eval_metrics else {}
            if train_step.failure:
                monitor.record["summary"].update(cuda_graphs=False, cuda_graph_failure=train_step.failure)
            if monitor.log(step, time.perf_counter() - start, smoothed.member_dicts()[0], evaluated, crossed):
                return
            while next_log <= step:
                next_log = next(schedule)

        # ---- one training step ----
        x, y = next_batch(task, sampler, B, data_generator)
        measure = k > 1 and step % config.noise_scale.every == 0
        result = train_step(x, y, measure)
        if measure:
            noise.add(result.small_sq_norm, result.big_sq_norm)
        smoothed.update(result.metrics, step)
        if goals is not None:
            goals.update(smoothed)
        step += 1
        if config.budget.max_seconds is not None and step % 64 == 0 \
                and time.perf_counter() - start >= config.budget.max_seconds:
            next_log = step  # log and stop at the top of the loop
