"""Synthetic run records drawn from the paper's model, for tests and benchmarks of the analysis.

A run (B, lr) reaches goal k after S_k(B) = S_min,k (1 + B_crit,k / B) steps, slowed by an lr
away from the optimum eps(B) = eps_max / (1 + B_noise / B), with multiplicative noise; too large
an lr diverges, a budget cuts off slow runs. The records follow docs/records.md and are written
with critbatch.records.write_record, so the analysis reads them exactly as it reads real ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from critbatch import records


@dataclass(frozen=True)
class Truth:
    thresholds: tuple[float, ...] = (0.2, 0.1, 0.05)
    s_min: tuple[float, ...] = (50.0, 150.0, 500.0)
    b_crit: tuple[float, ...] = (32.0, 128.0, 512.0)
    b_simple: tuple[float, ...] = (40.0, 160.0, 640.0)
    eps_max: float = 0.5
    b_noise: float = 64.0
    lr_width: float = 0.5          # steps multiply by exp(lr_width * ln(lr/lr_opt)^2)
    diverge_above: float = 4.0     # lr/lr_opt beyond which a run diverges
    noise: float = 0.03            # sd of ln(steps)
    max_steps: int = 20_000
    metric: str = "train_error"

    def lr_opt(self, batch_size: float) -> float:
        return self.eps_max / (1.0 + self.b_noise / batch_size)


def make_record(truth: Truth, batch_size: int, lr: float, seed: int, task: str = "synthetic_model",
                optimizer: str = "sgd", curve_ratio: float = 1.05, status: str | None = None) -> dict:
    """One record.json as a dict. `status="running"` makes a partial record."""
    rng = np.random.default_rng([seed, batch_size, int(round(lr * 1e9)) % (2**31)])
    config = {"task": {"name": task}, "optimizer": {"name": optimizer, "lr": lr},
              "batch_size": batch_size, "seed": seed,
              "goals": {"metric": truth.metric, "thresholds": list(truth.thresholds)},
              "budget": {"max_steps": truth.max_steps, "max_examples": None, "max_seconds": None}}
    x = math.log(lr / truth.lr_opt(batch_size))
    diverged = x > math.log(truth.diverge_above)
    cross = np.array([s * (1 + b / batch_size) for s, b in zip(truth.s_min, truth.b_crit)])
    cross *= math.exp(truth.lr_width * x * x) * np.exp(truth.noise * rng.standard_normal(cross.size))
    cross = np.maximum.accumulate(np.maximum(np.round(cross), 1.0) + np.arange(cross.size))
    inflate = 1.0 + 0.5 * max(-x, 0.0)  # too small an lr inflates B_simple (paper App. C)
    b_simple = np.array(truth.b_simple) * inflate * np.exp(0.1 * rng.standard_normal(cross.size))
    if diverged:
        final, reason = 10, "loss exceeded 10x its initial value"
        run_status = records.DIVERGED
    elif cross[-1] <= truth.max_steps:
        final, reason, run_status = int(cross[-1]), "all goals reached", records.COMPLETED
    else:
        final, reason, run_status = truth.max_steps, "max_steps reached", records.BUDGET_EXHAUSTED
    reached = (cross <= final) & (not diverged)
    goals = []
    for k, thr in enumerate(truth.thresholds):
        grad_sq = 1.0 / (1.0 + cross[k] / 100.0)
        measured = dict(step=int(cross[k]), examples=int(cross[k]) * batch_size, wall_time=1e-3 * cross[k],
                        b_simple=float(b_simple[k]), grad_sq_norm=grad_sq, trace_sigma=float(b_simple[k]) * grad_sq)
        goals.append(records.GoalRecord(metric=truth.metric, threshold=thr, reached=bool(reached[k]),
                                        **(measured if reached[k] else {})))
    n = max(2, int(math.log(final) / math.log(curve_ratio)) + 1)
    step = np.unique(np.round(np.geomspace(1, final, n)).astype(int))
    # the error passes through each threshold at its crossing step (log-log interpolation)
    knots_s = np.log(np.concatenate([[1.0], cross]))
    knots_e = np.log(np.concatenate([[0.9], truth.thresholds]))
    err = np.exp(np.interp(np.log(step), knots_s, knots_e))
    if diverged:
        err = np.full(step.size, 0.9)
    bs_curve = np.interp(np.log(step), np.log(cross), b_simple)
    grad_sq_curve = 1.0 / (1.0 + step / 100.0)
    curve = {"step": step.tolist(), "examples": (step * batch_size).tolist(),
             "wall_time": (1e-3 * step).tolist(), "train_loss": (2.3 * err).tolist(),
             "train_error": err.tolist(), "b_simple": bs_curve.tolist(),
             "grad_sq_norm": grad_sq_curve.tolist(), "trace_sigma": (bs_curve * grad_sq_curve).tolist()}
    summary = records.Summary(steps=final, examples=final * batch_size, wall_time=1e-3 * final, reason=reason)
    return records.make_record(config, status or run_status, goals, summary, curve)


def lr_grid(truth: Truth, batch_size: int, factors) -> list[float]:
    """A grid centred on the optimal lr at this B, as the paper's procedure does."""
    return [truth.lr_opt(batch_size) * f for f in factors]


def write_sweep(sweep_dir: str | Path, truth: Truth = Truth(), batch_sizes=tuple(2 ** k for k in range(2, 12)),
                lr_factors=(0.25, 0.5, 1.0, 2.0), seeds=(0,), tasks=("synthetic_model",),
                curve_ratio: float = 1.05) -> list[Path]:
    """Write one record per (task, B, lr, seed) under SWEEP_DIR/runs/<run_name>/record.json."""
    paths = []
    for task in tasks:
        for b in batch_sizes:
            for lr in lr_grid(truth, b, lr_factors):
                for seed in seeds:
                    rec = make_record(truth, b, lr, seed, task=task, curve_ratio=curve_ratio)
                    path = Path(sweep_dir) / records.RUNS_DIR / rec["run_name"] / records.RECORD_FILE
                    records.write_record(path, rec)
                    paths.append(path)
    return paths
