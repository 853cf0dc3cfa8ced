"""What a training loop keeps track of besides the parameters: smoothed metrics, goal crossings,
the noise scale, the curve and the record; and, apart from that bookkeeping, the decision to stop.

SmoothedMetrics and GoalCrossings hold a leading "member" dimension (1 for a plain run, M for M
packed runs) and live on the device: they are updated every step without a host sync. A RunBook
is one run's host-side book: it is consulted at the logged steps only.
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import socket
import time
from pathlib import Path

import numpy as np
import torch

from critbatch import records
from critbatch.branches import states_pending
from critbatch.config import RunConfig
from critbatch.curvature import CURVATURE_FIELDS, curvature_state
from critbatch.gns import NoiseScale, ProgressWindow, unbiased_estimates_covariance

NOT_YET = -1.0     # GoalCrossings: the goal has not been met
CENSORED = -2.0    # it was met already at the first valid measurement: when is unknown


def log_steps(relative_interval: float, start: int = 1):
    """Steps 1, 2, 3, ... then geometrically spaced, `relative_interval` apart (from `start` on)."""
    step = 1
    while True:
        if step >= start:
            yield step
        step = max(step + 1, int(step * (1 + relative_interval)))


def max_steps(config: RunConfig) -> float:
    """The step budget implied by max_steps and max_examples (inf when neither is set)."""
    budget = config.budget
    limits = [budget.max_steps, math.ceil(budget.max_examples / config.batch_size) if budget.max_examples else None]
    limits = [s for s in limits if s is not None]
    return min(limits) if limits else math.inf


class SmoothedMetrics:
    """EMAs of metrics whose window is max(relative_window * step, min_examples / B) steps
    (critbatch.gns.ProgressWindow), with the centre step of their weights: the smoothed value
    estimates the metric there, which removes the EMA's lag to first order. Values measured every
    step (batch metrics) and values measured at some steps only (evaluated metrics, `gap` steps
    apart) are smoothed alike. Shape [members, metrics]."""

    def __init__(self, names, members: int, batch_size: int, relative_window: float, min_examples: int, device):
        self.names = tuple(names)
        self.values = torch.zeros(members, len(self.names), device=device)
        self.window = ProgressWindow(relative_window, min_examples / batch_size)

    def update(self, metrics: dict[str, torch.Tensor], step: int, gap: float = 1.0) -> None:
        """Add the metrics (0-d, or one per member) measured on the parameters after `step` updates."""
        alpha = self.window.weight(step, gap)
        new = torch.stack([torch.as_tensor(metrics[n], device=self.values.device).float().reshape(-1)
                           for n in self.names], dim=-1)
        self.values.mul_(1 - alpha).add_(new, alpha=alpha)

    @property
    def center_step(self) -> float:
        return self.window.center_step

    @property
    def ready(self) -> bool:
        """True once the average covers at least min_examples examples; goals wait until then."""
        return self.window.ready

    def keep(self, members: torch.Tensor) -> None:
        self.values = self.values[members]

    def member_dicts(self, prefix: str = "") -> list[dict[str, float]]:
        return [{f"{prefix}{n}": v for n, v in zip(self.names, row)} for row in self.values.tolist()]

    def state_dict(self) -> dict:
        return {"values": self.values.cpu(), "window": self.window.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.values = state["values"].to(self.values.device)
        self.window.load_state_dict(state["window"])


class GoalCrossings:
    """Per member and goal: the centre step at which the smoothed goal metric first fell to the
    threshold (NOT_YET; CENSORED when it was already there at the first valid measurement, so
    that the step is unknown), interpolated between the two smoothed values around the crossing.
    Checked on the device. Shape [members, goals]."""

    def __init__(self, thresholds, members: int, device):
        self.thresholds = torch.tensor(list(thresholds), device=device)
        self.crossed_at = torch.full((members, len(thresholds)), NOT_YET, device=device)
        self.previous: tuple[torch.Tensor, float] | None = None  # (smoothed values [M, 1], centre)

    def update(self, values: torch.Tensor, center_step: float) -> None:
        """`values`: the smoothed goal metric of each member [M], valid (its window is full)."""
        value = values.reshape(-1, 1).clone()  # the smoothed values change in place
        met = (self.crossed_at == NOT_YET) & (value <= self.thresholds)
        if self.previous is None:  # the first valid value: a goal met already is not a crossing
            self.crossed_at = torch.where(met, torch.full_like(self.crossed_at, CENSORED), self.crossed_at)
        else:
            before, before_center = self.previous  # above the threshold, where a goal is newly met
            share = ((before - self.thresholds) / (before - value).clamp_min(1e-30)).clamp(0, 1)
            at = before_center + share * (center_step - before_center)
            self.crossed_at = torch.where(met, at, self.crossed_at)
        self.previous = (value, center_step)

    def keep(self, members: torch.Tensor) -> None:
        self.crossed_at = self.crossed_at[members]
        if self.previous is not None:
            self.previous = (self.previous[0][members], self.previous[1])

    def state_dict(self) -> dict:
        previous = None if self.previous is None else (self.previous[0].cpu(), self.previous[1])
        return {"crossed_at": self.crossed_at.cpu(), "previous": previous}

    def load_state_dict(self, state: dict) -> None:
        device = self.crossed_at.device
        self.crossed_at = state["crossed_at"].to(device)
        previous = state["previous"]
        self.previous = None if previous is None else (previous[0].to(device), previous[1])


#: IdealSteps corrects a rate to second order only where the relative variance of its window's
#: denominator is at most this
MAX_DENOMINATOR_NOISE = 0.1


class IdealSteps:
    """Steps that a run at an infinite batch size would have needed for the progress made so far.

    The paper's model (eq. 2.10): one step at batch size B makes the progress of 1/(1 + B_noise/B)
    ideal steps, so S = S_min + E_min/B with S_min the ideal steps and E_min/S_min the average of
    B_noise over them. With a noise scale T/G (B_simple: T = tr(Sigma), G = |G|^2; B_noise: T =
    tr(H Sigma), G = G^T H G), measurement i at step s_i gives its own unbiased estimates g_i, t_i
    and its rate, held until the next measurement, is

        B g_i / (|G_i| B + T_i),   G_i, T_i: the mean of the OTHER measurements within s_i +- h_i,

    a window centred on s_i, as wide (2 h_i) as the noise-scale window (`relative_window` of the
    steps, at least `min_window` steps) and holding at least two measurements on either side,
    each measurement weighted by the steps it stands for.
    - Linear in the noisy g_i, so its noise averages out along the path instead of blowing up a
      ratio, and unbiased where G B << T.
    - Leave-one-out: g_i's own noise is not in its denominator (t_i, from the same two norms,
      carries the opposite noise, which would bias the rate low).
    - Centred: G and T fall along training, and a trailing window lags behind them. The newest
      measurements, within h of the last one, have only those before them and the few since:
      their rates are provisional until the window around them fills, and a goal keeps the value
      known when it was crossed. (How each choice was checked: docs/noise_scales.md.)
    From a run at batch size B, `path_average(s)` = B (s / ideal(s) - 1) is the noise scale
    averaged along the path to step s, weighted as B_crit weights it.

    Second order, where a measurement comes with its own noise covariance (`advance(...,
    noise=...)`, from replicate draws: B_noise with hessian_draws >= 2). Along an SGD path the
    true G swings from step to step (G^T H G by factors of e per step on linreg), and the rate
    G B/(G B + T) is concave in G: the rate at the window's mean G overstates the mean of the
    per-step rates, by up to 20% where G B is a fair share of T. The window's spread of g less the
    measurements' own noise is the path's variance of G, and the mean rate over a gamma
    distribution of that mean and variance replaces the rate at the mean. The noise of the
    window's means biases 1/denominator up (Jensen); that is corrected to second order too. Where
    the denominator is too noisy for either (relative variance above MAX_DENOMINATOR_NOISE), and
    without replicates, the rate stays first order (B_simple's, B_noise's with hessian_draws 1).
    docs/noise_scales.md has the checks.

    Its standard error (`path_average_se`): the delta method over every measurement's g and t
    (`ideal_variance`), the measurements' errors independent of one another. NaN from fewer than
    MIN_MEASUREMENTS measurements: a spread from so few says nothing."""

    MIN_MEASUREMENTS = 8

    def __init__(self, batch_size: int, relative_window: float = 0.1, min_window: float = 0.0):
        self.batch_size, self.relative_window, self.min_window = batch_size, relative_window, min_window
        # every measurement: its step, its own G and T, and the steps it stands for
        self.steps: list[float] = []
        self.grad: list[float] = []
        self.trace: list[float] = []
        self.gaps: list[float] = []
        # each measurement's own noise: variances of g and t and their covariance (NaN: unknown)
        self.noise: list[tuple[float, float, float]] = []
        self._cache: dict | None = None  # what _knots computed, and from how many measurements
        self._settled = np.zeros(0)  # second-order corrections whose windows are complete

    def advance(self, step: float, grad: float, trace: float, gap: float = 1.0,
                noise: tuple[float, float, float] | None = None) -> None:
        """A measurement at `step` of its own unbiased G and T, standing for `gap` steps;
        `noise`: its own (var G, var T, cov), from replicates, where known."""
        if self.steps and step <= self.steps[-1]:  # NoiseMeasurements measures at most once a step
            raise ValueError(f"measurements must come in step order: {step} after {self.steps[-1]}")
        self._cache = None
        self.steps.append(float(step))
        self.grad.append(float(grad))
        self.trace.append(float(trace))
        self.gaps.append(float(gap))
        self.noise.append(tuple(map(float, noise)) if noise is not None else (math.nan,) * 3)

    def _knots(self) -> dict:
        """From all measurements so far: each one's window, rate, and the ideal steps at each
        measurement's step."""
        if self._cache is not None and self._cache["count"] == len(self.steps):
            return self._cache
        s, g, t, w = (np.asarray(x, dtype=float) for x in (self.steps, self.grad, self.trace, self.gaps))
        # as wide as the noise-scale window, at least two measurements on either side, and
        # symmetric near the start, where G falls fastest (the first, alone, takes its own values)
        half = np.maximum(np.maximum(self.relative_window * s, self.min_window), 4 * w) / 2
        half = np.minimum(half, s - s[0])
        lo, hi = np.searchsorted(s, s - half, "left"), np.searchsorted(s, s + half, "right")
        sums = []
        for x in (w, w * g, w * t):  # each window's sum, leaving its own measurement out
            cumulative = np.concatenate([[0.0], np.cumsum(x)])
            sums.append(cumulative[hi] - cumulative[lo] - x)
        weight, sum_g, sum_t = sums
        alone = weight <= 1e-9 * w  # no other measurement near (the first, alone): its own values
        others = np.where(alone, 1.0, weight)
        window_g, window_t = np.where(alone, g, sum_g / others), np.where(alone, t, sum_t / others)
        denominator = np.abs(window_g) * self.batch_size + np.maximum(window_t, 0.0)
        scale = self.batch_size / np.where(denominator > 0, denominator, np.inf)
        rates = g * scale + self._second_order(s, g, t, w, lo, hi, alone, others, window_g, window_t, denominator)
        self._cache = dict(count=len(self.steps), s=s, g=g, t=t, w=w, lo=lo, hi=hi, alone=alone, others=others,
                           window_g=window_g, window_t=window_t, denominator=denominator, scale=scale,
                           rates=rates, ideal=np.concatenate([[0.0], np.cumsum(rates[:-1] * np.diff(s))]))
        return self._cache

    def _second_order(self, s, g, t, w, lo, hi, alone, others, window_g, window_t, denominator) -> np.ndarray:
        """What the rates miss where the measurements' own noise is known: the mean of the
        per-step rates over the path's swings of G (the window's spread less the measurements'
        noise), and the mean of 1/denominator over the noise of the window's means; 0 elsewhere.
        (IdealSteps' docstring says why.)"""
        noise = np.asarray(self.noise, dtype=float).reshape(-1, 3)
        known = np.isfinite(noise).all(axis=1)
        if not known.any():
            return np.zeros(len(s))

        def window_mean(x):  # over the window's other measurements, weighted by their steps
            cumulative = np.concatenate([[0.0], np.cumsum(w * x)])
            return (cumulative[hi] - cumulative[lo] - w * x) / others

        cumulative = np.concatenate([[0.0], np.cumsum(w * w)])
        effective = others ** 2 / np.maximum(cumulative[hi] - cumulative[lo] - w * w, 1e-300)  # members, in effect
        unbiased = effective / np.maximum(effective - 1.0, 1e-300)
        # the path's own variance of G: the window's spread less the measurements' noise; unbiased,
        # so not clipped at 0 (that would bias it up)
        path_gg = (window_mean(g * g) - window_g ** 2) * unbiased - window_mean(np.where(known, noise[:, 0], 0.0))
        B, G, T = self.batch_size, np.abs(window_g), np.maximum(window_t, 0.0)
        D = np.where(denominator > 0, denominator, np.inf)
        # E[1/D_w] = (1/D)(1 + var(D_w)/D^2): the first-order rate g B/D_w, divided by that. D_w
        # estimates the local mean, and varies about it by the window's whole spread (the path's
        # swings and the measurements' noise) over its effective count
        spread = [(window_mean(a * b) - window_a * window_b) * unbiased
                  for a, b, window_a, window_b in ((g, g, window_g, window_g), (t, t, window_t, window_t),
                                                   (g, t, window_g, window_t))]
        var_denominator = np.maximum(B * B * spread[0] + spread[1] + 2 * B * np.sign(window_g) * spread[2], 0.0) / effective
        # only where the window's denominator is known to about 30% (else the expansion runs
        # away): elsewhere the first-order rate stands
        usable = (known & ~alone & (effective >= 4) & np.isfinite(D)
                  & (var_denominator <= MAX_DENOMINATOR_NOISE * D ** 2))
        out = np.zeros(len(s))
        # a measurement whose window no longer grows (a later one lies beyond it) keeps its
        # correction: the gamma mean is costly, and _knots runs again at every logged step
        settled = self._settled[:len(s)]
        out[:len(settled)] = settled
        usable[:len(settled)] = False
        final = hi < len(s)
        if usable.any():
            out[usable] = self._corrections(usable, g, G, T, D, var_denominator, path_gg)
        self._settled = out[:int(np.argmin(final)) if not final.all() else len(s)].copy()
        return out

    def _corrections(self, usable, g, G, T, D, var_denominator, path_gg) -> np.ndarray:
        B = self.batch_size
        G, T, D, g, var_denominator, path_gg = (x[usable] for x in (G, T, D, g, var_denominator, path_gg))
        # r = G B/(G B + T) = G/(G + c), c = T/B, over G's swings: E[r] for a gamma-distributed G of
        # the window's mean and path variance (G^T H G swings by factors of e, far beyond where a
        # Taylor series holds). T swings little (it holds the loss's noise floor), and its window
        # spread is mostly measurement noise: its terms would add noise, not accuracy.
        swings = self._mean_rate_over_swings(G, T / B, path_gg) - G * B / D
        jensen = -g * B / D * var_denominator / D ** 2
        return np.where(np.isfinite(swings + jensen), swings + jensen, 0.0)

    @staticmethod
    def _mean_rate_over_swings(mean: np.ndarray, c: np.ndarray, variance: np.ndarray) -> np.ndarray:
        """E[X/(X + c)] for X gamma-distributed with this mean and variance, i.e. 1 - c E[1/(X + c)]
        with E[1/(X + c)] = U(1, 2 - k, c/theta)/theta (Tricomi's U; shape k, scale theta). Where the
        variance is not positive (an estimate below the noise it subtracts), the Taylor series
        mean/(mean + c) - c variance/(mean + c)^3, which is linear in it, so unbiased."""
        from scipy.special import hyperu

        taylor = mean / (mean + c) - c * variance / (mean + c) ** 3
        gamma = (variance > 0) & (mean > 0) & (c > 0) & np.isfinite(c)
        shape = np.where(gamma, mean ** 2 / np.where(gamma, variance, 1.0), 1.0)
        theta = np.where(gamma, variance / np.where(gamma, mean, 1.0), 1.0)
        with np.errstate(all="ignore"):
            mean_rate = 1.0 - c * hyperu(1.0, 2.0 - shape, c / theta) / theta
        return np.where(gamma & np.isfinite(mean_rate), mean_rate, taylor)

    def at(self, step: float) -> float:
        """ideal(step): the last measurement's knot at or before `step`, its rate held since
        (extrapolated past the last measurement)."""
        if not self.steps:
            return math.nan
        knots = self._knots()
        k = max(int(np.searchsorted(knots["s"], step, "right")) - 1, 0)
        return float(knots["ideal"][k] + knots["rates"][k] * (step - knots["s"][k]))

    def ideal_variance(self, step: float) -> float:
        """The variance of at(step), by the delta method over every measurement's g and t: g_i
        enters its own rate's numerator and, with t_i, the denominators of its neighbours' rates.
        Each measurement's variances and covariance of (g, t) are taken from its difference with
        the next one (the one before, for the last): half the squared difference, an
        overestimate where G and T change between them."""
        knots = self._knots()
        s, g, t, w, rates, scale = (knots[k] for k in ("s", "g", "t", "w", "rates", "scale"))
        n = int(np.searchsorted(s, step, "right"))  # the measurements whose rates ideal(step) holds
        if n == 0 or len(s) < 2:
            return 0.0
        held = np.append(np.diff(s), 0.0)
        held[n - 1] = step - s[n - 1]
        held[n:] = 0.0
        # d ideal / d denominator_i, spread over the window's members j: per unit of w_j
        per_member = -rates * held / np.where(knots["denominator"] > 0, knots["denominator"], np.inf) / knots["others"]
        lo, hi, alone = knots["lo"], knots["hi"], knots["alone"]
        d_g, d_t = np.zeros(len(s)), np.zeros(len(s))
        for derivative, factor in ((d_g, self.batch_size * np.sign(knots["window_g"])),
                                   (d_t, (knots["window_t"] > 0).astype(float))):
            a = np.where(alone, 0.0, per_member * factor)
            # each a_i over its window's members lo_i..hi_i-1: a difference array, summed up
            spread = np.bincount(lo, a, len(s) + 1) - np.bincount(hi, a, len(s) + 1)
            derivative += (np.cumsum(spread)[:-1] - a) * w  # the window leaves its own out
            derivative += np.where(alone, per_member * factor, 0.0)  # alone: its own values
        d_g += scale * held  # g_i in its own rate's numerator
        dg, dt = np.diff(g), np.diff(t)
        dg, dt = np.append(dg, dg[-1]), np.append(dt, dt[-1])
        return float(np.sum(d_g ** 2 * dg ** 2 + d_t ** 2 * dt ** 2 + 2 * d_g * d_t * dg * dt) / 2)

    def path_average(self, step: float) -> float:
        """The noise scale averaged along the path to `step` (NaN when the path was not measured
        from the start or its ideal progress is not positive: G not resolved)."""
        if not self.steps or self.steps[0] > 0 or step <= 0:
            return math.nan
        ideal = self.at(step)
        return self.batch_size * (step / ideal - 1.0) if ideal > 0 else math.nan

    def path_average_se(self, step: float) -> float:
        """Standard error of path_average(step): B step se(ideal) / ideal^2 (delta method)."""
        measurements = np.searchsorted(self.steps, step, "right")
        if not math.isfinite(self.path_average(step)) or measurements < self.MIN_MEASUREMENTS:
            return math.nan
        return self.batch_size * step * math.sqrt(self.ideal_variance(step)) / self.at(step) ** 2

    def state_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("_cache", "_settled")}

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)
        self._cache, self._settled = None, np.zeros(0)


def advance_path(ideal: IdealSteps, window: NoiseScale, measurement: tuple, step: int, gap: int,
                 form_cov: tuple | None = None) -> None:
    """Average one measurement (small and big norms or forms, small and big batch sizes) into the
    window, and its own estimates into the path average; `form_cov`: the (var small, var big,
    cov) of the measurement's two values, from replicates, where known."""
    grad, trace = window.update(*measurement, step=step, every=gap)
    noise = None if form_cov is None else unbiased_estimates_covariance(*form_cov, *measurement[2:])
    ideal.advance(step, grad, trace, gap, noise)


class RunBook:
    """One run's bookkeeping: its status, goals (records.GoalRecord), summary (records.Summary),
    curve and noise-scale estimates; its record is written atomically now and then and whenever
    the run ends. Whether the run should stop is decided elsewhere (stop_reason)."""

    def __init__(self, config: RunConfig, out_dir: str | Path | None, guard=None):
        self.config, self.guard = config, guard  # guard(): False when this writer no longer owns the run
        self.path = Path(out_dir) / records.RECORD_FILE if out_dir is not None else None
        ns, B = config.noise_scale, config.batch_size
        self.noise = NoiseScale(relative_window=ns.relative_window, min_window=ns.min_examples / B)
        self.ideal = IdealSteps(B, ns.relative_window, ns.min_examples / B)
        # B_noise: the same estimator fed with curvature forms (critbatch.curvature), its own path average
        self.curvature = NoiseScale(relative_window=ns.relative_window, min_window=ns.min_examples / B)
        self.ideal_noise = IdealSteps(B, ns.relative_window, ns.min_examples / B)
        self.config_dict = config.to_dict()
        self.run_id, self.run_name = records.run_id(self.config_dict), records.run_name(self.config_dict)
        self.status = records.Status.running
        self.goals = [records.GoalRecord(metric=config.goals.metric, threshold=t) for t in config.goals.thresholds]
        self.summary = records.Summary(host=socket.gethostname(), pid=os.getpid(), torch=torch.__version__,
                                       python=platform.python_version())
        self.curve: dict[str, list] = {}
        self.max_steps = max_steps(config)
        self.initial_loss = math.nan
        self._last_save = time.perf_counter()
        self.save()

    @property
    def record(self) -> dict:
        """The record as it is written (docs/records.md)."""
        return records.make_record(self.config_dict, self.status, self.goals, self.summary, self.curve)

    @property
    def finished(self) -> bool:
        return self.status.finished

    def save(self) -> None:
        if self.guard is not None and not self.guard():
            raise records.NotOwner(f"{self.path}: this job no longer owns the run; its record is not written")
        if self.path is not None:
            records.write_record(self.path, self.record)
        self._last_save = time.perf_counter()

    def note(self, **facts) -> None:
        """Facts for the summary (an unknown name is a TypeError: records.Summary lists them)."""
        self.summary = dataclasses.replace(self.summary, **facts)

    def started(self, initial_loss: float, initial_noise: dict | None = None, **facts) -> None:
        """Set-up done: the reference loss for divergence, the noise scales at initialisation, and
        facts for the summary (device, path, ...)."""
        self.initial_loss = initial_loss
        self.note(initial_loss=initial_loss, **(initial_noise or {}), **facts)

    def add_noise(self, small_sq_norm: float, big_sq_norm: float, small_batch: int, big_batch: int,
                  step: int, gap: int, form_cov: tuple | None = None) -> None:
        """One measurement of the squared norms, on the parameters after `step` updates, `gap`
        steps after the previous one (`form_cov`: see advance_path)."""
        advance_path(self.ideal, self.noise, (small_sq_norm, big_sq_norm, small_batch, big_batch), step, gap,
                     form_cov)

    def add_curvature(self, small_form: float, big_form: float, small_batch: int, big_batch: int,
                      step: int, gap: int, form_cov: tuple | None = None) -> None:
        """One measurement of the curvature forms g^T H g at two batch sizes (for B_noise)."""
        advance_path(self.ideal_noise, self.curvature, (small_form, big_form, small_batch, big_batch), step, gap,
                     form_cov)

    def _noise_state(self) -> dict:
        """The window's noise estimates now."""
        return {**self.noise.state(), **curvature_state(self.curvature)}

    def _path_state(self, step: float) -> dict:
        return {"b_simple_path": self.ideal.path_average(step), "b_simple_path_se": self.ideal.path_average_se(step),
                "b_noise_path": self.ideal_noise.path_average(step),
                "b_noise_path_se": self.ideal_noise.path_average_se(step), "ideal_steps": self.ideal.at(step)}

    def log(self, step: int, now: float, metrics: dict[str, float], crossed_at: list[float]) -> None:
        """A curve point at `step` and the goals newly reached (crossed_at: per goal, a centre
        step, NOT_YET or CENSORED). A goal gets the window's noise estimate now; goal_noise
        replaces it with a probe at the crossing parameters."""
        B = self.config.batch_size
        for index, (goal, crossed) in enumerate(zip(self.goals, crossed_at)):
            if goal.reached or crossed == NOT_YET:
                continue
            if crossed == CENSORED:
                self.goals[index] = dataclasses.replace(goal, reached=True, censored=True, step_at_most=step)
                continue
            wall = float(np.interp(crossed, self.curve.get("step", []) + [step],
                                   self.curve.get("wall_time", []) + [now]))
            self.goals[index] = dataclasses.replace(
                goal, reached=True, censored=False, step=crossed, examples=crossed * B, wall_time=wall,
                **self._noise_state(), noise_source="window", noise_center_step=self.noise.center_step,
                **self._path_state(crossed))
        point = records.CurvePoint(step=step, examples=step * B, wall_time=now, **self._noise_state(),
                                   **self._path_state(step))
        columns = {name: value for name, value in dataclasses.asdict(point).items() if not name.endswith("_resolved")}
        for key, value in {**columns, **metrics}.items():
            self.curve.setdefault(key, []).append(value)
        self.note(steps=step, examples=step * B, wall_time=now, noise_measurements=len(self.ideal.steps),
                  curvature_measurements=len(self.ideal_noise.steps))

    def goal_noise(self, index: int, state: dict, probed_at: int) -> None:
        """The noise scales at goal `index`, probed at the parameters after `probed_at` updates.
        Where the probe did not measure B_noise, the goal keeps none (the window's, from the few
        Hessian measurements near the goal, is far off there: docs/noise_scales.md); the curve
        keeps it."""
        unmeasured = {name: None for name in records.field_names(records.CurvatureFields)}
        self.goals[index] = dataclasses.replace(self.goals[index], **{**unmeasured, **state}, noise_source="probe",
                                                probed_at=probed_at)

    def finish(self, status: records.Status, reason: str) -> None:
        self.status = records.Status(status)
        self.note(reason=reason)
        self.save()

    def save_now_and_then(self) -> None:
        """Rewrite the partial record at most every log.checkpoint_seconds, so a killed job leaves one."""
        if time.perf_counter() - self._last_save > self.config.log.checkpoint_seconds:
            self.save()

    def fail(self, exc: BaseException) -> None:
        """Record an exception, so the sweep goes on and the analysis sees the failure."""
        self.note(error=f"{type(exc).__name__}: {exc}")
        self.finish(records.Status.failed, "exception")

    def state_dict(self) -> dict:
        return {"status": self.status.value, "goals": [dataclasses.asdict(g) for g in self.goals],
                "summary": dataclasses.asdict(self.summary), "curve": self.curve,
                "noise": self.noise.state_dict(), "ideal": self.ideal.state_dict(),
                "curvature": self.curvature.state_dict(), "ideal_noise": self.ideal_noise.state_dict(),
                "initial_loss": self.initial_loss}

    def load_state_dict(self, state: dict) -> None:
        self.status = records.Status(state["status"])
        self.goals = [records.GoalRecord(**g) for g in state["goals"]]
        self.summary = records.Summary(**state["summary"])
        self.curve = state["curve"]
        self.noise.load_state_dict(state["noise"])
        self.ideal.load_state_dict(state["ideal"])
        self.curvature.load_state_dict(state["curvature"])
        self.ideal_noise.load_state_dict(state["ideal_noise"])
        self.initial_loss = state["initial_loss"]


def stalled(curve: dict[str, list], keys: list[str], step: int, min_steps: int, improvement: float) -> bool:
    """True when, at `step` >= min_steps, none of the curve's `keys` (smoothed loss and goal metric,
    lower is better) improved by `improvement` (relative) over the last half of the run: its best
    value since step/2 is not that much below its best value up to step/2."""
    if not min_steps or step < min_steps:
        return False
    steps = np.asarray(curve["step"], dtype=float)
    early = (steps > 0) & (steps <= step / 2)
    late = steps > step / 2
    for key in keys:
        values = np.asarray(curve.get(key, []), dtype=float)
        if len(values) != len(steps) or not early.any() or not late.any():
            return False
        before, after = np.nanmin(values[early], initial=np.inf), np.nanmin(values[late], initial=np.inf)
        if not np.isfinite(before) or after < before - improvement * abs(before):
            return False
    return True


def stop_reason(book: RunBook, step: int, now: float, goal_key: str = "train_loss") -> tuple[str, str] | None:
    """(status, reason) when the run is over at this logged step, else None: diverged, every goal
    reached, stalled (no progress, see `stalled`; `goal_key` is the curve column of the smoothed
    goal metric) or the budget spent."""
    config, train_loss = book.config, book.curve["train_loss"][-1] if book.curve.get("train_loss") else math.nan
    if step > 0 and not math.isfinite(train_loss):
        return records.DIVERGED, f"smoothed training loss is {train_loss}"
    if step > 0 and train_loss > config.divergence.loss_ratio * book.initial_loss:
        return records.DIVERGED, (f"smoothed training loss {train_loss:.4g} exceeds "
                                  f"{config.divergence.loss_ratio} x the initial {book.initial_loss:.4g}")
    # a branch trains for its window whatever goals it meets; a trunk until its last state is saved
    if all(goal.reached for goal in book.goals) and config.branch is None and not states_pending(config, step):
        return records.COMPLETED, "every goal reached"
    div = config.divergence
    if stalled(book.curve, sorted({"train_loss", goal_key}), step, div.stall_steps, div.stall_improvement):
        return records.STALLED, (f"no progress: neither the smoothed loss nor {goal_key} improved by "
                                 f"{div.stall_improvement:.0%} over steps {step // 2}-{step}")
    if step >= book.max_steps:
        return records.BUDGET_EXHAUSTED, f"step budget of {book.max_steps} steps spent"
    if config.budget.max_seconds is not None and now >= config.budget.max_seconds:
        return records.BUDGET_EXHAUSTED, f"time budget of {config.budget.max_seconds} s spent"
    return None


class NoiseMeasurements:
    """When to measure a noise scale, and the pairs measured (squared norms, or curvature forms),
    kept on the device and handed to each run's book at the logged steps, in order: the hot loop
    never waits for the GPU. A measurement is due every `every` steps, and more often while the
    estimate's window (relative_window x the step count, at least min_window steps) would otherwise
    hold fewer than `min_per_window` measurements: early in a run, where the window is short."""

    def __init__(self, small_batch: int, big_batch: int, every: int, relative_window: float, min_window: float,
                 min_per_window: int):
        self.small_batch, self.big_batch, self.every = small_batch, big_batch, every
        self.relative_window, self.min_window, self.min_per_window = relative_window, min_window, min_per_window
        self.last_step: int | None = None      # of the latest measurement
        self.flushed_step: int | None = None   # ... and of the latest handed to the books
        self._pending: list[torch.Tensor] = []
        self._steps: list[int] = []

    def due(self, step: int) -> bool:
        if self.last_step is None:
            return True
        window = max(self.relative_window * step, self.min_window)
        interval = min(self.every, max(1, int(window / self.min_per_window)))
        return step - self.last_step >= interval

    def add(self, small: torch.Tensor, big: torch.Tensor, step: int, form_cov: torch.Tensor | None = None) -> None:
        """A measurement per member; `form_cov` [3, members]: (var small, var big, cov) of the
        two values, where replicates give them."""
        unknown = torch.full((3, small.numel()), float("nan"), device=small.device)
        rows = [small.reshape(-1), big.reshape(-1), *(unknown if form_cov is None else form_cov.reshape(3, -1))]
        self._pending.append(torch.stack(rows))
        self._steps.append(step)
        self.last_step = step

    def flush(self, consumers: list) -> None:
        """Hand every pending measurement to its member's consumer, in step order:
        consumer(small, big, small_batch, big_batch, step, gap, form_cov) (RunBook.add_noise or
        add_curvature; form_cov None where not measured)."""
        if not self._pending:
            return
        for step, (small, big, *cov) in zip(self._steps, torch.stack(self._pending).tolist()):  # [n][5][members]
            gap = step - self.flushed_step if self.flushed_step is not None else 1
            for consume, s, b, *c in zip(consumers, small, big, *cov):
                consume(s, b, self.small_batch, self.big_batch, step, gap,
                        tuple(c) if all(math.isfinite(v) for v in c) else None)
            self.flushed_step = step
        self._pending.clear()
        self._steps.clear()

    def keep(self, members: torch.Tensor) -> None:
        self._pending = [p[:, members] for p in self._pending]

    def state_dict(self) -> dict:
        assert not self._pending, "flush before saving"
        return {"last_step": self.last_step, "flushed_step": self.flushed_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.flushed_step = state["last_step"], state["flushed_step"]
