"""Linear regression with Gaussian inputs: G, H and Sigma are known in closed form.

Inputs x ~ N(0, Lambda) with Lambda = diag(lambda_i), lambda_i = i^(-decay); targets
y = x.w* + noise, noise ~ N(0, sigma^2); per-example loss l = (x.w - y)^2 / 2; model w (no bias).
With d = w - w* (Isserlis' theorem for the fourth moments of a Gaussian):

    H = Lambda,  G = Lambda d,  L = (d.Lambda d + sigma^2) / 2
    Sigma = Lambda (d.Lambda d + sigma^2) + Lambda d d^T Lambda
    B_simple = tr(Sigma)/|G|^2 = tr(Lambda)(d.Lambda d + sigma^2)/|Lambda d|^2 + 1
    B_noise  = tr(H Sigma)/(G.H G) = tr(Lambda^2)(d.Lambda d + sigma^2)/(d.Lambda^3 d) + 1

Every training batch is a fresh sample, as the theory assumes.
"""
from __future__ import annotations

import torch
from torch import nn

from critbatch.tasks import Task, TaskError, register_task


@register_task("linreg")
class LinearRegression(Task):
    batch_metrics = ("loss",)
    eval_metrics = ("exact_loss", "exact_excess_loss", "exact_b_simple", "exact_b_noise")

    def __init__(self, dim: int = 64, decay: float = 1.0, noise_std: float = 1.0,
                 target_scale: float = 10.0, problem_seed: int = 1234):
        if dim < 1:
            raise TaskError(f"linreg: dim must be >= 1, got {dim}")
        if noise_std < 0 or target_scale <= 0:
            raise TaskError(f"linreg: need noise_std >= 0 and target_scale > 0, got {noise_std}, {target_scale}")
        self.dim, self.decay, self.noise_std = dim, decay, noise_std
        self.target_scale, self.problem_seed = target_scale, problem_seed
        # The problem (spectrum and w*) is fixed by problem_seed, not by the run's seed, so every
        # run of a sweep solves the same problem.
        g = torch.Generator().manual_seed(problem_seed)
        self.spectrum = torch.arange(1, dim + 1, dtype=torch.float64) ** (-decay)
        self.w_star = target_scale * torch.randn(dim, generator=g, dtype=torch.float64) / dim ** 0.5
        self.device = torch.device("cpu")

    dataset_size = None

    def load(self, device):
        self.device = torch.device(device)
        self._scale = self.spectrum.sqrt().to(self.device, torch.float32)
        self._w_star = self.w_star.to(self.device, torch.float32)

    def sample(self, n, generator):
        x = torch.randn(n, self.dim, generator=generator, device=self.device) * self._scale
        y = x @ self._w_star + self.noise_std * torch.randn(n, generator=generator, device=self.device)
        return x, y

    def make_model(self) -> nn.Module:
        model = nn.Linear(self.dim, 1, bias=False)
        nn.init.zeros_(model.weight)
        return model

    def loss(self, output, target):
        return 0.5 * (output.squeeze(-1) - target).pow(2).mean()

    # Closed forms, in float64 on the CPU (they are d-dimensional vectors).
    def offset(self, weights: torch.Tensor) -> torch.Tensor:
        return weights.detach().reshape(-1).to("cpu", torch.float64) - self.w_star

    def exact(self, weights: torch.Tensor) -> dict[str, float]:
        d, lam = self.offset(weights), self.spectrum
        quad = float(d @ (lam * d))
        grad = lam * d
        grad_sq_norm = float(grad @ grad)
        trace_sigma = float(lam.sum()) * (quad + self.noise_std ** 2) + grad_sq_norm
        h_grad = float(grad @ (lam * grad))
        trace_h_sigma = float((lam ** 2).sum()) * (quad + self.noise_std ** 2) + h_grad
        return {
            "exact_loss": 0.5 * (quad + self.noise_std ** 2), "exact_excess_loss": 0.5 * quad,
            "exact_grad_sq_norm": grad_sq_norm, "exact_trace_sigma": trace_sigma,
            "exact_b_simple": trace_sigma / grad_sq_norm if grad_sq_norm > 0 else float("inf"),
            "exact_b_noise": trace_h_sigma / h_grad if h_grad > 0 else float("inf"),
        }

    @torch.no_grad()
    def evaluate(self, model):
        exact = self.exact(model.weight)
        return {k: exact[k] for k in self.eval_metrics}
