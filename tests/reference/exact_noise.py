"""Exact gradient statistics of a model on a finite dataset, from per-example gradients, written
independently of critbatch's estimator: the truth that online B_simple is checked against.

For i.i.d. batches drawn with replacement from N examples, the per-example gradient g_i has mean
G = (1/N) sum_i g_i and covariance Sigma = (1/N) sum_i g_i g_i^T - G G^T (the population
covariance), so tr(Sigma) = mean_i |g_i|^2 - |G|^2 and B_simple = tr(Sigma) / |G|^2.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap


def exact_gradient_statistics(model: torch.nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
                              chunk: int = 4096) -> dict[str, float]:
    """|G|^2, tr(Sigma) and B_simple of `model` over the whole dataset, in float64 sums. The model
    is evaluated as it is (train or eval mode); it must have no BatchNorm (examples independent)."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b for name, b in model.named_buffers()}

    def example_loss(p, x, y):
        return loss_fn(functional_call(model, (p, buffers), (x[None],)), y[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), randomness="different")
    total = None
    sq_sum = 0.0
    for start in range(0, len(inputs), chunk):
        grads = per_example(params, inputs[start:start + chunk], targets[start:start + chunk])
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1).double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        sq_sum += float(flat.pow(2).sum())
    n = len(inputs)
    mean = total / n
    grad_sq_norm = float(mean @ mean)
    trace_sigma = sq_sum / n - grad_sq_norm
    return {"grad_sq_norm": grad_sq_norm, "trace_sigma": trace_sigma, "b_simple": trace_sigma / grad_sq_norm}
