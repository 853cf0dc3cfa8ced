"""The Hessian-aware noise scale B_noise = tr(H Sigma) / (G^T H G) (McCandlish et al. eq. 2.7),
measured online with the same two-batch trick as B_simple.

For a gradient g_b of a batch of b examples and the Hessian H' of an independent batch,

    E[g_b^T H' g_b] = E[g_b]^T E[H'] E[g_b] + tr(E[H'] Cov(g_b)) = G^T H G + tr(H Sigma) / b,

because H' is independent of g_b and unbiased for H, and Cov(g_b) = Sigma / b. A measuring step
splits its batch of B into k >= 3 micro-batches of b = B/k; micro-batch 1's Hessian H_1 is applied
(by Hessian-vector products, double backward) to micro-batch 0's gradient (size b) and to the mean
gradient of the other k - 1 micro-batches (size B(k-1)/k, micro-batch 1 left out so that it stays
independent of H_1). The two quadratic forms at two batch sizes give unbiased estimates of
G^T H G and tr(H Sigma) by the formulas of critbatch.gns.unbiased_sq_norm_and_trace, and a
critbatch.gns.NoiseScale averages them like |G|^2 and tr(Sigma): its `b_simple` is then B_noise.

Models with BatchNorm are not measured (the data-parallel micro-batch Hessian would need each
micro-batch normalised on its own inside a double backward): RunConfig.validate refuses them.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad, jvp, vmap


def curvature_batch_sizes(batch_size: int, micro_batches: int) -> tuple[int, int]:
    """(b, B_big) of the two quadratic forms: micro-batch 0, and the k - 1 micro-batches besides 1."""
    b = batch_size // micro_batches
    return b, b * (micro_batches - 1)


def curvature_forms(loss: Callable, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                    micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(g_0^T H_1 g_0, g_rest^T H_1 g_rest) on one batch split into k micro-batches, where
    `loss(params, x, y)` is the mean loss of a batch, g_j micro-batch j's gradient, g_rest the
    mean gradient of every micro-batch but 1 and H_1 micro-batch 1's Hessian. 0-d tensors; works
    under vmap (over packed members)."""
    k = micro_batches
    if k < 3:
        raise ValueError(f"B_noise needs at least 3 micro-batches (got {k}): the Hessian's micro-batch is left "
                         "out of the larger gradient, which must still be larger than one micro-batch")
    xs, ys = x.reshape(k, -1, *x.shape[1:]), y.reshape(k, -1, *y.shape[1:])
    grads = vmap(grad(loss), in_dims=(None, 0, 0), randomness="different")(params, xs, ys)  # [k, ...] each
    others = torch.tensor([j != 1 for j in range(k)], device=x.device)
    tangents = {name: torch.stack([g[0], g[others].mean(0)]) for name, g in grads.items()}  # g_0, g_rest

    def hessian_micro_batch_grad(p):
        return grad(loss)(p, xs[1], ys[1])

    def form(vector):  # vector^T H_1 vector
        _, h_vector = jvp(hessian_micro_batch_grad, (params,), (vector,))
        return sum((vector[name] * h_vector[name]).sum() for name in params)

    forms = vmap(form, randomness="different")(tangents)
    return forms[0], forms[1]

def curvature_forms_autograd(model: torch.nn.Module, loss: Callable, x: torch.Tensor, y: torch.Tensor,
                             micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """curvature_forms for one nn.Module, with plain autograd (double backward): on a CPU several
    times faster than the torch.func version, whose transforms cost more than a small model's
    arithmetic. `loss(output, y)` is the mean loss of a batch."""
    k = micro_batches
    if k < 3:
        raise ValueError(f"B_noise needs at least 3 micro-batches (got {k})")
    params = [p for p in model.parameters() if p.requires_grad]
    xs, ys = x.chunk(k), y.chunk(k)
    grads = [torch.autograd.grad(loss(model(xs[j]), ys[j]), params) for j in range(k) if j != 1]
    rest = [sum(per_param) / (k - 1) for per_param in zip(*grads)]  # micro-batches 0, 2, ..., k-1
    hessian_grad = torch.autograd.grad(loss(model(xs[1]), ys[1]), params, create_graph=True)
    forms = []
    for vector in (grads[0], rest):
        h_vector = torch.autograd.grad(hessian_grad, params, grad_outputs=vector, retain_graph=True)
        forms.append(sum((v * hv).sum() for v, hv in zip(vector, h_vector)))
    return forms[0].detach(), forms[1].detach()


def b_noise_at(model: torch.nn.Module, loss: Callable, batches, micro_batches: int, draws: int):
    """B_noise of `model` as it is (fixed parameters): a plain-mean NoiseScale (critbatch.gns) of
    the curvature forms on `draws` batches from `batches` (e.g. critbatch.batches.Batches), each
    split into `micro_batches`."""
    from critbatch.gns import NoiseScale

    estimate = NoiseScale()
    for _ in range(draws):
        x, y = batches.next()
        small, big = curvature_forms_autograd(model, loss, x, y, micro_batches)
        estimate.update(float(small), float(big), *curvature_batch_sizes(len(x), micro_batches))
    return estimate


#: how the B_simple-named fields of a NoiseScale read when it measures curvature
_NAMES = {"b_simple": "b_noise", "b_simple_se": "b_noise_se", "grad_sq_norm": "grad_h_grad",
          "grad_sq_norm_se": "grad_h_grad_se", "trace_sigma": "trace_h_sigma", "trace_sigma_se": "trace_h_sigma_se",
          "noise_cov": "curvature_cov", "noise_updates": "curvature_updates", "b_simple_resolved": "b_noise_resolved"}


# the fields that curvature_state writes (a record's B_noise estimate)
CURVATURE_FIELDS = tuple(_NAMES.values())


def curvature_state(estimate) -> dict:
    """A NoiseScale fed with curvature forms, as a record stores it: B_noise, G^T H G, tr(H Sigma)."""
    return {_NAMES[key]: value for key, value in estimate.state().items()}
