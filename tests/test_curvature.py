"""B_noise = tr(H Sigma) / (G^T H G) measured online (critbatch.curvature) against closed forms:
linreg's G, H and Sigma are known exactly, so the two-batch estimates of G^T H G and tr(H Sigma)
must be unbiased within their standard errors, and B_noise probed at a goal's crossing must be the
exact B_noise of the parameters there."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from critbatch.config import ConfigError, RunConfig, curvature_unsupported
from critbatch.curvature import curvature_batch_sizes, curvature_forms, curvature_forms_autograd
from critbatch.gns import unbiased_sq_norm_and_trace
from critbatch.monitor import IdealSteps, RunBook
from critbatch.tasks import build_task
from critbatch.batches import Batches
from critbatch.steps import PackedStep, PlainStep
from critbatch.train import Training, train
from tests.helpers import exact_ideal_steps
from tests.reference.exact_noise import exact_noise_scales as exact_scales

Z = 4.0


def linreg_closed_forms(task, weights: torch.Tensor) -> dict:
    """G^T H G, tr(H Sigma) and B_noise of linreg, written out here: H = Lambda, G = Lambda d,
    Sigma = Lambda (d.Lambda d + sigma^2) + Lambda d d^T Lambda (Gaussian fourth moments)."""
    lam = task.spectrum
    d = weights.detach().reshape(-1).double() - task.w_star
    grad = lam * d
    g_h_g = float(grad @ (lam * grad))
    trace_h_sigma = float((lam ** 2).sum()) * (float(d @ (lam * d)) + task.noise_std ** 2) + g_h_g
    return {"grad_h_grad": g_h_g, "trace_h_sigma": trace_h_sigma, "b_noise": trace_h_sigma / g_h_g}


@pytest.fixture(scope="module")
def linreg_at_a_fixed_point():
    task = build_task("linreg", dim=32, target_scale=3.0)
    task.load("cpu")
    config = RunConfig.from_dict({"task": {"name": "linreg", "dim": 32, "target_scale": 3.0}, "batch_size": 64,
                                  "device": "cpu", "goals": {"metric": "exact_loss", "thresholds": [0.5]}})
    step = PlainStep(config, task, "cpu", 4)
    with torch.no_grad():
        step.model.weight.copy_(0.5 * task.w_star.float().reshape(1, -1))
    return task, step


def test_curvature_estimates_are_unbiased_at_fixed_parameters(linreg_at_a_fixed_point):
    task, step = linreg_at_a_fixed_point
    exact = linreg_closed_forms(task, step.model.weight)
    batches, size = Batches(task, 1024, "with_replacement", 3, "cpu"), 1024
    g_h_g, trace = [], []
    for _ in range(1500):
        small, big = step.curvature(*batches.next())
        a, b = unbiased_sq_norm_and_trace(float(small), float(big), *curvature_batch_sizes(size, 4))
        g_h_g.append(a)
        trace.append(b)
    for name, values in (("grad_h_grad", np.array(g_h_g)), ("trace_h_sigma", np.array(trace))):
        se = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - exact[name]) < Z * se, (name, values.mean(), exact[name], se)
        assert se < 0.1 * exact[name]
    # the test has power: the naive form at the larger batch alone is biased by tr(H Sigma)/B_big
    naive = np.array(g_h_g) + np.array(trace) / curvature_batch_sizes(size, 4)[1]
    assert abs(naive.mean() - exact["grad_h_grad"]) > Z * naive.std(ddof=1) / math.sqrt(len(naive))


def test_the_autograd_and_torch_func_forms_agree(linreg_at_a_fixed_point):
    """The plain loop's double backward and the packed loop's torch.func transforms compute the
    same two quadratic forms."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(24, 6, dtype=torch.float64), torch.randint(0, 3, (24,))
    loss = torch.nn.functional.cross_entropy
    params = {name: p.detach() for name, p in model.named_parameters()}
    a = curvature_forms(lambda p, xs, ys: loss(functional_call(model, p, (xs,)), ys), params, x, y, 4)
    b = curvature_forms_autograd(model, loss, x, y, 4)
    assert [float(v) for v in a] == pytest.approx([float(v) for v in b], rel=1e-10)


def test_packed_members_measure_what_their_plain_twins_measure():
    task = build_task("digits", hidden=16)
    task.load("cpu")
    configs = [RunConfig.from_dict({"task": {"name": "digits", "hidden": 16}, "batch_size": 32, "device": "cpu",
                                    "optimizer": {"name": "sgd", "lr": lr}}) for lr in (0.1, 0.2)]
    torch.manual_seed(0)
    packed = PackedStep(configs, task, "cpu", 4)
    torch.manual_seed(0)
    plain = PlainStep(configs[0], task, "cpu", 4)
    x, y = Batches(task, 32, "with_replacement", 0, "cpu").next()
    small, big = packed.curvature(x, y)
    small_1, big_1 = plain.curvature(x, y)
    assert torch.allclose(small, small_1.expand(2), rtol=1e-4) and torch.allclose(big, big_1.expand(2), rtol=1e-4)


@pytest.mark.slow
def test_b_noise_probed_at_goals_is_the_exact_b_noise_there():
    """During training: the B_noise recorded at each goal (probed at the kept parameters nearest the
    crossing) against the closed form at those parameters, within 15%: the probes stop at a
    standard error of 4% (B_noise is costly to resolve: ~1,000 batches here)."""
    config = {"task": {"name": "linreg", "dim": 32, "target_scale": 3.0}, "batch_size": 32, "device": "cpu",
              "optimizer": {"name": "sgd", "lr": 0.1}, "goals": {"metric": "exact_excess_loss",
                                                                  "thresholds": [0.1, 0.06, 0.04]},
              "noise_scale": {"hessian_probe_batches": 2000, "probe_batches": 200, "probe_precision": 0.04}}
    record = train(config)
    checked = 0
    for goal in record["goals"]:
        if not goal["reached"] or goal.get("censored"):
            continue
        run = RunConfig.from_dict({**config, "budget": {"max_steps": goal["probed_at"]}})
        task = run.validate()
        training = Training([run], task, [RunBook(run, None)], packed=False)
        training.run()
        exact = linreg_closed_forms(task, training.train_step.module(0).weight)["b_noise"]
        assert abs(goal["b_noise"] / exact - 1) < 0.15, (goal["threshold"], goal["b_noise"], exact, goal["b_noise_se"])
        checked += 1
    assert checked >= 2
    # and at initialisation (w = 0)
    exact_init = linreg_closed_forms(task, torch.zeros(1, 32))["b_noise"]
    assert abs(record["summary"]["b_noise_init"] / exact_init - 1) < 0.15


@pytest.mark.parametrize("noise_scale, words", [
    ({"hessian_draws": 4}, "hessian_micro_batch"),
    ({"hessian_micro_batch": 0}, "hessian_micro_batch"),
    ({"hessian_micro_batch": 64, "hessian_draws": 0}, "hessian_draws"),
])
def test_own_batch_settings_that_cannot_give_b_noise_are_refused(noise_scale, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_dict({"task": {"name": "digits"}, "batch_size": 32, "device": "cpu", "noise_scale": noise_scale})


@pytest.mark.parametrize("changes", [{"noise_scale": {"hessian_every": -1}},
                                     {"noise_scale": {"hessian_probe_batches": 1.5}}])
def test_bad_b_noise_settings_are_refused_before_training(changes):
    with pytest.raises(ConfigError, match=next(iter(changes["noise_scale"]))):
        RunConfig.from_dict({"task": {"name": "digits"}, "batch_size": 32, "device": "cpu", **changes})


@pytest.mark.parametrize("changes, words", [
    ({"noise_scale": {"micro_batches": 2}}, "at least 3"),
    ({"batch_size": 2, "noise_scale": {"micro_batches": 2}}, "at least 3"),
    ({"task": {"name": "cifar10", "depth": 20}}, "BatchNorm"),
])
def test_runs_that_cannot_give_b_noise_are_told_apart(changes, words):
    config = RunConfig.from_dict({"task": {"name": "digits"}, "batch_size": 32, "device": "cpu", **changes})
    assert words in curvature_unsupported(config, config.build_task())


def test_a_run_that_cannot_give_b_noise_skips_it_and_says_why():
    record = train({"task": {"name": "digits", "hidden": 16}, "batch_size": 32, "device": "cpu",
                    "noise_scale": {"micro_batches": 2}, "budget": {"max_steps": 60}})
    assert "at least 3" in record["summary"]["b_noise_skipped"]
    assert all(math.isnan(v) for v in record["curve"]["b_noise"]) and record["summary"]["b_noise_init"] is None
    assert not all(math.isnan(v) for v in record["curve"]["b_simple"])  # B_simple is still measured


@pytest.mark.parametrize("batch_size, lr, draws", [(8, 0.1, 20), (128, 0.3, 40)])
def test_b_noise_path_average_is_the_exact_one_along_the_run(batch_size, lr, draws):
    """Inside real training runs, at every goal: B_noise averaged along the path (the online
    estimator, measured every step on batches of its own) against the exact average along the
    same trajectory, within 15% (the figures: docs/noise_scales.md)."""
    config = {"task": {"name": "linreg", "dim": 32, "target_scale": 3.0}, "batch_size": batch_size, "device": "cpu",
              "seed": 0, "optimizer": {"name": "sgd", "lr": lr}, "smoothing": {"min_examples": 64},
              "goals": {"metric": "exact_excess_loss", "thresholds": [0.3, 0.1, 0.06, 0.04]},
              "noise_scale": {"every": 1, "hessian_every": 1, "hessian_micro_batch": 256, "hessian_draws": draws,
                              "probe_batches": 0}}
    record = train(config)
    ideal = exact_ideal_steps(config, record["summary"]["steps"], "b_noise")
    checked = with_se = 0
    for goal in record["goals"]:
        if not goal["reached"] or goal["censored"]:
            continue
        step = goal["step"]
        exact = batch_size * (step / np.interp(step, np.arange(len(ideal)), ideal) - 1)
        assert goal["b_noise_path"] == pytest.approx(exact, rel=0.15), (goal["threshold"], goal["b_noise_path"], exact)
        # its standard error is honest (NaN before 8 measurements: then it says nothing)
        se = goal["b_noise_path_se"]
        if goal["step"] >= IdealSteps.MIN_MEASUREMENTS:
            assert abs(goal["b_noise_path"] - exact) < 3 * se and se < 0.25 * exact, (goal["threshold"], se)
            with_se += 1
        checked += 1
    assert checked >= 3 and with_se >= 2


@pytest.mark.slow
def test_digits_b_noise_probed_at_goals_is_the_exact_one():
    """During a digits run: B_noise probed at each goal against B_noise from exact per-example
    gradients and exact full-batch Hessian-vector products over all 1797 examples at the same
    parameters (tests/reference/exact_noise.py), within 15%."""
    config = {"task": {"name": "digits", "hidden": 32}, "batch_size": 64, "device": "cpu", "seed": 0,
              "optimizer": {"name": "sgd", "lr": 0.2}, "goals": {"metric": "train_error", "thresholds": [0.1, 0.05]},
              "noise_scale": {"hessian_probe_batches": 600, "probe_precision": 0.04}}
    record = train(config)
    checked = 0
    for goal in record["goals"]:
        if not goal["reached"] or goal["censored"]:
            continue
        run = RunConfig.from_dict({**config, "budget": {"max_steps": goal["probed_at"]}})
        task = run.validate()
        training = Training([run], task, [RunBook(run, None)], packed=False)
        training.run()
        exact = exact_scales(training.train_step.module(0), task.loss, task.inputs, task.targets)["b_noise"]
        print(f"digits goal {goal['threshold']}: probe {goal['b_noise']:.1f} +- {goal['b_noise_se']:.1f} "
              f"({goal['curvature_updates']} batches), exact {exact:.1f}")
        assert goal["b_noise"] == pytest.approx(exact, rel=0.15)
        checked += 1
    assert checked == 2
