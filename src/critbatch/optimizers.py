"""Optimizers by name: the torch optimizer of a plain run, and the same update rule over a pack's
stacked parameters with one learning rate per member (critbatch.packed.PackedOptimizer).

Adding an optimizer is one `register_optimizer` call (here, or in your own module: name it in
`optimizer.module` and it is imported before the optimizer is looked up) and, for sweeps, one
conf/optimizer/NAME.yaml. Its hyperparameters are OptimizerConfig's fields. The packed rule must
follow the torch optimizer's update exactly (a member's run is its plain twin's,
tests/test_packed.py), and keep every value that changes from step to step in tensors, so that a
step replayed from a CUDA graph is the same step (critbatch.cuda_graphs).

    >>> import torch
    >>> from critbatch.config import OptimizerConfig
    >>> p = torch.ones(2, 3)                       # 2 members of a 3-parameter model
    >>> rule = get_optimizer("sgd")
    >>> rule.packed_update(p, torch.ones(2, 3), torch.tensor([[0.25], [0.5]]), {}, OptimizerConfig(), torch.ones(()))
    >>> p[:, 0].tolist()
    [0.75, 0.5]
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch


class OptimizerError(ValueError):
    """An optimizer that is not registered, or whose module cannot be imported."""


@dataclass(frozen=True)
class Optimizer:
    """make(params, opt, capturable) -> torch.optim.Optimizer: the plain run's optimizer
    (`opt`: the run's OptimizerConfig; `capturable`: keep step counts on the device for CUDA
    graphs). packed_update(p, g, lr, state, opt, step): update the stacked parameters `p` [M, ...]
    in place from their gradients `g`, with `lr` [M, 1, ...] one lr per member, `state` this
    parameter's dict of optimizer tensors (empty at first) and `step` the step count, a tensor
    already advanced for this step."""

    make: Callable
    packed_update: Callable


OPTIMIZERS: dict[str, Optimizer] = {}


def register_optimizer(name: str, make: Callable, packed_update: Callable) -> Optimizer:
    """Register an optimizer under `name` (see Optimizer for the two functions)."""
    if name in OPTIMIZERS:
        raise OptimizerError(f"optimizer {name!r} is registered twice")
    OPTIMIZERS[name] = rule = Optimizer(make, packed_update)
    return rule


def get_optimizer(name: str, module: str | None = None) -> Optimizer:
    """The registered optimizer `name`, after importing `module` (where it is registered) if given."""
    if module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise OptimizerError(f"optimizer.module={module!r} cannot be imported: {exc}") from exc
    if name not in OPTIMIZERS:
        raise OptimizerError(f"optimizer.name={name!r} is not supported; choose one of {tuple(OPTIMIZERS)}"
                             + ("" if module else " (or register your own and name its module in optimizer.module)"))
    return OPTIMIZERS[name]


def make_optimizer(params, opt, capturable: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer for a plain run's `params` from its OptimizerConfig `opt`."""
    return get_optimizer(opt.name, opt.module).make(params, opt, capturable)


def _decayed(p, g, opt):
    """L2 weight decay added to the gradient, as torch.optim.SGD and Adam do."""
    return g + opt.weight_decay * p if opt.weight_decay else g


def _sgd(p, g, lr, state, opt, step):
    p.sub_(lr * _decayed(p, g, opt))


def _momentum(p, g, lr, state, opt, step):
    g = _decayed(p, g, opt)
    buf = state.get("momentum")
    state["momentum"] = buf = g.clone() if buf is None else buf.mul_(opt.momentum).add_(g)
    p.sub_(lr * buf)


def _adam(p, g, lr, state, opt, step):
    g = _decayed(p, g, opt)
    beta1, beta2 = opt.betas
    m = state.setdefault("exp_avg", torch.zeros_like(p)).mul_(beta1).add_(g, alpha=1 - beta1)
    v = state.setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(beta2).addcmul_(g, g, value=1 - beta2)
    correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = (v.sqrt() / correction2 ** 0.5).add_(opt.eps)
    p.sub_(lr / correction1 * m / denom)


register_optimizer("sgd", lambda params, opt, capturable: torch.optim.SGD(
    params, lr=opt.lr, weight_decay=opt.weight_decay), _sgd)
register_optimizer("momentum", lambda params, opt, capturable: torch.optim.SGD(
    params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay), _momentum)
register_optimizer("adam", lambda params, opt, capturable: torch.optim.Adam(
    params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
    capturable=capturable), _adam)
