"""The reference B_noise (tests/reference/exact_noise.py) against what it must equal: closed forms
of least squares, and an explicit Hessian matrix of a small network. Every test checks in float64
to 1e-8 of the value, so a wrong Hessian, a sample instead of a population covariance or a missing
G^T H G term fails."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.reference.exact_noise import exact_gradient_statistics, exact_noise_scales

KEYS = ("grad_sq_norm", "trace_sigma", "b_simple", "gHg", "trace_h_sigma", "b_noise")


def squared_error(output, target):
    return 0.5 * (output.squeeze(-1) - target).pow(2).mean()


def test_least_squares_matches_its_closed_forms():
    rng = np.random.default_rng(0)
    n, d = 50, 5
    x = rng.normal(size=(n, d)) * np.linspace(0.3, 2.0, d)  # an anisotropic H, so B_noise != B_simple
    y = x @ rng.normal(size=d) + rng.normal(size=n)
    w = rng.normal(size=d)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w)[None])

    # per-example gradients g_i = x_i (x_i.w - y_i); H = X^T X / n exactly; Sigma the population covariance
    g = x * (x @ w - y)[:, None]
    mean = g.mean(0)
    h = x.T @ x / n
    sigma = g.T @ g / n - np.outer(mean, mean)
    expected = {"grad_sq_norm": mean @ mean, "trace_sigma": np.trace(sigma), "gHg": mean @ h @ mean,
                "trace_h_sigma": np.trace(h @ sigma)}
    expected["b_simple"] = expected["trace_sigma"] / expected["grad_sq_norm"]
    expected["b_noise"] = expected["trace_h_sigma"] / expected["gHg"]

    got = exact_noise_scales(model, squared_error, torch.tensor(x), torch.tensor(y), chunk=16)  # chunks of 16 of 50
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-8), key
    assert abs(got["b_noise"] / got["b_simple"] - 1) > 0.05  # the check tells the two apart


def test_small_network_matches_an_explicit_hessian():
    torch.manual_seed(0)
    n = 40
    x = torch.randn(n, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_at(flat, xs, ys):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            params[name] = flat[start:start + size].reshape(shape)
            start += size
        return F.cross_entropy(torch.func.functional_call(model, params, (xs,)), ys)

    # the Hessian as a matrix, and per-example gradients one example at a time (no vmap)
    hessian = torch.func.hessian(lambda f: loss_at(f, x, y))(flat0)
    grads = torch.stack([torch.func.grad(loss_at)(flat0, x[i:i + 1], y[i:i + 1]) for i in range(n)])
    mean = grads.mean(0)
    g_h_g = float(mean @ hessian @ mean)
    trace_h_sigma = float(torch.einsum("ip,pq,iq->", grads, hessian, grads)) / n - g_h_g

    got = exact_noise_scales(model, F.cross_entropy, x, y, chunk=7)
    assert got["gHg"] == pytest.approx(g_h_g, rel=1e-8)
    assert got["trace_h_sigma"] == pytest.approx(trace_h_sigma, rel=1e-8)
    assert got["b_noise"] == pytest.approx(trace_h_sigma / g_h_g, rel=1e-8)
    simple = exact_gradient_statistics(model, F.cross_entropy, x, y)  # the same per-example statistics
    for key in ("grad_sq_norm", "trace_sigma", "b_simple"):
        assert got[key] == pytest.approx(simple[key], rel=1e-8), key
