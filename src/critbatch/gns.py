"""The gradient noise scale B_simple = tr(Sigma) / |G|^2, estimated online (McCandlish et al. App. A.1).

Two gradient norms over batches of sizes B_small < B_big give unbiased estimates

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

because E|G_B|^2 = |G|^2 + tr(Sigma)/B. Each estimate is noisy (and can be negative), so each is
averaged on its own and B_simple is the ratio of the two averages, not an average of ratios (a
ratio of noisy quantities is biased and heavy-tailed). The estimator also keeps the spread of the
estimates it averaged, so it can say how well |G|^2 is resolved: when B_simple is much larger
than the batch, one measurement's |G|^2 estimate is mostly noise and only many of them pin it down.

The average is a plain mean of every update (`NoiseScale()`, for a fixed point such as the
initial parameters) or an exponential moving average of one of two kinds:
- `NoiseScale(beta=0.99)`: a fixed factor per update (bias-corrected), for any training loop;
- `NoiseScale(relative_window=0.1, min_window=...)`: a window of `relative_window` times the
  step count (never fewer than `min_window` steps), passed as `update(..., step=s, every=n)`. A
  long run and a short one are then treated alike: the estimate at a step is local to it, not
  an average over the whole run (a fixed window is both, depending on the run's length).
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


def unbiased_estimates_covariance(var_small: float, var_big: float, cov: float, small_batch: float,
                                  big_batch: float) -> tuple[float, float, float]:
    """(var |G|^2, var tr(Sigma), their covariance) of the unbiased_sq_norm_and_trace estimates
    whose two squared norms have these variances and covariance (the estimates are linear in them)."""
    a_small, a_big = -small_batch / (big_batch - small_batch), big_batch / (big_batch - small_batch)
    c = 1.0 / (1.0 / small_batch - 1.0 / big_batch)
    var_g = a_small ** 2 * var_small + a_big ** 2 * var_big + 2 * a_small * a_big * cov
    var_t = c * c * (var_small + var_big - 2 * cov)
    cov_gt = c * (a_small * var_small - a_big * var_big + (a_big - a_small) * cov)
    return var_g, var_t, cov_gt


class ProgressWindow:
    """The weight of each new value in an EMA whose window grows with training progress:
    `relative_window` x the step count, but at least `min_window` steps, and a plain running mean
    until that much has been seen. `gap` is the number of steps one value stands for (a value
    measured every n steps stands for n). The centre of mass of the weights (`center_step`) is
    kept too: the average estimates the quantity there, which removes the EMA's lag to first order."""

    def __init__(self, relative_window: float, min_window: float = 0.0):
        if not relative_window > 0 or not min_window >= 0:
            raise ValueError(f"need relative_window > 0 and min_window >= 0, got {relative_window}, {min_window}")
        self.relative_window, self.min_window = relative_window, min_window
        self.covered = 0.0       # steps the values seen so far stand for
        self.center_step = 0.0

    def weight(self, step: float, gap: float = 1.0) -> float:
        """Advance by one value measured at `step`; return its weight in the average."""
        self.covered += gap
        window = max(self.relative_window * step, self.min_window, 1.0)
        alpha = min(1.0, max(gap / window, gap / self.covered))
        self.center_step = (1 - alpha) * self.center_step + alpha * step
        return alpha

    @property
    def ready(self) -> bool:
        """True once the values seen stand for at least min_window steps."""
        return self.covered >= self.min_window

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


# The moments averaged: |G|^2, tr(Sigma), their squares and their product (for standard errors).
_G, _T, _GG, _TT, _GT = range(5)


class NoiseScale:
    """Online B_simple from pairs of squared gradient norms; drop it into any training loop.

    Args:
        beta: EMA factor per update (e.g. 0.99), bias-corrected. Give this or relative_window, or
            neither for a plain mean of all updates.
        relative_window: window as a fraction of the step count (e.g. 0.1); `update` then needs
            `step` (the step count when measured) and `every` (steps between measurements).
        min_window: the smallest window, in steps (with relative_window).

    Attributes after updates: `grad_sq_norm`, `trace_sigma` (the averaged unbiased estimates),
    `b_simple` (their ratio; NaN while |G|^2 is not estimated positive), their standard errors
    (`*_se`, from the spread of the averaged estimates), `resolved` (|G|^2 above twice its
    standard error) and `updates`.

    >>> noise = NoiseScale(beta=0.99)
    >>> measured = noise.update(small_sq_norm=2.0, big_sq_norm=1.2, small_batch=32, big_batch=128)
    >>> noise.grad_sq_norm, noise.trace_sigma        # one update: that update's unbiased estimates
    (0.9333333333333332, 34.13333333333333)
    >>> round(noise.b_simple, 3)                     # tr(Sigma) / |G|^2
    36.571
    """

    def __init__(self, beta: float | None = None, *, relative_window: float | None = None,
                 min_window: float = 0.0):
        if beta is not None and relative_window is not None:
            raise ValueError("give one of beta (a fixed EMA factor) and relative_window, not both")
        if beta is not None and not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        self.beta = beta
        self.window = None if relative_window is None else ProgressWindow(relative_window, min_window)
        self.updates = 0
        self._moments = [0.0] * 5
        self._weight = 0.0     # sum of the EMA weights (below 1 until a bias-corrected EMA fills)
        self._weight_sq = 0.0  # sum of their squares: 1/effective number of updates, once normalised

    def update(self, small_sq_norm: float, big_sq_norm: float, small_batch: float, big_batch: float,
               step: float | None = None, every: float = 1.0) -> tuple[float, float]:
        """Average in one measurement; return its own unbiased (|G|^2, tr(Sigma)) estimates."""
        g, t = unbiased_sq_norm_and_trace(float(small_sq_norm), float(big_sq_norm), small_batch, big_batch)
        if self.beta is not None:
            alpha = 1.0 - self.beta
        elif self.window is None:
            alpha = 1.0 / (self.updates + 1)
        else:
            if step is None:
                raise ValueError("NoiseScale(relative_window=...) needs update(..., step=...)")
            alpha = self.window.weight(step, every)
        for i, value in enumerate((g, t, g * g, t * t, g * t)):
            self._moments[i] += alpha * (value - self._moments[i])
        self._weight += alpha * (1.0 - self._weight)
        self._weight_sq = (1.0 - alpha) ** 2 * self._weight_sq + alpha ** 2
        self.updates += 1
        return g, t

    def _mean(self, i: int) -> float:
        return self._moments[i] / self._weight if self.updates else math.nan

    @property
    def grad_sq_norm(self) -> float:
        """Averaged unbiased estimate of |G|^2 (NaN before the first update)."""
        return self._mean(_G)

    @property
    def trace_sigma(self) -> float:
        """Averaged unbiased estimate of tr(Sigma), the per-example gradient variance summed over parameters."""
        return self._mean(_T)

    @property
    def b_simple(self) -> float:
        """tr(Sigma) / |G|^2 from the averaged estimates; NaN until |G|^2 is estimated positive."""
        sq_norm = self.grad_sq_norm
        return self.trace_sigma / sq_norm if sq_norm > 0 else math.nan

    def _covariances(self) -> tuple[float, float, float]:
        """Standard-error-squared of the averaged |G|^2 and tr(Sigma), and their covariance, from
        the weighted spread of the estimates (NaN with fewer than two updates)."""
        share_sq = self._weight_sq / self._weight ** 2 if self.updates else 1.0  # 1/effective count
        if self.updates < 2 or share_sq >= 1.0:
            return math.nan, math.nan, math.nan
        g, t = self.grad_sq_norm, self.trace_sigma
        scale = share_sq / (1.0 - share_sq)  # unbiased weighted variance, times the mean's share
        var_g = max(self._mean(_GG) - g * g, 0.0) * scale
        var_t = max(self._mean(_TT) - t * t, 0.0) * scale
        return var_g, var_t, (self._mean(_GT) - g * t) * scale

    @property
    def grad_sq_norm_se(self) -> float:
        return math.sqrt(self._covariances()[0])

    @property
    def trace_sigma_se(self) -> float:
        return math.sqrt(self._covariances()[1])

    @property
    def b_simple_se(self) -> float:
        """Delta-method standard error of b_simple (NaN when b_simple is)."""
        b, (var_g, var_t, cov) = self.b_simple, self._covariances()
        g, t = self.grad_sq_norm, self.trace_sigma
        if not math.isfinite(b) or not math.isfinite(var_g) or t == 0:
            return math.nan
        return abs(b) * math.sqrt(max(var_t / t ** 2 + var_g / g ** 2 - 2 * cov / (g * t), 0.0))

    @property
    def resolved(self) -> bool:
        """|G|^2 is estimated above twice its standard error: B_simple is a measurement, not noise."""
        return bool(self.grad_sq_norm > 2 * self.grad_sq_norm_se)

    @property
    def center_step(self) -> float:
        """The step at which the windowed average is centred (NaN for a beta EMA, which has no steps)."""
        return self.window.center_step if self.window is not None else math.nan

    def state(self) -> dict:
        """What a curve point or a goal records of the estimate."""
        var_g, var_t, cov = self._covariances()
        return {"b_simple": self.b_simple, "b_simple_se": self.b_simple_se,
                "grad_sq_norm": self.grad_sq_norm, "grad_sq_norm_se": math.sqrt(var_g),
                "trace_sigma": self.trace_sigma, "trace_sigma_se": math.sqrt(var_t),
                "noise_cov": cov, "noise_updates": self.updates, "b_simple_resolved": self.resolved}

    def state_dict(self) -> dict:
        state = {k: v for k, v in vars(self).items() if k != "window"}
        state["_moments"] = list(self._moments)
        if self.window is not None:
            state["window"] = self.window.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        window = state.pop("window", None)
        vars(self).update(state)
        self._moments = list(self._moments)
        if window is not None:
            self.window.load_state_dict(window)


def noise_micro_batches(batch_size: int, wanted: int) -> int:
    """The largest k <= wanted that splits the batch into equal micro-batches (1: cannot measure)."""
    for k in range(min(wanted, batch_size), 1, -1):
        if batch_size % k == 0:
            return k
    return 1


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
