"""Exact gradient statistics of a model on a finite dataset, from per-example gradients, written
independently of critbatch's estimator: the truth that online B_simple is checked against.

For i.i.d. batches drawn with replacement from N examples, the per-example gradient g_i has mean
G = (1/N) sum_i g_i and covariance Sigma = (1/N) sum_i g_i g_i^T - G G^T (the population
covariance), so tr(Sigma) = mean_i |g_i|^2 - |G|^2 and B_simple = tr(Sigma) / |G|^2.
exact_noise_scales adds the Hessian H of the training loss: B_noise = tr(H Sigma) / (G^T H G).
"""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call, grad, jvp, vmap


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


# ---------------------------------------------------------------------------------------------
# B_noise: the same per-example gradients, weighted by the exact Hessian of the training loss


def _flat(tree: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
    """A dict of tensors as one vector (or one row per leading index when batch_dims == 1)."""
    if batch_dims:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tree.values()], dim=1)
    return torch.cat([t.reshape(-1) for t in tree.values()])


def _unflat(rows: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows of flat vectors (m, P) as a dict of (m, *shape) tensors shaped like `like`."""
    out, start = {}, 0
    for name, p in like.items():
        out[name] = rows[:, start:start + p.numel()].reshape(rows.shape[0], *p.shape)
        start += p.numel()
    return out


def exact_noise_scales(model: torch.nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor,
                       chunk: int = 256, dtype: torch.dtype | None = torch.float64) -> dict[str, float]:
    """B_simple and B_noise of `model` over a finite dataset, exactly (paper eq. 2.7):

        B_noise = tr(H Sigma) / (G^T H G),  tr(H Sigma) = mean_i g_i^T H g_i - G^T H G,

    with g_i the per-example gradients (vmap of grad), G their mean, Sigma their population
    covariance (as for exact_gradient_statistics: batches are drawn with replacement) and H the
    Hessian of the mean loss over the whole dataset, applied as Hessian-vector products (forward
    over reverse: jvp of grad), `chunk` tangents at a time under vmap, never formed as a matrix.

    The model must be deterministic (no dropout in train mode, no BatchNorm): H must be the
    Hessian of one function. `dtype` (float64 by default) is the precision of a copy of the model
    and of the floating inputs the whole computation runs in (None: as they are).
    Returns grad_sq_norm, trace_sigma, b_simple, gHg, trace_h_sigma, b_noise.
    """
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
        inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
        targets = targets.to(dtype) if targets.is_floating_point() else targets
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    n = len(inputs)

    def example_loss(p, x, y):
        return loss_fn(functional_call(model, (p, buffers), (x[None],)), y[None])

    def full_loss(p):
        # the mean over the dataset as a size-weighted sum over chunks (memory), exactly the mean
        total = 0.0
        for start in range(0, n, 4096):
            x, y = inputs[start:start + 4096], targets[start:start + 4096]
            total = total + loss_fn(functional_call(model, (p, buffers), (x,)), y) * (len(x) / n)
        return total

    def hvp(tangent):
        return jvp(grad(full_loss), (params,), (tangent,))[1]

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    hessian_times = vmap(hvp)  # randomness="error": a random model has no single Hessian
    g_rows = torch.cat([_flat(per_example(params, inputs[s:s + chunk], targets[s:s + chunk]), batch_dims=1)
                        for s in range(0, n, chunk)])
    mean = g_rows.mean(0)
    mean_g_h_g = 0.0
    for start in range(0, n, chunk):
        rows = g_rows[start:start + chunk]
        mean_g_h_g += float((rows * _flat(hessian_times(_unflat(rows, params)), batch_dims=1)).sum()) / n
    g_h_g = float(mean @ _flat(hessian_times(_unflat(mean[None], params)), batch_dims=1)[0])
    grad_sq_norm = float(mean @ mean)
    trace_sigma = float(g_rows.pow(2).sum()) / n - grad_sq_norm
    trace_h_sigma = mean_g_h_g - g_h_g
    return {"grad_sq_norm": grad_sq_norm, "trace_sigma": trace_sigma, "b_simple": trace_sigma / grad_sq_norm,
            "gHg": g_h_g, "trace_h_sigma": trace_h_sigma, "b_noise": trace_h_sigma / g_h_g}
