"""Checks of the exact expected-loss reference for the linreg task (tests/reference/linreg_dynamics.py).

The reference is the yardstick for the pipeline's linreg results, so it is checked against things
it does not share code with: Monte Carlo SGD and heavy ball, gradient descent in closed form,
deterministic heavy ball, and its own small-batch ODE limit against the discrete recursion.

Exact values for the default problem (dim 64, decay 1, noise_std 1, target_scale 10,
problem_seed 1234; goals on exact_excess_loss; plain SGD; S interpolated between steps; lr
optimised per B). Initial excess loss 1.3528; at w = 0: B_simple = 59.83, B_noise = 78.04.

    goal   S_min    E_min   B_crit  | fit over B = 4..4096: S_min  E_min   B_crit  rms(ln S)
    1.0     0.62     40.8    65.9   |                        0.64    46.0    71.6   0.078
    0.3     7.64    345.3    45.2   |                        8.14   333.1    40.9   0.024
    0.1    17.43   1257.9    72.2   |                       18.02  1187.4    65.9   0.024
    0.03   30.21   5210.4   172.5   |                       30.38  4929.4   162.3   0.036

    S_opt(B) @ best lr:
    goal   B=4           B=16         B=64          B=256         B=1024        B=4096        B=inf
    1.0    11.1@0.331    3.53@0.872   1.60@1.52     0.81@2.92     0.67@3.54     0.63@3.74     0.62@3.81
    0.3    92.1@0.339    28.3@0.969   13.5@1.54     9.80@1.77     8.49@1.91     7.91@1.99     7.64@2.03
    0.1    325.2@0.193   90.5@0.660   35.2@1.40     23.0@1.74     19.5@1.87     18.2@1.93     17.4@1.98
    0.03   1318.8@0.0745 342.6@0.283  101.4@0.902   47.7@1.58     35.9@1.82     32.3@1.91     30.2@1.96

    best lr/B in the small-batch limit (E_min): 0.0969, 0.0942, 0.0507, 0.0189 per goal.

Heavy ball (momentum 0.9), same problem: S_min = 0.62, 3.84, 16.08, 26.63; E_min as for SGD (the
small-batch limit does not depend on mu: B * S_opt(B) = 345.5 at B = 1/16 for goal 0.3); fitted
over B = 4..4096: B_crit = 90.3, 84.8, 67.9, 171.3 with rms(ln S) up to 0.13 (less hyperbolic).

With whole steps (interpolate=False) S_min = 1, 8, 18, 31 and B_crit = E_min/S_min = 40.8, 43.2,
69.9, 168.1. On the 4-point, factor-2 lr grid of conf/sweep/linreg.yaml (B = 4..1024) the best
S is 0-30 % above S_opt (the best lr sits just below a cliff: x sqrt(2) often never reaches the
goal), and the fit gives B_crit = 69.0, 36.6, 67.6, 178.6; at goal 0.03 the best grid lr is the
grid's lowest at B = 4 and 16.

Goal 1.0 is degenerate: the initial excess loss is 1.35, so at large B it is met within one step
(S < 1, interpolated), at an lr beyond the stability limit 2 (the run overshoots, dips below
the goal, then diverges), and its B_crit (66-72) is out of line with the other goals. B_crit
grows as the goal gets harder only from goal 0.3 on.
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.reference.linreg_dynamics import (
    best_steps, exact_b_crit, expected_excess_loss, linreg_problem, min_examples, noise_scales,
    small_batch_examples_to_goal, steps_to_goal)

GOALS = [1.0, 0.3, 0.1, 0.03]
BATCH_SIZES = [4, 16, 64, 256, 1024, 4096]


@pytest.fixture(scope="module")
def default_problem():
    return linreg_problem(dim=64, decay=1.0, target_scale=10.0, problem_seed=1234)


@pytest.fixture(scope="module")
def default_crit(default_problem):
    spectrum, w_star = default_problem
    return exact_b_crit(spectrum, w_star, 1.0, GOALS, BATCH_SIZES)


# ---------------------------------------------------------------------------------------------
# The problem is the task's problem


def test_problem_matches_the_task(default_problem):
    from critbatch.tasks.synthetic import LinearRegression
    import torch

    task = LinearRegression(dim=64, decay=1.0, noise_std=1.0, target_scale=10.0, problem_seed=1234)
    spectrum, w_star = default_problem
    np.testing.assert_array_equal(spectrum, task.spectrum.numpy())
    np.testing.assert_array_equal(w_star, task.w_star.numpy())
    ours = noise_scales(spectrum, w_star, 1.0)
    theirs = task.exact(torch.zeros(1, 64))
    assert ours["b_simple"] == pytest.approx(theirs["exact_b_simple"], rel=1e-12)
    assert ours["b_noise"] == pytest.approx(theirs["exact_b_noise"], rel=1e-12)
    assert ours["excess_loss"] == pytest.approx(theirs["exact_excess_loss"], rel=1e-12)
    # the closed forms of the docstring, written out again
    d, lam = -w_star, spectrum
    quad = d @ (lam * d)
    assert ours["b_simple"] == pytest.approx(lam.sum() * (quad + 1) / np.sum((lam * d) ** 2) + 1, rel=1e-12)
    assert ours["b_noise"] == pytest.approx((lam ** 2).sum() * (quad + 1) / (d @ (lam ** 3 * d)) + 1, rel=1e-12)
    assert ours["b_simple"] == pytest.approx(59.8311, rel=1e-5)
    assert ours["b_noise"] == pytest.approx(78.0399, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Monte Carlo: many independent runs, simulated from scratch


def _simulate(spectrum, w_star, noise_std, batch_size, lr, steps, momentum=0.0, runs=2000, seed=0):
    """Excess loss of `runs` independent SGD / heavy-ball runs from w = 0, fresh samples each step:
    array (steps + 1, runs)."""
    rng = np.random.default_rng(seed)
    n = spectrum.size
    scale = np.sqrt(spectrum)
    d = np.repeat(-w_star[None, :], runs, axis=0)
    buf = np.zeros_like(d)
    out = np.empty((steps + 1, runs))
    out[0] = 0.5 * (d * d) @ spectrum
    for t in range(1, steps + 1):
        x = rng.standard_normal((runs, batch_size, n)) * scale
        resid = np.einsum("rbn,rn->rb", x, d) - noise_std * rng.standard_normal((runs, batch_size))
        grad = np.einsum("rbn,rb->rn", x, resid) / batch_size
        if momentum:
            buf = momentum * buf + grad
            d = d - lr * buf
        else:
            d = d - lr * grad
        out[t] = 0.5 * (d * d) @ spectrum
    return out


MC_STEPS = [1, 3, 10, 30, 60, 100, 150]


def _z_scores(sim, exact):
    se = sim.std(axis=1, ddof=1) / np.sqrt(sim.shape[1])
    return ((sim.mean(axis=1) - exact) / se)[MC_STEPS]


@pytest.mark.parametrize("batch_size,lr,momentum", [(1, 0.2, 0.0), (8, 0.8, 0.0), (1, 0.03, 0.9), (8, 0.12, 0.9)])
def test_monte_carlo_matches_the_recursion(batch_size, lr, momentum):
    spectrum, w_star = linreg_problem(dim=16, decay=1.0, target_scale=10.0, problem_seed=7)
    sim = _simulate(spectrum, w_star, 1.0, batch_size, lr, max(MC_STEPS), momentum)
    exact = expected_excess_loss(spectrum, w_star, 1.0, batch_size, lr, max(MC_STEPS), momentum=momentum)
    assert exact[-1] < 0.2 * exact[0]           # the runs do move: the check covers the descent
    z = _z_scores(sim, exact)
    assert np.all(np.abs(z) < 4.5), z
    if momentum == 0.0 and batch_size == 1:
        # power: the same data reject a recursion without the Lambda d d^T Lambda part of Sigma
        m, wrong = w_star ** 2, [0.5 * (w_star ** 2) @ spectrum]
        for _ in range(max(MC_STEPS)):
            m = (1 - lr * spectrum) ** 2 * m + lr ** 2 / batch_size * spectrum * (m @ spectrum + 1.0)
            wrong.append(0.5 * m @ spectrum)
        assert np.max(np.abs(_z_scores(sim, np.array(wrong)))) > 6


# ---------------------------------------------------------------------------------------------
# Limits and orderings


def test_large_batch_is_gradient_descent(default_problem):
    spectrum, w_star = default_problem
    steps, lrs = 300, np.array([0.1, 0.7, 1.5, 1.9])
    t = np.arange(steps + 1)
    # gradient descent in closed form: d_i(t) = -w*_i (1 - lr lambda_i)^t
    factor = (1 - lrs[:, None, None] * spectrum) ** (2 * t[None, :, None])
    closed = 0.5 * np.sum(spectrum * w_star ** 2 * factor, axis=2)
    gd = expected_excess_loss(spectrum, w_star, 1.0, np.inf, lrs, steps)
    np.testing.assert_allclose(gd, closed, rtol=1e-10, atol=1e-14)
    for b in (1e6, 1e9):   # the noise adds O(lr^2 / B) to the loss
        huge = expected_excess_loss(spectrum, w_star, 1.0, b, lrs, steps)
        assert np.all(huge >= closed)
        assert np.max(huge - closed) < 1e2 / b
    # heavy ball without noise, iterated on the vectors themselves (torch.optim.SGD's rule)
    mu, lr = 0.9, 0.3
    d, buf, curve = -w_star.copy(), np.zeros_like(w_star), [0.5 * w_star @ (spectrum * w_star)]
    for _ in range(steps):
        buf = mu * buf + spectrum * d
        d = d - lr * buf
        curve.append(0.5 * d @ (spectrum * d))
    np.testing.assert_allclose(expected_excess_loss(spectrum, w_star, 1.0, np.inf, lr, steps, momentum=mu),
                               curve, rtol=1e-9, atol=1e-14)


def test_loss_and_steps_are_monotone_in_batch_size(default_problem):
    spectrum, w_star = default_problem
    bs = np.array([1.0, 4, 16, 64, 256, np.inf])
    lrs = np.array([0.01, 0.05, 0.2, 0.5])
    curves = expected_excess_loss(spectrum, w_star, 1.0, bs[:, None], lrs[None, :], 400)   # (B, lr, t)
    assert np.all(np.diff(curves, axis=0) <= 1e-12)           # at any lr and step: more B, less loss
    fixed = steps_to_goal(spectrum, w_star, 1.0, bs[:, None], lrs[None, :], 0.1)
    assert np.all(np.diff(np.where(np.isinf(fixed), 1e300, fixed), axis=0) <= 0)
    # at the best lr: steps fall and examples grow with B
    best = best_steps(spectrum, w_star, 1.0, [1, 2, 4, 16, 64, 256, np.inf], [0.3, 0.1])
    assert not best.at_edge.any()
    assert np.all(np.diff(best.steps, axis=0) < 0)
    examples = best.steps[:-1] * best.batch_sizes[:-1, None]
    assert np.all(np.diff(examples, axis=0) > 0)


def test_steps_to_goal_reads_the_curve(default_problem):
    spectrum, w_star = default_problem
    curve = expected_excess_loss(spectrum, w_star, 1.0, 16, 0.3, 2000)
    for goal in (1.0, 0.3, 0.1):
        t = int(np.argmax(curve <= goal))
        want = t - 1 + (curve[t - 1] - goal) / (curve[t - 1] - curve[t])
        assert steps_to_goal(spectrum, w_star, 1.0, 16, 0.3, goal) == pytest.approx(want, rel=1e-12)
        assert steps_to_goal(spectrum, w_star, 1.0, 16, 0.3, goal, interpolate=False) == t
    floor = curve[-1]                                     # the noise floor at this lr
    assert steps_to_goal(spectrum, w_star, 1.0, 16, 0.3, 0.5 * floor) == np.inf
    assert steps_to_goal(spectrum, w_star, 1.0, 16, 3.0, 0.01) == np.inf       # diverges
    assert steps_to_goal(spectrum, w_star, 1.0, 16, 0.3, 2.0) == 0.0           # met at the start


def test_best_lr_does_not_depend_on_the_grid(default_problem):
    spectrum, w_star = default_problem
    a = best_steps(spectrum, w_star, 1.0, [4, 256], [0.3, 0.03])
    b = best_steps(spectrum, w_star, 1.0, [4, 256], [0.3, 0.03],
                   lrs=8 * 2.0 ** (-np.arange(0, 18, 1 / 5) - 0.037))
    np.testing.assert_allclose(a.steps, b.steps, rtol=1e-6)
    assert np.all(a.steps <= a.grid_steps)


def test_small_batch_limit_is_e_min(default_problem):
    spectrum, w_star = default_problem
    goal = np.array([0.3])
    e_min, eta = min_examples(spectrum, w_star, 1.0, goal)
    gaps = []
    for b in (4.0, 1.0, 0.25):   # a formal B < 1 is fine for the recursion
        best = best_steps(spectrum, w_star, 1.0, b, goal)
        gaps.append(best.steps[0, 0] * b / e_min[0] - 1)
        assert best.lr[0, 0] / b == pytest.approx(eta[0], rel=0.15)
    assert 0 < gaps[2] < gaps[1] < gaps[0]
    assert gaps[2] < 0.005
    # heavy ball has the same limit, with lr / B = eta (1 - mu)
    mom = best_steps(spectrum, w_star, 1.0, 1.0, goal, momentum=0.9)
    assert mom.steps[0, 0] / e_min[0] - 1 == pytest.approx(0.0, abs=0.02)
    assert mom.lr[0, 0] / (1 - 0.9) == pytest.approx(eta[0], rel=0.02)
    # the ODE at the best eta, against the discrete recursion at a small B and lr = eta B
    b = 1 / 64
    steps = steps_to_goal(spectrum, w_star, 1.0, b, eta[0] * b, goal[0], max_steps=100000)
    assert steps * b == pytest.approx(float(small_batch_examples_to_goal(spectrum, w_star, 1.0, eta[0], goal[0])),
                                      rel=2e-3)


# ---------------------------------------------------------------------------------------------
# The default problem's critical batch size


def test_default_problem_b_crit(default_crit, default_problem):
    crit = default_crit
    print()
    print(crit.table())
    print(noise_scales(*default_problem, 1.0))
    assert not crit.at_edge
    # S_min and E_min bound S_opt(B) and B * S_opt(B)
    assert np.all(crit.steps >= crit.s_min[None, :])
    assert np.all(crit.steps * crit.batch_sizes[:, None] >= crit.e_min[None, :])
    # goals met within a couple of gradient-descent steps have no meaningful S_min (goal 1.0)
    resolved = crit.s_min >= 2
    assert resolved.tolist() == [False, True, True, True]
    for b_crit in (crit.b_crit, crit.b_crit_fit):
        assert np.all(np.diff(b_crit[resolved]) > 0)      # harder goal, larger B_crit
    assert np.all(crit.fit_rms[resolved] < 0.05)
    np.testing.assert_allclose(crit.b_crit_fit[resolved] / crit.b_crit[resolved], 1, atol=0.15)
    # the values in this module's docstring
    np.testing.assert_allclose(crit.s_min, [0.619432, 7.637877, 17.428503, 30.205865], rtol=1e-5)
    np.testing.assert_allclose(crit.e_min, [40.82295, 345.2716, 1257.911, 5210.357], rtol=1e-5)
    np.testing.assert_allclose(crit.b_crit_fit, [71.6210, 40.9317, 65.9068, 162.2745], rtol=1e-4)
    np.testing.assert_allclose(crit.steps[:, 3], [1318.776, 342.5526, 101.3626, 47.68126, 35.94279, 32.26106],
                               rtol=1e-5)
