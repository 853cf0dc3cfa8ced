"""The squared norms that the noise scale needs — of k micro-batch gradients and of their mean —
from the one forward and backward pass of the full batch, instead of k passes of B/k examples.

A layer computes z_i = W a_i + b for each example i, so the gradient of the full batch's mean loss
is sum_i delta_i a_i^T, where delta_i is that loss's gradient with respect to z_i. The gradient of
micro-batch j's own mean loss is k * sum_{i in j} delta_i a_i^T: one batched matmul over the k
micro-batches gives all k of them from the activations and output gradients the pass already
computes. Every rule takes a layer's input and output gradient with the examples along the first
dimension (rows in batch order, any dimensions after it: [B, T, d] sequences sum over positions).

Rules here:
- Linear (any leading dims): the shares, or, where cheaper and the parameters are used by this one
  call only, sum_j |share_j|^2 from Gram matrices without forming them (_linear_sq_norm_without_shares).
- Conv1d/Conv2d (zero padding; on a GPU one weight-gradient convolution with the micro-batches as groups).
- LayerNorm and RMSNorm: grad gamma = sum g * xhat, grad beta = sum g over a micro-batch's rows,
  with xhat recomputed from the recorded input.
- Embedding (token or position ids): the output gradients of the rows that share an id add up
  before squaring; without max_norm (it rewrites the table during the forward pass),
  scale_grad_by_freq (it scales by counts over the whole batch, coupling its examples) or sparse.
- PositionalEmbedding (below): a learned position table added to [B, T, d] activations.
A parameter used by several calls (a layer applied twice, or tied input and output embeddings: one
table in an Embedding and a Linear head) has the shares of all its calls added per micro-batch
before squaring, so their cross terms count. A model with any other layer that holds trainable
parameters (BatchNorm, nn.MultiheadAttention's fused in_proj among them) is not `supported`, and
critbatch.train then runs the k passes instead: the rules are exact or not used, never an
approximation. tests/test_micro_grads.py checks each rule against torch.func per-example gradients.

In a model of these layers the examples do not interact (dropout masks included: each example's
mask is its own), so the shares are exactly the micro-batch gradients.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F


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


def _affine_norm(module: nn.LayerNorm | nn.RMSNorm, a: torch.Tensor, d: torch.Tensor, k: int) -> list[torch.Tensor]:
    """gamma's share is sum g * xhat over the micro-batch's rows, beta's sum g; xhat is recomputed
    from the input (a norm without its affine part), which costs one normalisation."""
    shape = tuple(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):
        x_hat = F.layer_norm(a, shape, eps=module.eps)
    else:
        x_hat = F.rms_norm(a, shape, eps=module.eps)
    d = d.reshape(k, -1, *shape)
    grads = [(d * x_hat.reshape(k, -1, *shape)).sum(1)]
    if getattr(module, "bias", None) is not None:
        grads.append(d.sum(1))
    return grads


def _embedding(module: nn.Embedding, ids: torch.Tensor, d: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The table's share: each micro-batch's output gradients summed into the rows of their ids."""
    rows, dim = module.num_embeddings, d.shape[-1]
    offsets = torch.arange(k, device=ids.device).unsqueeze(1) * rows  # micro-batch j's table at rows j*n...
    flat = (ids.reshape(k, -1) + offsets).reshape(-1)
    shares = d.new_zeros(k * rows, dim).index_add_(0, flat, d.reshape(-1, dim))
    shares = shares.reshape(k, rows, dim)
    if module.padding_idx is not None:  # its row gets no gradient
        shares[:, module.padding_idx] = 0
    return [shares]


class PositionalEmbedding(nn.Module):
    """A learned position table added to activations x of shape [B, T, dim]: x + weight[:T].

    A layer of its own so that the micro-batch rules see its gradient per example (the output
    gradient [B, T, dim]); a table indexed by arange(T) and broadcast over the batch would sum
    over the examples before any hook could split them."""

    def __init__(self, max_positions: int, dim: int, std: float = 0.02):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(max_positions, dim) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[:x.shape[-2]]


def _positional(module: PositionalEmbedding, a: torch.Tensor, d: torch.Tensor, k: int) -> list[torch.Tensor]:
    positions, dim = d.shape[-2], d.shape[-1]
    share = d.reshape(k, -1, positions, dim).sum(1)
    return [F.pad(share, (0, 0, 0, module.weight.shape[0] - positions))]  # rows past T get no gradient


# Layers whose micro-batch gradients the pass's recorded tensors give exactly. Not BatchNorm: it
# couples a batch's examples, and the data-parallel definition of a micro-batch gradient (each
# micro-batch normalised with its own statistics) is not a share of the full batch's pass, so a
# model with BatchNorm is measured by k passes.
RULES = {nn.Linear: _linear, nn.Conv1d: _conv, nn.Conv2d: _conv, nn.LayerNorm: _affine_norm,
         nn.RMSNorm: _affine_norm, nn.Embedding: _embedding, PositionalEmbedding: _positional}


def _linear_sq_norm_without_shares(module: nn.Linear, a: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor | None:
    """sum_j |share_j|^2 of a Linear's weight (and bias) without forming the shares, from the Gram
    matrices of each micro-batch's rows (over its examples and, for [B, T, in] inputs, their
    positions): |D_j^T A_j|^2 = <A_j A_j^T, D_j D_j^T>, and with a bias (a column of ones appended
    to A_j) <A_j A_j^T + 1, D_j D_j^T>. None where forming the shares is cheaper (rows per
    micro-batch * (in + out) >= in * out) or only one of weight and bias trains."""
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


def _embedding_sq_norm_without_shares(module: nn.Embedding, ids: torch.Tensor, d: torch.Tensor,
                                      k: int) -> torch.Tensor | None:
    """sum_j |share_j|^2 of an Embedding's table without a [k, num_embeddings, dim] tensor: the
    output gradients summed per (micro-batch, id) pair that occurs, then squared. None where the
    table's shares are as small as the recorded gradients (k * num_embeddings <= rows)."""
    dim = d.shape[-1]
    if k * module.num_embeddings <= d.numel() // dim:
        return None
    keys = (ids.reshape(k, -1) + torch.arange(k, device=ids.device).unsqueeze(1) * module.num_embeddings).reshape(-1)
    d = d.reshape(-1, dim)
    if module.padding_idx is not None:
        d = d * (ids.reshape(-1, 1) != module.padding_idx)
    pairs, which = torch.unique(keys, return_inverse=True)
    summed = d.new_zeros(len(pairs), dim).index_add_(0, which, d).reshape(-1)
    return torch.dot(summed, summed)


# Where sum_j |share_j|^2 can be had without the shares (for a parameter no other call uses).
SQ_NORMS_WITHOUT_SHARES = {nn.Linear: _linear_sq_norm_without_shares, nn.Embedding: _embedding_sq_norm_without_shares}


def has_batchnorm(model: nn.Module) -> bool:
    """BatchNorm couples the examples of a batch (and updates statistics in place)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _rule(module: nn.Module):
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.padding_mode != "zeros":
        return None
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq
                                             or module.sparse):
        return None
    return next((rule for kind, rule in RULES.items() if isinstance(module, kind)), None)


def _own_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters a rule returns shares for, in its order (weight, then bias)."""
    return [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]


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
        passes = [(module, saved) for module, saved in self._passes if "output_grad" in saved]  # reached the loss
        # A parameter that several calls use (a layer called twice, a table tied between two
        # layers) needs the shares of all of them added before squaring: the cross terms count.
        uses = Counter(id(p) for module, _ in passes for p in _own_params(module) if p.requires_grad)
        share_sq_norms = []  # sum_j |share_j|^2 of parameters whose shares need not be formed
        shares: dict[int, torch.Tensor] = {}  # id(param) -> [k, numel], summed over the calls that use it
        for module, saved in passes:
            a, d = saved["input"], saved["output_grad"]
            params = _own_params(module)
            without_shares = next((rule for kind, rule in SQ_NORMS_WITHOUT_SHARES.items() if isinstance(module, kind)),
                                  None)
            if without_shares is not None and all(uses[id(p)] == 1 for p in params if p.requires_grad):
                sq_norm = without_shares(module, a, d, k)
                if sq_norm is not None:
                    share_sq_norms.append(sq_norm)
                    continue
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
