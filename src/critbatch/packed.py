"""Train every learning rate of one batch size as one packed model: the fast path for small models.

Small-batch runs of small models are bound by kernel launches, not FLOPs. M runs that differ only
in their learning rate share everything else — the initial parameters (same seed), the batch
stream (same seed) — so they can run as one model whose parameters carry a leading member
dimension: torch.func.vmap over the members turns M small kernels into one batched kernel.

PackedModel and PackedOptimizer are the machinery of critbatch.steps.PackedStep: each member is
judged exactly as its plain twin is (the same batches in the same order, the same smoothing and
goal crossings), and members that finish or diverge leave the pack and stop costing compute. The k
micro-batch gradients of the noise scale come from one more vmap, over the micro-batches.

Not for models with BatchNorm (running statistics are updated in place, which vmap cannot do per
member): `packable` says so from the architecture before any data is loaded, and their runs train
one by one.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from critbatch.config import PACK_AXES, ConfigError, RunConfig, without
from critbatch.micro_grads import has_batchnorm
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

    def state_dict(self) -> dict:
        return {"params": self.params, "buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        device = next(iter(self.params.values())).device
        self.params = {k: v.to(device) for k, v in state["params"].items()}
        self.buffers = {k: v.to(device) for k, v in state["buffers"].items()}


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

    def state_dict(self) -> dict:
        return {"lrs": self.lrs, "steps": self.steps, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        device = self.lrs.device
        self.lrs, self.steps = state["lrs"].to(device), state["steps"].to(device)
        self.state = {name: {k: v.to(device) for k, v in s.items()} for name, s in state["state"].items()}


def packable(config: RunConfig) -> bool:
    """Whether this run's model can train packed; decided from the architecture alone (built on
    the meta device), before any data is loaded: models with BatchNorm cannot (vmap cannot update
    running statistics per member in place). Nor can branch runs and their trunks
    (critbatch.branches): they load and save one plain step's state."""
    if config.branch is not None or config.log.states_at_steps or config.log.states_at_goals:
        return False
    with torch.device("meta"):
        return not has_batchnorm(config.build_task().make_model())


def check_packable(configs: list[RunConfig]) -> None:
    if len({pack_key(c) for c in configs}) != 1:
        raise ConfigError("the runs of a pack may differ only in optimizer.lr")
    if not packable(configs[0]):
        raise NotPackable(f"task {configs[0].task['name']!r}: models with BatchNorm cannot be packed; "
                          "set packing.enabled=false")
