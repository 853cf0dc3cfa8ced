"""The gradient noise scale B_simple = tr(Sigma) / |G|^2, estimated online (McCandlish et al. App. A.1).

Two gradient norms over batches of sizes B_small < B_big give unbiased estimates

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

because E|G_B|^2 = |G|^2 + tr(Sigma)/B. Each estimate is noisy (and can be negative), so each is
smoothed by its own EMA and B_simple is the ratio of the two EMAs, not an EMA of ratios (a ratio
of noisy quantities is biased and heavy-tailed).
"""
from __future__ import annotations

import math

import torch


def unbiased_sq_norm_and_trace(small_sq_norm: float, big_sq_norm: float,
                               small_batch: float, big_batch: float) -> tuple[float, float]:
    """One unbiased estimate of (|G|^2, tr(Sigma)) from squared gradient norms at two batch sizes."""
    if not 0 < small_batch < big_batch:
        raise ValueError(f"need 0 < small_batch < big_batch, got small_batch={small_batch}, "
                         f"big_batch={big_batch}")
    grad_sq_norm = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace_sigma = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq_norm, trace_sigma


class NoiseScale:
    """Online B_simple from pairs of squared gradient norms; drop it into any training loop.

    >>> noise = NoiseScale(beta=0.99)
    >>> noise.update(small_sq_norm=2.0, big_sq_norm=1.2, small_batch=32, big_batch=128)
    >>> noise.b_simple  # tr(Sigma) / |G|^2 from the smoothed estimates
    """

    def __init__(self, beta: float = 0.99):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        self.beta = beta
        self.updates = 0
        self._sq_norm_ema = 0.0
        self._trace_ema = 0.0
        self._weight = 0.0  # sum of EMA weights, for Adam-style bias correction

    def update(self, small_sq_norm: float, big_sq_norm: float, small_batch: float, big_batch: float) -> None:
        sq_norm, trace = unbiased_sq_norm_and_trace(float(small_sq_norm), float(big_sq_norm),
                                                    small_batch, big_batch)
        self._sq_norm_ema = self.beta * self._sq_norm_ema + (1 - self.beta) * sq_norm
        self._trace_ema = self.beta * self._trace_ema + (1 - self.beta) * trace
        self._weight = self.beta * self._weight + (1 - self.beta)
        self.updates += 1

    @property
    def grad_sq_norm(self) -> float:
        """Smoothed estimate of |G|^2 (NaN before the first update)."""
        return self._sq_norm_ema / self._weight if self.updates else math.nan

    @property
    def trace_sigma(self) -> float:
        """Smoothed estimate of tr(Sigma), the per-example gradient variance summed over parameters."""
        return self._trace_ema / self._weight if self.updates else math.nan

    @property
    def b_simple(self) -> float:
        """tr(Sigma) / |G|^2 from the smoothed estimates; NaN until |G|^2 is estimated positive."""
        sq_norm = self.grad_sq_norm
        if not sq_norm > 0:
            return math.nan
        return self.trace_sigma / sq_norm

    def state(self) -> dict:
        return {"b_simple": self.b_simple, "grad_sq_norm": self.grad_sq_norm,
                "trace_sigma": self.trace_sigma, "updates": self.updates}


def micro_batch_sq_norms(micro_grads: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over micro-batches of |g_i|^2, |mean_i g_i|^2) for k equal micro-batch gradients.

    Averaging the k small-batch norms (each unbiased for |G|^2 + tr(Sigma)/B_small) lowers the
    variance at no extra cost; the mean gradient is the exact full-batch gradient. Returns 0-d
    tensors on the gradients' device so that a GPU loop need not synchronise here.
    """
    k = len(micro_grads)
    small = sum(g.pow(2).sum() for grads in micro_grads for g in grads) / k
    big = sum(torch.stack(per_param).mean(0).pow(2).sum() for per_param in zip(*micro_grads))
    return small, big
