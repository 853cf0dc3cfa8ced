"""The squared norms that the noise scale needs — of k micro-batch gradients and of their mean —
from the one forward and backward pass of the full batch, instead of k passes of B/k examples.

A layer computes z_i = W a_i + b for each example i, so the gradient of the full batch's mean loss
is sum_i delta_i a_i^T, where delta_i is that loss's gradient with respect to z_i. The gradient of
micro-batch j's own mean loss is k * sum_{i in j} delta_i a_i^T: one batched matmul over the k
micro-batches gives all k of them from the activations and output gradients the pass already
computes. Rules here: Linear (any leading dims) and Conv1d/Conv2d (zero padding; on a GPU one
weight-gradient convolution with the micro-batches as groups). A model with any other layer that
holds trainable parameters (BatchNorm among them) is not `supported`, and critbatch.train then
runs the k passes instead: the rules are exact or not used, never an approximation.

In a model of these layers the examples do not interact (dropout masks included: each example's
mask is its own), so the shares are exactly the micro-batch gradients.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn


def _linear(module: nn.Linear, a: torch.Tensor, d: torch.Tensor, k: int) -> list[torch.Tensor]:
    a, d = a.reshape(k, -1, a.shape[-1]), d.reshape(k, -1, d.shape[-1])
    grads = [torch.bmm(d.transpose(1, 2), a)]
    if module.bias is not None:
        grads.append(d.sum(1))
    return grads


def _conv(module: nn.Conv1d | nn.Conv2d, a: torch.Tensor, d: torch.Tensor, k: int,
          grouped: bool | None = None) -> list[torch.Tensor]:
    """On a GPU the micro-batches become the groups of one weight-gradient convolution ([B, C, ...]
    -> [B/k, k*C, ...]; one launch, not k); on a CPU, where grouped convolutions are up to 2.4x
    slower than k plain ones, one plain weight-gradient convolution per micro-batch."""
    weight = module.weight
    weight_grad = torch.nn.grad.conv1d_weight if isinstance(module, nn.Conv1d) else torch.nn.grad.conv2d_weight
    d_micro = d.reshape(k, -1, *d.shape[1:])
    if a.is_cuda if grouped is None else grouped:
        n = a.shape[0] // k
        a = a.reshape(k, n, *a.shape[1:]).transpose(0, 1).reshape(n, -1, *a.shape[2:])
        d = d_micro.transpose(0, 1).reshape(n, -1, *d.shape[2:])
        grad = weight_grad(a, (k * weight.shape[0], *weight.shape[1:]), d, module.stride,
                           module.padding, module.dilation, module.groups * k)
        grads = [grad.reshape(k, *weight.shape)]
    else:
        grads = [torch.stack([weight_grad(a_j, weight.shape, d_j, module.stride, module.padding,
                                          module.dilation, module.groups)
                              for a_j, d_j in zip(a.chunk(k), d_micro)])]
    if module.bias is not None:
        grads.append(d_micro.sum((1, *range(3, d_micro.dim()))))
    return grads


# Layers whose micro-batch gradients the pass's recorded tensors give exactly. Not BatchNorm: it
# couples a batch's examples, and the data-parallel definition of a micro-batch gradient (each
# micro-batch normalised with its own statistics) is not a share of the full batch's pass, so a
# model with BatchNorm is measured by k passes.
RULES = {nn.Linear: _linear, nn.Conv1d: _conv, nn.Conv2d: _conv}


def _linear_sq_norm_without_shares(module: nn.Linear, a: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor | None:
    """sum_j |share_j|^2 of a Linear's weight (and bias) without forming the shares, from the Gram
    matrices of each micro-batch's rows: |D_j^T A_j|^2 = <A_j A_j^T, D_j D_j^T>, and with a bias
    (a column of ones appended to A_j) <A_j A_j^T + 1, D_j D_j^T>. None where forming the shares is
    cheaper (rows per micro-batch * (in + out) >= in * out) or only one of weight and bias trains."""
    rows, n_in, n_out = a.numel() // (k * a.shape[-1]), a.shape[-1], d.shape[-1]
    bias = module.bias is not None
    if rows * (n_in + n_out) >= n_in * n_out or not module.weight.requires_grad \
            or (bias and not module.bias.requires_grad):
        return None
    a, d = a.reshape(k, rows, n_in), d.reshape(k, rows, n_out)
    gram_a = torch.bmm(a, a.transpose(1, 2))
    if bias:
        gram_a.add_(1)
    return torch.dot(gram_a.reshape(-1), torch.bmm(d, d.transpose(1, 2)).reshape(-1))


def has_batchnorm(model: nn.Module) -> bool:
    """BatchNorm couples the examples of a batch (and updates statistics in place)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rule(module: nn.Module):
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
        return None
    return next((rule for kind, rule in RULES.items() if isinstance(module, kind)), None)


class MicroBatchNorms:
    """Records the activations and output gradients of one full-batch pass, then gives
    (mean_j |g_j|^2, |mean_j g_j|^2) over k equal micro-batches, as 0-d tensors on the device.

        norms = MicroBatchNorms(model)
        if norms.supported:
            with norms.recording():
                task.loss(model(x), y).backward()
            small, big = norms.sq_norms(k)
    """

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        self.rules = {id(m): _rule(m) for m in self.layers}  # looked up once, not on every measuring step
        self.supported = all(rule is not None for rule in self.rules.values())
        self.params = list({id(p): p for m in self.layers for p in m.parameters(recurse=False)
                            if p.requires_grad}.values())
        self._passes: list[tuple[nn.Module, dict]] = []

    @contextmanager
    def recording(self):
        """Keep each layer's input and output gradient during the pass inside this block.
        The gradients must be cleared (set to None) before: |mean_j g_j|^2 is read from p.grad."""
        if any(p.grad is not None for p in self.params):
            raise ValueError("MicroBatchNorms.recording: clear the gradients first "
                             "(model.zero_grad(set_to_none=True)); |g_big|^2 is read from p.grad")
        self._passes.clear()

        def keep(module, inputs, output):
            saved = {"input": inputs[0].detach()}
            self._passes.append((module, saved))
            if output.requires_grad:
                output.register_hook(lambda grad: saved.__setitem__("output_grad", grad))

        handles = [m.register_forward_hook(keep) for m in self.layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def sq_norms(self, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean over micro-batches of |g_j|^2, |mean_j g_j|^2) from the recorded pass."""
        k = micro_batches
        calls = Counter(id(module) for module, _ in self._passes)
        share_sq_norms = []  # sum_j |share_j|^2 of layers whose shares need not be formed
        shares: dict[int, torch.Tensor] = {}  # id(param) -> [k, numel], summed over a layer's calls
        for module, saved in self._passes:
            if "output_grad" not in saved:  # its output did not reach the loss
                continue
            a, d = saved["input"], saved["output_grad"]
            if isinstance(module, nn.Linear) and calls[id(module)] == 1:  # a reused layer's shares add up first
                sq_norm = _linear_sq_norm_without_shares(module, a, d, k)
                if sq_norm is not None:
                    share_sq_norms.append(sq_norm)
                    continue
            params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
            for p, g in zip(params, self.rules[id(module)](module, a, d, k)):
                if p.requires_grad:
                    g = g.reshape(k, -1)
                    shares[id(p)] = shares[id(p)] + g if id(p) in shares else g
        self._passes.clear()
        if shares:  # one [k, parameters] matrix: on a small model each op costs more than its arithmetic
            flat = torch.cat(list(shares.values()), dim=1).reshape(-1)
            share_sq_norms.append(torch.dot(flat, flat))  # dot: one BLAS call, unlike pow + sum
        # The hooks saw the gradient of the full batch's mean loss; micro-batch j's own mean loss has
        # k times its share as gradient, so mean_j |g_j|^2 = k sum_j |share_j|^2.
        small = torch.stack(share_sq_norms).sum() * k
        grads = torch.cat([p.grad.reshape(-1) for p in self.params if p.grad is not None])
        return small, torch.dot(grads, grads)
