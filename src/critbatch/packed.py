"""Train every learning rate of one batch size as one packed model: the fast path for small models.

Small-batch runs of small models are bound by kernel launches, not FLOPs. M runs that differ only
in their learning rate share everything else — the initial parameters (same seed), the batch
stream (same seed) — so they can run as one model whose parameters carry a leading member
dimension: torch.func.vmap over the members turns M small kernels into one batched kernel.

Each member is judged exactly as its plain twin (critbatch.train) is, through the same
RunMonitor: the same batches in the same order, the same smoothing and goal crossings. Members
that finish or diverge leave the pack at the next logged step and stop costing compute.
The k micro-batch gradients that the noise scale needs come from one more vmap (over the
micro-batches), so a measuring step costs about what a plain step does.
On a CUDA device the step (and the measuring step) is captured once in a CUDA graph and replayed
(critbatch.cuda_graphs): the vmapped step's many small kernels then cost one launch.

Not for models with BatchNorm (running statistics are updated in place, which vmap cannot do per
member): such models raise NotPackable, and their runs go through the plain loop.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from critbatch.config import ConfigError, RunConfig
from critbatch.cuda_graphs import TrainSteps, use_cuda_graphs
from critbatch.monitor import (GoalCrossings, NoiseMeasurements, RunMonitor, SmoothedMetrics, log_steps,
                               smoothed_goal_index)
from critbatch.tasks import Task
from critbatch.train import (BatchSampler, has_batchnorm, initial_mean_loss, next_batch, noise_micro_batches,
                             pick_device)


class NotPackable(ConfigError):
    """The model cannot train packed (BatchNorm); train its runs with critbatch.train instead."""


def pack_key(config: RunConfig) -> str:
    """Runs with equal keys differ at most in their learning rate and can share a pack."""
    values = config.to_dict()
    values["optimizer"] = {k: v for k, v in values["optimizer"].items() if k != "lr"}
    values.pop("log", None)
    return repr(sorted(values.items()))


class PackedModel:
    """M copies of one architecture as stacked parameters [M, ...], stepped by vmap over members."""

    def __init__(self, task: Task, models: list[nn.Module]):
        params, self.buffers = stack_module_state(models)
        self.params = {name: value.detach() for name, value in params.items()}
        base = copy.deepcopy(models[0]).to("meta")  # the architecture only; weights come stacked

        def loss_and_metrics(p, b, x, y):
            output = functional_call(base, (p, b), (x,))
            loss = task.loss(output, y)
            return loss, task.metrics(output, y, loss)

        step = grad_and_value(loss_and_metrics, has_aux=True)
        self._per_member = vmap(step, in_dims=(0, 0, None, None), randomness="different")
        # Micro-batch gradients for the noise scale: an inner vmap over the k micro-batches.
        self._per_member_micro = vmap(vmap(step, in_dims=(None, None, 0, 0), randomness="different"),
                                      in_dims=(0, 0, None, None), randomness="different")

    def gradients(self, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1):
        """Per-member full-batch gradients and batch metrics; with k > 1 micro-batches also the
        per-member (mean |g_small|^2, |g_big|^2) of the noise-scale estimator (else None)."""
        if micro_batches <= 1:
            grads, (_, metrics) = self._per_member(self.params, self.buffers, x, y)
            return grads, metrics, None
        k, B = micro_batches, x.shape[0]
        xs, ys = x.reshape(k, B // k, *x.shape[1:]), y.reshape(k, B // k, *y.shape[1:])
        micro_grads, (_, micro_metrics) = self._per_member_micro(self.params, self.buffers, xs, ys)
        grads = {name: g.mean(1) for name, g in micro_grads.items()}  # exactly the full-batch gradient
        small = sum(g.pow(2).flatten(2).sum(2) for g in micro_grads.values()).mean(1)
        big = sum(g.pow(2).flatten(1).sum(1) for g in grads.values())
        return grads, {name: value.mean(1) for name, value in micro_metrics.items()}, (small, big)

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        return {name: value[i] for name, value in {**self.params, **self.buffers}.items()}

    def keep(self, members: torch.Tensor) -> None:
        self.params = {name: value[members] for name, value in self.params.items()}
        self.buffers = {name: value[members] for name, value in self.buffers.items()}


class PackedOptimizer:
    """SGD, momentum SGD and Adam over stacked parameters with one learning rate per member, with
    the update rules of torch.optim (so a member follows its unpacked twin within float rounding)."""

    def __init__(self, params: dict[str, torch.Tensor], opt, lrs: torch.Tensor):
        self.opt, self.lrs = opt, lrs
        # A tensor, not a Python int, so that a step replayed from a CUDA graph counts too.
        self.steps = torch.zeros((), dtype=torch.float64, device=lrs.device)
        self.state = {name: {} for name in params}

    def _lr(self, p: torch.Tensor) -> torch.Tensor:
        return self.lrs.view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        self.steps.add_(1)
        opt = self.opt
        for name, p in params.items():
            g = grads[name]
            if opt.weight_decay:
                g = g + opt.weight_decay * p
            lr, state = self._lr(p), self.state[name]
            if opt.name == "sgd":
                p.sub_(lr * g)
            elif opt.name == "momentum":
                buf = state.get("momentum")
                state["momentum"] = buf = g.clone() if buf is None else buf.mul_(opt.momentum).add_(g)
                p.sub_(lr * buf)
            else:  # adam
                beta1, beta2 = opt.betas
                m = state.setdefault("exp_avg", torch.zeros_like(p)).mul_(beta1).add_(g, alpha=1 - beta1)
                v = state.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(beta2).addcmul_(g, g, value=1 - beta2)
                correction1, correction2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
                denom = (v.sqrt() / correction2 ** 0.5).add_(opt.eps)
                p.sub_(lr / correction1 * m / denom)

    def keep(self, members: torch.Tensor) -> None:
        self.lrs = self.lrs[members]
        self.state = {name: {k: v[members] for k, v in s.items()} for name, s in self.state.items()}


class PackedSteps(TrainSteps):
    """The pack's step: per-member gradients (with the noise-scale norms when measuring), then the
    update; replayed from CUDA graphs when `graphs` is on. Call reset() when members leave."""

    def __init__(self, packed: PackedModel, optimizer: PackedOptimizer, micro_batches: int, graphs: bool):
        self.packed, self.optimizer = packed, optimizer
        super().__init__(micro_batches, graphs)

    def _step(self, x, y, micro_batches):
        grads, metrics, norms = self.packed.gradients(x, y, micro_batches)
        self.optimizer.step(self.packed.params, grads)
        return metrics, norms


def train_packed(configs: list[RunConfig | dict], out_dirs: list[str | Path | None]) -> list[dict]:
    """Train runs that differ only in lr as one packed model; return their records (as `train`)."""
    configs = [RunConfig.from_dict(c) if isinstance(c, dict) else c for c in configs]
    if len({pack_key(c) for c in configs}) != 1:
        raise ConfigError("train_packed: the runs of a pack may differ only in optimizer.lr")
    task = configs[0].validate()
    monitors = [RunMonitor(c, d) for c, d in zip(configs, out_dirs)]
    try:
        _packed_loop(configs[0], task, monitors, [c.optimizer.lr for c in configs])
    except Exception as exc:
        for monitor in monitors:
            if not monitor.finished:
                monitor.fail(exc)
        raise
    return [m.record for m in monitors]


def _packed_loop(config: RunConfig, task: Task, monitors: list[RunMonitor], lrs: list[float]) -> None:
    setup_start = time.perf_counter()
    device = pick_device(config.device)
    graphs = use_cuda_graphs(config.cuda_graphs, device, config.batch_size)
    B, M = config.batch_size, len(monitors)
    # The same seeding as the plain loop, so every member starts where its twin starts.
    torch.manual_seed(config.seed)
    task.load(device)
    rng = torch.get_rng_state()
    models = []
    for _ in range(M):
        torch.set_rng_state(rng)
        models.append(task.make_model().to(device).train())
    if has_batchnorm(models[0]):
        raise NotPackable(f"task {task.name!r}: models with BatchNorm cannot be packed; set packing.enabled=false")
    packed = PackedModel(task, models)
    evaluation_model = models[0]  # a scratch module to evaluate one member at a time
    optimizer = PackedOptimizer(packed.params, config.optimizer, torch.tensor(lrs, device=device))
    data_generator = torch.Generator(device=device).manual_seed(config.seed)
    sampler = None if task.dataset_size is None else BatchSampler(task.dataset_size, B, config.sampling,
                                                                   data_generator, device)

    smoothed = SmoothedMetrics(task.batch_metrics, M, B, config.smoothing.relative_window,
                               config.smoothing.min_examples, device)
    goal_index = smoothed_goal_index(config.goals.metric, task.batch_metrics)
    goals = None if goal_index is None else GoalCrossings(config.goals.thresholds, goal_index, M, device)
    k = noise_micro_batches(B, config.noise_scale.micro_batches) if config.noise_scale.enabled else 1
    noise = NoiseMeasurements(B // k, B)
    initial_loss = initial_mean_loss(models[0], task, B, config.smoothing.min_examples, config.seed, device)
    for monitor in monitors:
        monitor.started(initial_loss, device=str(device), setup_seconds=time.perf_counter() - setup_start,
                        noise_micro_batches=k, noise_measurement=None if k == 1 else "vmap over micro-batches",
                        path="packed", packed_members=M, cuda_graphs=graphs)
    train_step = PackedSteps(packed, optimizer, k, graphs)

    alive = list(monitors)
    start = time.perf_counter()
    schedule = log_steps(config.log.relative_interval)
    next_log, step = 0, 0
    while True:
        if step == next_log or step >= monitors[0].max_steps:
            noise.flush(alive)
            now = time.perf_counter() - start
            crossed = (goals.crossed_at.tolist() if goals is not None
                       else [[-1.0] * len(config.goals.thresholds)] * len(alive))
            failure = train_step.failure
            for i, (monitor, metrics) in enumerate(zip(alive, smoothed.member_dicts())):
                evaluated = {}
                if task.eval_metrics:
                    evaluation_model.load_state_dict(packed.member_state(i))
                    evaluated = task.evaluate(evaluation_model)
                if failure:
                    monitor.record["summary"].update(cuda_graphs=False, cuda_graph_failure=failure)
                monitor.log(step, now, metrics, evaluated, crossed[i])
            keep = [i for i, m in enumerate(alive) if not m.finished]
            if not keep:
                return
            if len(keep) < len(alive):  # finished and diverged members leave the pack
                members = torch.tensor(keep, device=device)
                packed.keep(members)
                optimizer.keep(members)
                smoothed.keep(members)
                if goals is not None:
                    goals.keep(members)
                alive = [alive[i] for i in keep]
                train_step.reset()
            while next_log <= step:
                next_log = next(schedule)

        x, y = next_batch(task, sampler, B, data_generator)
        measure = k > 1 and step % config.noise_scale.every == 0
        metrics, norms = train_step(x, y, measure)
        if measure:
            noise.add(*norms)
        smoothed.update(metrics, step)
        if goals is not None:
            goals.update(smoothed)
        step += 1
        if config.budget.max_seconds is not None and step % 64 == 0 \
                and time.perf_counter() - start >= config.budget.max_seconds:
            next_log = step
