"""B_simple averaged along the path (critbatch.monitor.IdealSteps) against integrals written out
here: with B_noise(s) known, one step at batch size B makes 1/(1 + B_noise/B) ideal steps, and
B_crit = E_min/S_min is B_noise averaged over the ideal steps (McCandlish et al. eq. 2.10-2.11)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate

from critbatch.config import RunConfig
from critbatch.monitor import IdealSteps, RunBook, stalled
from critbatch.train import train
from tests.helpers import exact_ideal_steps


def feed(ideal: IdealSteps, b_noise, steps, trace=5.0):
    """Exact measurements of G = trace / b_noise(s) and T = trace at each of `steps`."""
    steps = list(steps)
    for s, gap in zip(steps, np.diff(steps, prepend=steps[0] - 1)):
        ideal.advance(s, trace / b_noise(s), trace, gap)


@pytest.mark.parametrize("batch_size", [8, 256, 8192])
def test_constant_noise_scale_is_its_own_path_average(batch_size):
    ideal = IdealSteps(batch_size)
    feed(ideal, lambda s: 300.0, range(0, 1001, 10))
    assert ideal.path_average(1000) == pytest.approx(300.0, rel=1e-9)
    assert ideal.at(1000) == pytest.approx(1000 / (1 + 300 / batch_size), rel=1e-9)


@pytest.mark.parametrize("batch_size", [16, 1024])
def test_growing_noise_scale_is_averaged_over_ideal_steps(batch_size):
    """B_noise rising from 50 to 1050: the path average is the integral of B_noise over the ideal
    steps divided by their number, and lies between the start and the end."""
    b_noise = lambda s: 50.0 + s  # noqa: E731
    ideal = IdealSteps(batch_size)
    feed(ideal, b_noise, range(0, 1001))  # measured every step: the piecewise-constant rate is exact
    tau, _ = integrate.quad(lambda s: 1.0 / (1.0 + b_noise(s) / batch_size), 0, 1000)
    weighted, _ = integrate.quad(lambda s: b_noise(s) / (1.0 + b_noise(s) / batch_size), 0, 1000)
    # the rate is held from one estimate to the next (here one step): a left Riemann sum
    assert ideal.at(1000) == pytest.approx(tau, rel=1e-2)
    assert ideal.path_average(1000) == pytest.approx(weighted / tau, rel=2e-2)
    assert 50 < ideal.path_average(1000) < 1050
    # the model's relation: S = S_min + E_min/B with S_min = tau and E_min = weighted
    assert 1000 == pytest.approx(tau + weighted / batch_size, rel=1e-6)


def test_noisy_unresolved_gradient_estimates_average_out():
    """Where B >> B_simple is not the case (B = 8, B_simple = 2000), one estimate of |G|^2 is mostly
    noise and often negative; the rate G B / (|G| B + T) is linear in G there, so the noise
    averages out of the path average instead of biasing it (a ratio T/G would blow up)."""
    rng = np.random.default_rng(0)
    trace, truth = 5.0, 2000.0
    estimates = []
    for seed in range(400):
        ideal = IdealSteps(8)
        for s in range(0, 2001, 10):
            ideal.advance(s, trace / truth + 0.02 * rng.standard_normal(), trace, 10)
        estimates.append(ideal.at(2000))
    exact = 2000 / (1 + truth / 8)
    mean, se = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
    assert abs(mean - exact) < 4 * se
    assert se < 0.1 * exact
    assert np.mean(np.array(estimates) <= 0) > 0.01  # single runs are that noisy: no ratio would do


def test_the_path_average_standard_error_matches_the_spread_over_repeats():
    """Noisy measurements of a constant G (B_noise 300 at B = 64): the standard error that one run
    reports is, on average, the spread of the path average over 300 repeats (within 15%); NaN
    from fewer than MIN_MEASUREMENTS measurements."""
    rng = np.random.default_rng(1)
    trace, truth, B = 5.0, 300.0, 64
    values, errors = [], []
    for _ in range(300):
        ideal = IdealSteps(B)
        for s in range(0, 1001, 10):
            ideal.advance(s, trace / truth * (1 + 0.5 * rng.standard_normal()), trace, 10)
        values.append(ideal.path_average(1000))
        errors.append(ideal.path_average_se(1000))
    assert np.mean(values) == pytest.approx(truth, rel=0.02)
    # the delta method over numerators and denominators: a high g also raises its neighbours' denominators
    assert 0.9 < np.mean(errors) / np.std(values) < 1.15, (np.mean(errors), np.std(values))
    early = IdealSteps(B)
    for s in range(0, 70, 10):
        early.advance(s, trace / truth, trace, 10)
    assert np.isnan(early.path_average_se(65)) and np.isfinite(early.path_average(65))


def test_the_run_book_path_rate_is_unbiased_with_gradients_drawn_from_a_known_noise():
    """Micro-batch gradients drawn from a known noise (Sigma = 2 I in 10 dimensions, |G|^2 falling
    from 1 to 0.1 over 200 steps: B_simple from 20 to 200) fed to a RunBook at B = 32 as training
    feeds it, one measurement per step: over 300 repeats its ideal steps are exact within 3
    standard errors and 5%."""
    rng = np.random.default_rng(2)
    dim, sigma2, B, k, steps = 10, 2.0, 32, 4, 200
    sq_norm = 10.0 ** (-np.arange(steps + 1) / steps)
    run = RunConfig.from_dict({"task": {"name": "digits"}, "batch_size": B, "device": "cpu"})
    ideal = []
    for _ in range(300):
        book = RunBook(run, None)
        for step in range(steps + 1):
            G = np.sqrt(sq_norm[step]) * np.eye(dim)[0]
            micro = G + rng.standard_normal((k, dim)) * np.sqrt(sigma2 / (B // k))
            small, big = float(np.mean(np.sum(micro ** 2, axis=1))), float(np.sum(micro.mean(axis=0) ** 2))
            book.add_noise(small, big, B // k, B, step=step, gap=1)
        ideal.append(book.ideal.at(steps))
    exact = float(np.sum(1 / (1 + dim * sigma2 / (sq_norm[:steps] * B))))
    mean, se = np.mean(ideal), np.std(ideal, ddof=1) / np.sqrt(len(ideal))
    assert abs(mean - exact) < 3 * se and abs(mean - exact) < 0.05 * exact, (mean, se, exact)


@pytest.mark.parametrize("batch_size, lr, tolerance", [pytest.param(32, 0.02, 0.25, marks=pytest.mark.slow),
                                                       (128, 0.03, 0.05)])
def test_b_simple_path_average_is_the_exact_one_along_real_runs(batch_size, lr, tolerance):
    """Inside real linreg runs, measured every step, at every goal: the ideal steps behind
    B_simple's path average against the exact ones along each run's own trajectory (replayed in
    float64, closed forms at every step), over 12 seeds: exact within 3 standard errors and the
    tolerance (one run's spread is larger at small B). Each run's path average is off by about its
    standard error: rms of error/se at most 1.75 (docs/noise_scales.md has the figures)."""
    ratios, errors = {}, []
    for seed in range(12):
        config = {"task": {"name": "linreg", "dim": 32, "target_scale": 3.0}, "batch_size": batch_size,
                  "device": "cpu", "seed": seed, "optimizer": {"name": "sgd", "lr": lr},
                  "smoothing": {"min_examples": 64},
                  "goals": {"metric": "exact_excess_loss", "thresholds": [0.1, 0.06, 0.04]},
                  "noise_scale": {"every": 1, "probe_batches": 0}}
        record = train(config)
        exact = exact_ideal_steps(config, record["summary"]["steps"], "b_simple")
        for goal in record["goals"]:
            if not goal["reached"] or goal["censored"]:
                continue
            ideal = np.interp(goal["step"], np.arange(len(exact)), exact)
            ratios.setdefault(goal["threshold"], []).append(goal["ideal_steps"] / ideal)
            path = batch_size * (goal["step"] / ideal - 1)
            errors.append((goal["b_simple_path"] - path) / goal["b_simple_path_se"])
    assert len(ratios) == 3 and all(len(r) >= 10 for r in ratios.values())
    for threshold, r in ratios.items():
        mean, se = np.mean(r), np.std(r, ddof=1) / np.sqrt(len(r))
        assert abs(mean - 1) < 3 * se and abs(mean - 1) < tolerance, (threshold, mean, se)
    assert np.sqrt(np.nanmean(np.square(errors))) < 1.75, errors


def curve(steps, values):
    return {"step": list(steps), "train_loss": list(values), "train_error": list(values)}


def test_stalled_only_without_progress_over_the_last_half():
    steps = np.unique(np.geomspace(1, 4000, 200).astype(int))
    flat = curve(steps, np.full(steps.size, 2.30))                       # stuck at chance
    slow = curve(steps, 2.3 * steps.astype(float) ** -0.05)               # slow power law: ~3% per doubling
    late = curve(steps, np.where(steps < 3000, 2.3, 1.0))                 # a plateau, then a drop
    keys = ["train_loss", "train_error"]
    assert stalled(flat, keys, 4000, min_steps=1000, improvement=0.01)
    assert not stalled(flat, keys, 999, min_steps=1000, improvement=0.01)   # too early to tell
    assert not stalled(slow, keys, 4000, min_steps=1000, improvement=0.01)
    assert not stalled(late, keys, 4000, min_steps=1000, improvement=0.01)
    assert not stalled(flat, keys, 4000, min_steps=0, improvement=0.01)     # 0: the rule is off
