"""The B_simple estimator against exact values (statistical tests: every tolerance is a few
standard errors estimated from the draws themselves, never a hard-coded number).

Two settings where the truth is known exactly:
- linreg: Gaussian inputs, so |G|^2, tr(Sigma) and B_simple have closed forms (task.exact).
- digits: a finite dataset, so exact per-example gradients over all 1797 examples give G and the
  population covariance Sigma (batches are drawn with replacement, i.e. i.i.d. from that set).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from critbatch.gns import NoiseScale, micro_batch_sq_norms, unbiased_sq_norm_and_trace
from critbatch.micro_grads import MicroBatchNorms
from critbatch.tasks import build_task
from critbatch.batches import Batches
from critbatch.steps import compute_gradients

Z = 4.0  # tolerance in standard errors


MEASUREMENTS = ["one pass", "k passes"]  # critbatch.micro_grads, or k passes of B/k examples


def draw_sq_norms(model, task, n_draws, micro_batches, batches, how="one pass"):
    """(small, big) squared norms from n independent batches, through train's own code path."""
    small, big = np.empty(n_draws), np.empty(n_draws)
    norms = MicroBatchNorms(model) if how == "one pass" else None
    for i in range(n_draws):
        x, y = batches.next()
        model.zero_grad(set_to_none=True)
        _, (small_sq, big_sq) = compute_gradients(model, task, x, y, micro_batches, norms)
        small[i], big[i] = float(small_sq), float(big_sq)
    return small, big


def unbiased_estimates(small, big, small_batch, big_batch):
    pairs = [unbiased_sq_norm_and_trace(s, b, small_batch, big_batch) for s, b in zip(small, big)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def standard_error(values, weights=None):
    """SE of the (weighted) mean of i.i.d. draws."""
    if weights is None:
        weights = np.ones_like(values)
    return values.std(ddof=1) * math.sqrt((weights ** 2).sum()) / weights.sum()


def ratio_standard_error(trace, sq_norm, weights=None):
    """Delta-method SE of mean(trace) / mean(sq_norm) for i.i.d. pairs (optionally weighted means)."""
    if weights is None:
        weights = np.ones_like(trace)
    t, g = np.average(trace, weights=weights), np.average(sq_norm, weights=weights)
    ratio = t / g
    cov = np.cov(np.stack([trace, sq_norm]))
    var_one = (cov[0, 0] - 2 * ratio * cov[0, 1] + ratio ** 2 * cov[1, 1]) / g ** 2
    return math.sqrt(var_one * (weights ** 2).sum()) / weights.sum()


def ema_weights(n, beta):
    """The weight that NoiseScale's bias-corrected EMA gives to each of n updates (oldest first)."""
    return (1 - beta) * beta ** np.arange(n - 1, -1, -1)


# ---------------------------------------------------------------------------------------------
# linreg: closed-form truth
# ---------------------------------------------------------------------------------------------

LINREG_B, LINREG_K, LINREG_DRAWS = 128, 4, 3000
LINREG = {"dim": 64, "decay": 1.0, "noise_std": 1.0, "target_scale": 3.0, "problem_seed": 1234}


@pytest.fixture(scope="module", params=MEASUREMENTS)
def linreg_draws(request):
    torch.manual_seed(0)
    task = build_task("linreg", **LINREG)
    task.load("cpu")
    model = task.make_model()
    with torch.no_grad():  # fixed, far from the optimum (B_simple ~ 90, comparable to B)
        model.weight.copy_(-task.w_star.float().reshape(1, -1))
    exact = task.exact(model.weight)
    batches = Batches(task, LINREG_B, "with_replacement", 1, "cpu")
    small, big = draw_sq_norms(model, task, LINREG_DRAWS, LINREG_K, batches, how=request.param)
    return exact, small, big


def test_linreg_unbiased_sq_norm_and_trace(linreg_draws):
    exact, small, big = linreg_draws
    sq_norm, trace = unbiased_estimates(small, big, LINREG_B // LINREG_K, LINREG_B)
    for name, values, truth in (("|G|^2", sq_norm, exact["exact_grad_sq_norm"]),
                                ("tr(Sigma)", trace, exact["exact_trace_sigma"])):
        se = standard_error(values)
        assert abs(values.mean() - truth) < Z * se, (name, values.mean(), truth, se)
        assert se < 0.1 * truth, f"{name}: too few draws for the test to mean anything (SE {se})"


def test_linreg_naive_estimate_is_detectably_biased(linreg_draws):
    """The test above has power: |G_big|^2 alone is biased by tr(Sigma)/B, far beyond 4 SE."""
    exact, small, big = linreg_draws
    sq_norm, _ = unbiased_estimates(small, big, LINREG_B // LINREG_K, LINREG_B)
    bias = exact["exact_trace_sigma"] / LINREG_B
    assert bias > Z * standard_error(sq_norm)
    assert abs(big.mean() - exact["exact_grad_sq_norm"]) > Z * standard_error(big)
    # and E|G_B|^2 = |G|^2 + tr(Sigma)/B holds at both batch sizes
    for values, batch in ((small, LINREG_B // LINREG_K), (big, LINREG_B)):
        expected = exact["exact_grad_sq_norm"] + exact["exact_trace_sigma"] / batch
        assert abs(values.mean() - expected) < Z * standard_error(values)


def test_linreg_noise_scale_b_simple(linreg_draws):
    exact, small, big = linreg_draws
    beta = 0.999
    noise = NoiseScale(beta=beta)
    for s, b in zip(small, big):
        noise.update(s, b, LINREG_B // LINREG_K, LINREG_B)
    sq_norm, trace = unbiased_estimates(small, big, LINREG_B // LINREG_K, LINREG_B)
    weights = ema_weights(len(small), beta)
    # the smoothed values are the bias-corrected EMAs of the per-draw unbiased estimates
    assert noise.updates == len(small)
    assert noise.grad_sq_norm == pytest.approx(np.average(sq_norm, weights=weights), rel=1e-9)
    assert noise.trace_sigma == pytest.approx(np.average(trace, weights=weights), rel=1e-9)
    assert noise.b_simple == pytest.approx(noise.trace_sigma / noise.grad_sq_norm)
    se = ratio_standard_error(trace, sq_norm, weights)
    truth = exact["exact_b_simple"]
    assert abs(noise.b_simple - truth) < Z * se, (noise.b_simple, truth, se)
    assert se < 0.15 * truth
    # power: the naive ratio tr(Sigma) / |G_big|^2 is biased low, well beyond the tolerance
    naive = np.average(trace, weights=weights) / np.average(big, weights=weights)
    assert truth - naive > Z * se


def test_linreg_b_simple_plain_mean_of_emas(linreg_draws):
    """A fast EMA (beta 0.9) is noisy; the mean of its values over many updates is not."""
    exact, small, big = linreg_draws
    noise = NoiseScale(beta=0.9)
    sq_norms, traces = [], []
    for s, b in zip(small, big):
        noise.update(s, b, LINREG_B // LINREG_K, LINREG_B)
        sq_norms.append(noise.grad_sq_norm)
        traces.append(noise.trace_sigma)
    b_simple = np.mean(traces) / np.mean(sq_norms)
    sq_norm, trace = unbiased_estimates(small, big, LINREG_B // LINREG_K, LINREG_B)
    # the mean of the EMAs weights every draw almost equally, so the i.i.d. SE applies
    se = ratio_standard_error(trace, sq_norm)
    assert abs(b_simple - exact["exact_b_simple"]) < Z * se, (b_simple, exact["exact_b_simple"], se)


def test_micro_batch_sq_norms_matches_direct_computation():
    torch.manual_seed(0)
    grads = [[torch.randn(3, 4), torch.randn(5)] for _ in range(4)]
    small, big = micro_batch_sq_norms(grads)
    flat = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads])
    assert float(small) == pytest.approx(float(flat.pow(2).sum(1).mean()), rel=1e-6)
    assert float(big) == pytest.approx(float(flat.mean(0).pow(2).sum()), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# digits MLP: exact per-example gradients over the whole finite dataset
# ---------------------------------------------------------------------------------------------

DIGITS_B, DIGITS_K, DIGITS_DRAWS = 64, 4, 2000


def exact_digits_statistics(model, task):
    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(p, x, y):
        return task.loss(functional_call(model, p, (x[None],)), y[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, task.inputs, task.targets)
    flat = torch.cat([g.reshape(len(task.inputs), -1) for g in per_example.values()], dim=1).double()
    mean = flat.mean(0)
    sq_norm = float(mean @ mean)
    trace = float(flat.pow(2).sum(1).mean()) - sq_norm  # population covariance: draws are i.i.d.
    return sq_norm, trace, trace / sq_norm


def test_digits_exact_per_example_statistics_agree_with_full_batch_gradient():
    torch.manual_seed(0)
    task = build_task("digits", hidden=32)
    task.load("cpu")
    model = task.make_model()
    sq_norm, _, _ = exact_digits_statistics(model, task)
    model.zero_grad()
    compute_gradients(model, task, task.inputs, task.targets)
    full = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
    assert sq_norm == pytest.approx(full, rel=1e-4)


@pytest.mark.parametrize("how", MEASUREMENTS)
def test_digits_online_estimator_matches_exact_b_simple(how):
    torch.manual_seed(0)
    task = build_task("digits", hidden=64, dropout=0.0)
    task.load("cpu")
    model = task.make_model()
    model.train()
    exact_sq_norm, exact_trace, exact_b_simple = exact_digits_statistics(model, task)

    batches = Batches(task, DIGITS_B, "with_replacement", 2, "cpu")
    small, big = draw_sq_norms(model, task, DIGITS_DRAWS, DIGITS_K, batches, how)
    sq_norm, trace = unbiased_estimates(small, big, DIGITS_B // DIGITS_K, DIGITS_B)

    for name, values, truth in (("|G|^2", sq_norm, exact_sq_norm), ("tr(Sigma)", trace, exact_trace)):
        se = standard_error(values)
        assert abs(values.mean() - truth) < Z * se, (name, values.mean(), truth, se)
        assert se < 0.1 * truth
    # the naive |G_B|^2 is off by tr(Sigma)/B, which this tolerance would catch
    assert exact_trace / DIGITS_B > Z * standard_error(sq_norm)

    noise = NoiseScale(beta=0.995)
    for s, b in zip(small, big):
        noise.update(s, b, DIGITS_B // DIGITS_K, DIGITS_B)
    se = ratio_standard_error(trace, sq_norm, ema_weights(len(small), noise.beta))
    assert abs(noise.b_simple - exact_b_simple) < Z * se, (noise.b_simple, exact_b_simple, se)
    assert se < 0.15 * exact_b_simple


# ---------------------------------------------------------------------------------------------
# argument checking and the empty state
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("small_batch, big_batch", [(32, 32), (64, 32), (0, 32), (-1, 8)])
def test_bad_batch_sizes_raise(small_batch, big_batch):
    with pytest.raises(ValueError, match="small_batch"):
        unbiased_sq_norm_and_trace(1.0, 0.5, small_batch, big_batch)
    noise = NoiseScale()
    with pytest.raises(ValueError, match="small_batch"):
        noise.update(1.0, 0.5, small_batch, big_batch)
    assert noise.updates == 0  # a rejected update leaves no trace
    assert math.isnan(noise.b_simple)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5, math.nan])
def test_bad_beta_raises(beta):
    with pytest.raises(ValueError, match="beta"):
        NoiseScale(beta=beta)


def test_nan_before_first_update_and_when_sq_norm_not_positive():
    noise = NoiseScale(beta=0.9)
    state = noise.state()
    assert state["noise_updates"] == 0
    assert all(math.isnan(state[k]) for k in ("b_simple", "grad_sq_norm", "trace_sigma"))
    # |G_big|^2 much smaller than |G_small|^2 makes the |G|^2 estimate negative: b_simple is NaN
    noise.update(small_sq_norm=10.0, big_sq_norm=0.1, small_batch=8, big_batch=32)
    assert noise.grad_sq_norm < 0
    assert math.isnan(noise.b_simple)
    assert noise.trace_sigma > 0


def test_single_update_is_the_unbiased_estimate():
    noise = NoiseScale(beta=0.99)  # bias correction: one update gives that update's values exactly
    noise.update(small_sq_norm=2.0, big_sq_norm=1.25, small_batch=32, big_batch=128)
    sq_norm, trace = unbiased_sq_norm_and_trace(2.0, 1.25, 32, 128)
    assert noise.grad_sq_norm == pytest.approx(sq_norm)
    assert noise.trace_sigma == pytest.approx(trace)
    assert noise.b_simple == pytest.approx(trace / sq_norm)
