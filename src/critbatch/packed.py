"""Train every learning rate of one batch size as one packed model: the fast path for small models.

Small-batch runs of small models are bound by kernel launches, not FLOPs. M runs that differ only
in their learning rate share everything else — the initial parameters (same seed), the batch
stream (same seed) — so they can run as one model whose parameters carry a leading member
dimension: torch.func.vmap over the members turns M small kernels into one batched kernel.

PackedStep is the step object of critbatch.train's one loop: each member is judged exactly as its
plain twin is, the same batches in the same order, the same smoothing and goal crossings. Members
that finish or diverge leave the pack at the next logged step and stop costing compute.
The k micro-batch gradients that the noise scale needs come from one more vmap (over the
micro-batches), so a measuring step costs about what a plain step does.
On a CUDA device the step (and the measuring step) is captured once in a CUDA graph and replayed
(critbatch.cuda_graphs): the vmapped step's many small kernels then cost one launch.

Not for models with BatchNorm (running statistics are updated in place, which vmap cannot do per
member): `packable` says so from the architecture before any data is loaded, and their runs train
one by one.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from critbatch.config import PACK_AXES, ConfigError, RunConfig, without
from critbatch.cuda_graphs import TrainSteps
from critbatch.curvature import curvature_forms
from critbatch.optimizers import get_optimizer
from critbatch.tasks import Task


class NotPackable(ConfigError):
    """The model cannot train packed (BatchNorm); train its runs one by one instead."""


def pack_key(config: RunConfig) -> str:
    """Runs with equal keys differ at most in their learning rate (config.PACK_AXES) and can
    share a pack: every other setting, present or added later, must be equal."""
    return repr(sorted(without(config.to_dict(), PACK_AXES).items()))


class PackedModel:
    """M copies of one architecture as stacked parameters [M, ...], stepped by vmap over members."""

    def __init__(self, task: Task, models: list[nn.Module]):
        params, self.buffers = stack_module_state(models)
        self.params = {name: value.detach() for name, value in params.items()}
        base = self.base = copy.deepcopy(models[0]).to("meta")  # the architecture only; weights come stacked
        self.task = task

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
    """The registered optimizers (critbatch.optimizers: SGD, momentum SGD, Adam, ...) over stacked
    parameters with one learning rate per member, with the update rules of torch.optim (so a
    member follows its unpacked twin within float rounding)."""

    def __init__(self, params: dict[str, torch.Tensor], opt, lrs: torch.Tensor):
        self.opt, self.lrs = opt, lrs
        self.rule = get_optimizer(opt.name, opt.module)
        # A tensor, not a Python int, so that a step replayed from a CUDA graph counts too.
        self.steps = torch.zeros((), dtype=torch.float64, device=lrs.device)
        self.state = {name: {} for name in params}

    def _lr(self, p: torch.Tensor) -> torch.Tensor:
        return self.lrs.view(-1, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        self.steps.add_(1)
        for name, p in params.items():
            self.rule.packed_update(p, grads[name], self._lr(p), self.state[name], self.opt, self.steps)

    def keep(self, members: torch.Tensor) -> None:
        self.lrs = self.lrs[members]
        self.state = {name: {k: v[members] for k, v in s.items()} for name, s in self.state.items()}


class PackedStep(TrainSteps):
    """The pack's training step: per-member gradients (with the noise-scale norms when measuring),
    then the update; replayed from CUDA graphs when `graphs` is on. The same interface as the
    plain loop's PlainStep: returns (metrics, norms), per-member tensors of shape [M]."""

    def __init__(self, configs: list[RunConfig], task: Task, device, micro_batches: int, graphs: bool):
        rng = torch.get_rng_state()  # every member starts where its plain twin starts
        models = []
        for _ in configs:
            torch.set_rng_state(rng)
            models.append(task.make_model().to(device).train())
        self.packed = PackedModel(task, models)
        self.scratch = models[0]  # a module to evaluate one member at a time
        self.members = len(configs)
        self.optimizer = PackedOptimizer(self.packed.params, configs[0].optimizer,
                                         torch.tensor([c.optimizer.lr for c in configs], device=device))
        self.noise_measurement = None if micro_batches == 1 else "vmap over micro-batches"
        self._loaded: int | None = None
        super().__init__(micro_batches, graphs)

    def _step(self, x, y, micro_batches):
        grads, metrics, norms = self.packed.gradients(x, y, micro_batches)
        self.optimizer.step(self.packed.params, grads)
        self._loaded = None
        return metrics, norms

    def measure(self, x, y, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise-scale norms on this batch, without an update."""
        return self.packed.gradients(x, y, micro_batches)[2]

    def module(self, member: int) -> nn.Module:
        """A module holding one member's current parameters (for evaluation)."""
        if self._loaded != member:
            self.scratch.load_state_dict(self.packed.member_state(member))
            self._loaded = member
        return self.scratch

    def curvature(self, x, y, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's curvature forms on this batch (critbatch.curvature), without an update."""
        packed, task = self.packed, self.packed.task

        def member(params, buffers):
            def loss(p, xs, ys):
                return task.loss(functional_call(packed.base, (p, buffers), (xs,)), ys)
            return curvature_forms(loss, params, x, y, micro_batches)

        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # dropout here leaves training's stream
            small, big = vmap(member, randomness="different")(packed.params, packed.buffers)
        return small.detach(), big.detach()

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every member's parameters (for the noise probe at a goal's crossing)."""
        return {name: value.clone() for name, value in self.packed.params.items()}

    @contextlib.contextmanager
    def swapped(self, snapshot: dict[str, torch.Tensor]):
        """The parameters of `snapshot` in place of the current ones, in the same tensors."""
        current = self.snapshot()
        for name, value in snapshot.items():
            self.packed.params[name].copy_(value)
        self._loaded = None
        try:
            yield
        finally:
            for name, value in current.items():
                self.packed.params[name].copy_(value)
            self._loaded = None

    def keep(self, members: torch.Tensor) -> None:
        self.packed.keep(members)
        self.optimizer.keep(members)
        self._loaded = None

    def state_dict(self) -> dict:
        opt = self.optimizer
        return {"params": self.packed.params, "buffers": self.packed.buffers,
                "optimizer": {"lrs": opt.lrs, "steps": opt.steps, "state": opt.state}}

    def load_state_dict(self, state: dict) -> None:
        device = self.optimizer.lrs.device
        self.packed.params = {k: v.to(device) for k, v in state["params"].items()}
        self.packed.buffers = {k: v.to(device) for k, v in state["buffers"].items()}
        opt = state["optimizer"]
        self.optimizer.lrs, self.optimizer.steps = opt["lrs"].to(device), opt["steps"].to(device)
        self.optimizer.state = {name: {k: v.to(device) for k, v in s.items()} for name, s in opt["state"].items()}
        self._loaded = None


def packable(config: RunConfig | dict) -> bool:
    """Whether this run's model can train packed; decided from the architecture alone (built on
    the meta device), before any data is loaded: models with BatchNorm cannot (vmap cannot update
    running statistics per member in place)."""
    from critbatch.train import has_batchnorm

    config = RunConfig.from_dict(config) if isinstance(config, dict) else config
    with torch.device("meta"):
        return not has_batchnorm(config.build_task().make_model())


def check_packable(configs: list[RunConfig]) -> None:
    if len({pack_key(c) for c in configs}) != 1:
        raise ConfigError("the runs of a pack may differ only in optimizer.lr")
    if not packable(configs[0]):
        raise NotPackable(f"task {configs[0].task['name']!r}: models with BatchNorm cannot be packed; "
                          "set packing.enabled=false")
