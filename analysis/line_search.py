"""B_noise by the paper's line search: the optimal step size at several batch sizes, at fixed parameters.

    python -m analysis.line_search SWEEP_DIR [--goal GOAL] [--batch-sizes B ...] [--draws N] [--out DIR]

McCandlish et al. 2018 (arXiv:1812.06162, eqs. 2.6-2.7): at parameters theta, one SGD step with lr
eps on a batch of B examples changes the true loss, in expectation over the batch, by

    E[dL](eps) = -eps |G|^2 + eps^2/2 (G^T H G + tr(H Sigma)/B) + O(eps^3),

so the optimal lr of this local model is eps_opt(B) = eps_max / (1 + B_noise/B), with
eps_max = |G|^2 / G^T H G and B_noise = tr(H Sigma) / G^T H G. Measuring eps_opt(B) at a few B and
fitting that curve (critbatch.tradeoff.fit_lr_curve) measures B_noise without a Hessian-vector
product and without the two-batch estimator: an independent check of both.

How eps_opt(B) is measured. Draw N batches of B with replacement (as training draws them), take
one step from theta on each and measure the loss change on the whole training set (linreg: its
closed-form loss, task.exact). Every lr uses the same batches (common random numbers), so the
averaged curve is a smooth function of eps whose noise is that of the draws alone. On the first
few hundred draws a geometric search finds the minimum of the averaged curve, and the vertex of
a parabola through the points near it is eps_best: the line search proper. On all N draws the
local model a eps + b eps^2 (+ c eps^3, which absorbs the higher orders) is fitted at
eps_best x (1/8 ... 1/2), and eps_opt = -a/(2b); a bootstrap over the draws gives its standard
error and, repeated at every B, B_noise's interval. Where the loss is far from quadratic over a
step the two differ: B_noise is defined by eps_opt, and b_noise_argmin (the same fit to eps_best)
shows how much that matters at the lrs SGD would use. On a ReLU network the curve is only
piecewise smooth (steps cross activation kinks, which the autograd Hessian does not see), so the
local model there can differ from the Hessian's by a few percent.

Precision: float32 by default (a copy of the model; ~3x faster than float64 on a CPU), float64
for a batch size whose loss changes are within 10^4 rounding units of the loss (--float64: always).

Where theta comes from: for each goal, every best run that crossed it (critbatch.tradeoff.best_runs)
is trained again from its record's settings to the step where its record probed the goal
(`probed_at`, else the crossing step): the same run, so the same parameters up to floating-point
reordering on another device.

The same parameters are also measured by the other, independent method: the two-batch
Hessian-vector-product estimator that training uses online (critbatch.curvature), on --hvp-draws
batches of 4 micro-batches of about the line search's B_noise examples each (the size where it is
most precise per example; any size is unbiased). The two are compared in docs/results.md.

Writes to --out (default SWEEP_DIR/line_search): line_search.csv (one row per goal and run: B_noise
with its bootstrap interval and the fit's, eps_max, B_noise by Hessian-vector products with its
standard error (b_noise_hvp, b_noise_hvp_se), and a reference B_noise where one exists: the
closed form for linreg, else the record's online estimate at the goal if it has one),
line_search_points.csv (one row per goal, run and B: eps_opt, its se, eps_best), summary.md and
figures/line_search.png (eps_opt against B with the fit, one panel per goal). Bad input gives
`error: ...` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from analysis.cli import run_command
from critbatch import records, tradeoff
from critbatch.config import NoiseScaleConfig, RunConfig, Sampling
from critbatch.monitor import RunBook
from critbatch.tasks import Task
from critbatch.curvature import b_noise_at
from critbatch.batches import Batches
from critbatch.micro_grads import has_batchnorm
from critbatch.train import Training

DEFAULT_DRAWS = 2000
DEFAULT_HVP_DRAWS = 400    # B_noise by Hessian-vector products at the same point: ~7% at MNIST-1D's goals
HVP_MICRO_BATCHES = 4
PILOT_DRAWS = 256          # draws that locate the minimum of the averaged curve
MAX_ROWS = 1 << 16         # examples (or examples x parameter sets) per vectorised pass: memory
# Around the located minimum eps_best, as multiples of it: the parabola whose vertex is eps_best
# (pilot draws), and the points of the local model a eps + b eps^2 + c eps^3 (all draws). Those
# stay below eps_best/2, where the cubic term absorbs what is not quadratic; on a ReLU network the
# curve is only piecewise smooth, and a smaller region would not be closer to the Hessian.
NEAR = (0.5, 0.75, 1.0, 1.25, 1.5)
LOCAL = (0.125, 0.25, 0.375, 0.5)

# Progress and results of the command, on stderr (`run` attaches the handler; silent as a library).
logger = logging.getLogger("analysis.line_search")


class LineSearchError(ValueError):
    """Input the line search cannot use; the message says what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------
# A model frozen at theta: the steps SGD would take from it, and what they do to the true loss


def _has_active_dropout(model: nn.Module) -> bool:
    return model.training and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


class FixedPoint:
    """A copy of `model` at its current parameters theta, in `dtype`, on `task` as loaded.

    batch_gradients(B, n) are the gradients of n batches of B drawn as training draws them
    (i.i.d. with replacement from a finite dataset, fresh samples from a streaming one);
    loss_changes(steps) is L(theta + step) - L(theta) of the true loss: the mean over the whole
    training set, or the task's closed form (task.exact(...)["exact_loss"]) for a streaming task.
    The loss must be a function of the parameters alone: no BatchNorm (it couples the examples
    of a batch) and no active dropout.
    """

    def __init__(self, model: nn.Module, task: Task, dtype: torch.dtype = torch.float32, max_rows: int = MAX_ROWS):
        if has_batchnorm(model) or _has_active_dropout(model):
            raise LineSearchError(f"task {task.name!r}: the model has BatchNorm or active dropout, so its loss is not a "
                                  "function of the parameters alone and has no single line search; "
                                  "use a model without them (e.g. task.dropout=0)")
        self.task, self.max_rows, self.dtype = task, max_rows, dtype
        self._source, self._twin = model, None
        self.model = copy.deepcopy(model).to(dtype)
        self.params = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        self.buffers = dict(self.model.named_buffers())
        self.theta = torch.cat([p.reshape(-1) for p in self.params.values()])
        self.device = self.theta.device
        self.streaming = task.dataset_size is None
        if self.streaming:
            if not callable(getattr(task, "exact", None)):
                raise LineSearchError(f"task {task.name!r} streams fresh samples and has no closed-form loss "
                                      "(task.exact): the line search needs the true loss")
        else:
            if task.inputs is None:
                raise LineSearchError(f"task {task.name!r} is not loaded: call task.load(device) first")
            self.inputs = task.inputs.to(self.device)
            self.inputs = self.inputs.to(dtype) if self.inputs.is_floating_point() else self.inputs
            self.targets = task.targets.to(self.device)
            self.targets = self.targets.to(dtype) if self.targets.is_floating_point() else self.targets
        self.base_loss = self._true_losses(self.theta[None])[0]

    @property
    def dataset_size(self) -> int | None:
        return None if self.streaming else len(self.inputs)

    def resolved(self, changes: np.ndarray) -> bool:
        """Whether averaged loss changes this small are far (10^4 times) above the rounding of the
        loss in this precision: a float32 mean over the training set is good to ~1e-7 of the loss."""
        return bool(np.min(np.abs(changes)) > 1e4 * torch.finfo(self.dtype).eps * abs(self.base_loss))

    def in_float64(self) -> "FixedPoint":
        """The same point in float64 (built once), for loss changes too small for float32."""
        if self.dtype == torch.float64:
            return self
        if self._twin is None:
            self._twin = FixedPoint(self._source, self.task, torch.float64, self.max_rows)
        return self._twin

    def _unflat(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for name, p in self.params.items():
            out[name] = flat[start:start + p.numel()].view_as(p)
            start += p.numel()
        return out

    def _batch_loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task.loss(functional_call(self.model, (self._unflat(flat), self.buffers), (x,)), y)

    def _draw(self, batch_size: int, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.streaming:
            x, y = self.task.sample(count * batch_size, generator)
            x, y = (t.to(self.dtype) if t.is_floating_point() else t for t in (x, y))
            return x.reshape(count, batch_size, *x.shape[1:]), y.reshape(count, batch_size, *y.shape[1:])
        index = torch.randint(len(self.inputs), (count, batch_size), generator=generator, device=self.device)
        return self.inputs[index], self.targets[index]

    def batch_gradients(self, batch_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
        """(count, P): the gradient of the mean loss on each of `count` independent batches."""
        per_pass = max(1, self.max_rows // batch_size)
        gradient = vmap(grad(self._batch_loss), in_dims=(None, 0, 0))
        return torch.cat([gradient(self.theta, *self._draw(batch_size, min(per_pass, count - start), generator))
                          for start in range(0, count, per_pass)])

    def _true_losses(self, points: torch.Tensor) -> np.ndarray:
        if self.streaming:
            return np.array([self.task.exact(p)["exact_loss"] for p in points])
        n = len(self.inputs)
        per_pass = max(1, self.max_rows // n)

        def full_loss(flat):  # the mean over the training set as a size-weighted sum of chunks
            return sum(self._batch_loss(flat, self.inputs[s:s + self.max_rows], self.targets[s:s + self.max_rows])
                       * (min(self.max_rows, n - s) / n) for s in range(0, n, self.max_rows))

        losses = vmap(full_loss)
        values = torch.cat([losses(points[s:s + per_pass]) for s in range(0, len(points), per_pass)])
        return values.double().cpu().numpy()

    def loss_changes(self, steps: torch.Tensor) -> np.ndarray:
        """L(theta + step) - L(theta) of the true loss for each row of `steps` (m, P)."""
        with torch.no_grad():
            return self._true_losses(self.theta + steps) - self.base_loss


# ---------------------------------------------------------------------------------------------
# eps_opt at one batch size


@dataclass
class OptimalLr:
    """The line search at one batch size. eps_opt: the local quadratic model's optimum -a/(2b);
    eps_best: the minimiser of the averaged measured curve; boot: bootstrap replicates of eps_opt
    over the draws; eps, mean_change, change_se: the measured curve (the grid, sorted); dtype: the
    precision it was measured in."""

    batch_size: int
    eps_opt: float
    eps_opt_se: float
    eps_best: float
    draws: int
    dtype: str
    eps: np.ndarray
    mean_change: np.ndarray
    change_se: np.ndarray
    boot: np.ndarray = field(repr=False)


def _local_optimum(eps: np.ndarray, curves: np.ndarray) -> np.ndarray:
    """-a/(2b) of a eps + b eps^2 + c eps^3 fitted to each row of `curves` (R, K) at `eps` (K):
    NaN where the fitted curve does not fall then rise (a >= 0 or b <= 0)."""
    scale = eps.max()
    u = eps / scale
    coef = np.linalg.lstsq(np.stack([u, u ** 2, u ** 3], axis=1), curves.T, rcond=None)[0]
    a, b = coef[0], coef[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((a < 0) & (b > 0), -a / (2 * b) * scale, np.nan)


def _vertex(eps: np.ndarray, curve: np.ndarray) -> float:
    """The minimiser of a parabola through (eps, curve): NaN if it opens downwards."""
    c2, c1, _ = np.polyfit(eps, curve, 2)
    return float(-c1 / (2 * c2)) if c2 > 0 else math.nan


def optimal_lr(point: FixedPoint, batch_size: int, draws: int = DEFAULT_DRAWS, eps_guess: float = 0.1,
               n_boot: int = 200, seed: int = 0, pilot_draws: int = PILOT_DRAWS, span: int = 4) -> OptimalLr:
    """Measure eps_opt(B) at `point` by line search over `draws` batches of `batch_size`.

    On the first `pilot_draws` draws: a geometric search (lrs a factor 2 apart, `span` either side
    of `eps_guess`, extended until the minimum of the averaged curve is inside), then eps_best, the
    vertex of a parabola through NEAR x that minimum (recentred until it lies inside). On all draws:
    the local model at LOCAL x eps_best, and its bootstrap. Raises LineSearchError when the loss
    does not decrease along the batch gradients at any lr tried.
    """
    if batch_size < 1 or draws < 2:
        raise LineSearchError(f"batch size {batch_size} and draws {draws}: need B >= 1 and at least 2 draws")
    # each (seed, B) its own stream: the same batches whichever B came first, in float64 too
    generator = torch.Generator(device=point.device).manual_seed(
        int(np.random.SeedSequence([seed, batch_size]).generate_state(1)[0]))
    grads = point.batch_gradients(batch_size, draws, generator)
    measured: dict[float, np.ndarray] = {}  # lr -> loss change of each draw (the first ones, or all)

    def change(eps: float, rows: int) -> np.ndarray:
        if eps not in measured or len(measured[eps]) < rows:
            measured[eps] = point.loss_changes(-eps * grads[:rows])
        return measured[eps][:rows]

    pilot = min(draws, pilot_draws)
    exponents = list(range(-span, span + 1))
    for _ in range(60):
        means = [change(eps_guess * 2.0 ** k, pilot).mean() for k in exponents]
        best = int(np.argmin(means))
        if 0 < best < len(exponents) - 1:
            break
        exponents = [exponents[0] - 1] + exponents if best == 0 else exponents + [exponents[-1] + 1]
    else:
        raise LineSearchError(f"B={batch_size}: no minimum of the loss change between lr "
                              f"{eps_guess * 2.0 ** exponents[0]:.3g} and {eps_guess * 2.0 ** exponents[-1]:.3g}")
    if means[best] >= 0:
        raise LineSearchError(f"B={batch_size}: no lr decreases the loss on average (best change {means[best]:.3g})")
    centre = eps_guess * 2.0 ** exponents[best]
    for _ in range(4):
        near = centre * np.array(NEAR)
        curve = np.array([change(e, pilot).mean() for e in near])
        eps_best = _vertex(near, curve)
        if np.isfinite(eps_best) and near[0] <= eps_best <= near[-1]:
            break
        centre = float(near[int(np.argmin(curve))])
    else:
        eps_best = float(near[int(np.argmin(curve))])  # the curve is flat or kinked there: its lowest point

    local = eps_best * np.array(LOCAL)
    changes = np.stack([change(e, draws) for e in local], axis=1)  # (draws, len(LOCAL))
    if point.dtype != torch.float64 and not point.resolved(changes.mean(0)):
        return optimal_lr(point.in_float64(), batch_size, draws, eps_best, n_boot, seed, pilot_draws, 1)
    eps_opt = float(_local_optimum(local, changes.mean(0)[None])[0])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(draws, np.full(draws, 1.0 / draws), size=n_boot) / draws
    boot = _local_optimum(local, weights @ changes) if n_boot else np.empty(0)
    lrs = np.array(sorted(measured))
    se = float(np.nanstd(boot)) if np.isfinite(boot).sum() > 1 else math.nan
    return OptimalLr(batch_size=batch_size, eps_opt=eps_opt, eps_opt_se=se,
                     eps_best=eps_best, draws=draws, dtype=str(point.dtype).removeprefix("torch."), eps=lrs,
                     mean_change=np.array([measured[e].mean() for e in lrs]),
                     change_se=np.array([measured[e].std(ddof=1) / math.sqrt(len(measured[e])) for e in lrs]),
                     boot=boot)


# ---------------------------------------------------------------------------------------------
# B_noise from eps_opt at several batch sizes


@dataclass
class LineSearch:
    """B_noise by line search at one point: the per-B measurements, the fit of
    eps_opt(B) = eps_max/(1 + B_noise/B) (tradeoff.LrFit, with its residual-based intervals), the
    bootstrap interval of B_noise over the draws, and the same fit to the curves' minimisers."""

    points: list[OptimalLr]
    fit: tradeoff.LrFit
    b_noise_ci: tuple[float, float]
    boot_identified: float           # share of bootstrap replicates whose fit was identified
    fit_argmin: tradeoff.LrFit

    @property
    def b_noise(self) -> float:
        return self.fit.b_noise

    def warnings(self) -> list[str]:
        """What makes this B_noise less than a measurement of the paper's quantity."""
        notes = []
        flat = [p.batch_size for p in self.points if not np.isfinite(p.eps_opt)]
        if flat:
            notes.append(f"no local minimum at B={', '.join(map(str, flat))}: along the steps the loss curves "
                         "downwards (or not measurably upwards) near theta, so B_noise does not describe it")
        far = [f"{p.batch_size} ({p.eps_opt / p.eps_best:.2g}x)" for p in self.points
               if np.isfinite(p.eps_opt) and not 0.5 <= p.eps_opt / p.eps_best <= 2]
        if far:
            notes.append(f"eps_opt of the local model is far from the measured minimum at B={', '.join(far)}: the "
                         "loss is not quadratic over one step, see b_noise_argmin")
        if self.fit.identified:
            sizes = [p.batch_size for p in self.points]
            if not min(sizes) / 4 <= self.b_noise <= 4 * max(sizes):
                notes.append(f"B_noise {self.b_noise:.3g} lies beyond the batch sizes measured ({min(sizes)}-"
                             f"{max(sizes)}): extrapolated; measure at batch sizes around it (--batch-sizes)")
        if self.fit.identified and np.isfinite(self.boot_identified) and self.boot_identified < 0.9:
            notes.append(f"only {self.boot_identified:.0%} of the bootstrap fits were identified: the interval "
                         "is unreliable (more --draws)")
        return notes


def line_search(point: FixedPoint, batch_sizes, draws: int = DEFAULT_DRAWS, eps_guess: float = 0.1,
                seed: int = 0, n_boot: int = 200, level: float = 0.95, pilot_draws: int = PILOT_DRAWS) -> LineSearch:
    """B_noise at `point`: eps_opt by line search at each batch size, then fit_lr_curve.

    The next batch size's search starts from the previous eps_best (eps_opt grows with B).
    """
    batch_sizes = sorted({int(b) for b in batch_sizes})
    if len(batch_sizes) < tradeoff.MIN_BATCH_SIZES_FOR_FIT or batch_sizes[0] < 1:
        raise LineSearchError(f"batch sizes {batch_sizes}: need at least {tradeoff.MIN_BATCH_SIZES_FOR_FIT} "
                              "distinct batch sizes >= 1 to fit eps_opt(B)")
    points: list[OptimalLr] = []
    for k, b in enumerate(batch_sizes):
        if points:  # eps_opt grows with B, at most in proportion: start half-way (in log) between
            guess, span = points[-1].eps_best * math.sqrt(b / points[-1].batch_size), 2
        else:
            guess, span = eps_guess, 4
        start = time.perf_counter()
        points.append(optimal_lr(point, b, draws, guess, n_boot, seed, pilot_draws, span))
        logger.info(f"    B={b} ({k + 1}/{len(batch_sizes)}): eps_opt {points[-1].eps_opt:.4g} over {draws} draws "
                    f"({time.perf_counter() - start:.1f} s)")
    bs = [p.batch_size for p in points]
    fit = tradeoff.fit_lr_curve(bs, [p.eps_opt for p in points], level=level) \
        if all(np.isfinite(p.eps_opt) and p.eps_opt > 0 for p in points) else tradeoff.LrFit(
            message="not identified: the local model has no minimum at some batch size (see warnings)")
    fit_argmin = tradeoff.fit_lr_curve(bs, [p.eps_best for p in points], level=level) \
        if all(np.isfinite(p.eps_best) and p.eps_best > 0 for p in points) else tradeoff.LrFit()
    replicates = []
    for r in range(n_boot):
        lrs = [p.boot[r] for p in points]
        ok = all(np.isfinite(v) and v > 0 for v in lrs)
        replicates.append(tradeoff.fit_lr_curve(bs, lrs).b_noise if ok else math.nan)
    replicates = np.array(replicates)
    identified = float(np.isfinite(replicates).mean()) if n_boot else math.nan
    ci = (tuple(float(v) for v in np.nanquantile(replicates, [0.5 - level / 2, 0.5 + level / 2]))
          if n_boot and np.isfinite(replicates).any() else (math.nan, math.nan))
    return LineSearch(points=points, fit=fit, b_noise_ci=ci, boot_identified=identified, fit_argmin=fit_argmin)


# ---------------------------------------------------------------------------------------------
# From a sweep: the parameters where the best runs crossed each goal


def parameters_at(config: dict, step: int) -> tuple[nn.Module, Task]:
    """The run's model after `step` updates: the same run (its record's settings, its seed),
    trained again to that step; and its task, loaded."""
    run = RunConfig.from_dict({**config, "budget": {"max_steps": max(int(step), 1), "max_examples": None,
                                                    "max_seconds": None}})
    task = run.build_task()
    training = Training([run], task, [RunBook(run, None)], packed=False)
    training.run()
    return training.train_step.module(0), task


def default_batch_sizes(run_batch_size: int, dataset_size: int | None) -> list[int]:
    """B_run/4, B_run, 4 B_run, 16 B_run: a span of 64 around the batch size the run trained with,
    where its noise scale matters; those above a finite dataset become its size, and smaller
    ones are added below while fewer than three distinct batch sizes remain."""
    ladder = [max(1, round(run_batch_size * 4.0 ** k)) for k in (-1, 0, 1, 2)]
    if dataset_size is not None:
        ladder = [min(b, dataset_size) for b in ladder]
    sizes = sorted(set(ladder))
    while len(sizes) < tradeoff.MIN_BATCH_SIZES_FOR_FIT and sizes[0] > 1:
        sizes.insert(0, max(1, sizes[0] // 4))
    return sizes


def _goal_entry(record: dict, threshold: float) -> dict:
    return next(g for g in record["goals"] if float(g["threshold"]) == float(threshold))


def _reference(point: FixedPoint, task: Task, goal: dict) -> tuple[float, str]:
    """A B_noise to compare with: the task's closed form where it has one, else the record's
    online estimate at the goal where it has one."""
    exact = getattr(task, "exact", None)
    if callable(exact):
        value = exact(point.theta).get("exact_b_noise")
        if value is not None:
            return float(value), "closed form (task.exact)"
    if goal.get("b_noise") is not None:
        return float(goal["b_noise"]), "record (online estimate at the goal)"
    return math.nan, ""


def hvp_b_noise(model: nn.Module, task: Task, guess: float, draws: int, seed: int):
    """B_noise of the model as it is by the two-batch Hessian-vector-product estimator, on `draws`
    batches of HVP_MICRO_BATCHES micro-batches of about `guess` examples (the line search's B_noise)."""
    micro = int(min(max(round(guess) if np.isfinite(guess) else 64, 1), NoiseScaleConfig().max_hessian_micro_batch))
    batches = Batches(task, micro * HVP_MICRO_BATCHES, Sampling.with_replacement, seed + 7,
                      next(model.parameters()).device)
    return b_noise_at(model, task.loss, batches, HVP_MICRO_BATCHES, draws)


def _pick_goals(best, goal: str | None) -> list[str]:
    goals = list(dict.fromkeys(best["goal"]))
    if goal is None:
        return goals
    by_threshold = {f"{t:g}": g for g, t in zip(best["goal"], best["goal_threshold"])}
    if goal in goals:
        return [goal]
    try:
        key = f"{float(goal):g}"
    except ValueError:
        key = None
    if key in by_threshold:
        return [by_threshold[key]]
    raise LineSearchError(f"--goal {goal!r} is not a goal of this sweep; its goals: {', '.join(goals)} "
                          "(or give a threshold alone, e.g. --goal 0.2)")


@dataclass
class Measured:
    """One line search in a sweep: which run, where, and what it gave."""

    row: dict
    search: LineSearch
    reference: float
    reference_source: str
    hvp: object = None  # critbatch.gns.NoiseScale of the curvature forms (None: not measured)


def measure_sweep(sweep_dir: str | Path, goal: str | None = None, batch_sizes: list[int] | None = None,
                  draws: int = DEFAULT_DRAWS, n_boot: int = 200, level: float = 0.95, seed: int = 0,
                  float64: bool = False, log=logger.info,
                  hvp_draws: int = DEFAULT_HVP_DRAWS) -> tuple[list[Measured], list[str]]:
    """The line search at every best run's crossing of each goal (or of `goal`) in a sweep, and
    the points where none could be made (why)."""
    if not Path(sweep_dir).is_dir():
        raise LineSearchError(f"{sweep_dir}: no such sweep directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = records.load_sweep(sweep_dir)
    for w in caught:
        log(f"warning: {w.message}")
    if runs.empty:
        raise LineSearchError(f"{sweep_dir}: no finished run records under {records.RUNS_DIR}/ "
                              "(run the sweep first, or point at the directory that holds runs/)")
    best = tradeoff.best_runs(runs)
    goals = _pick_goals(best, goal)
    hit = best[best["goal"].isin(goals) & best["reached"] & ~best["censored"] & best["run_dir"].notna()]
    if hit.empty:
        raise LineSearchError(f"no run crossed {'goal ' + goals[0] if goal else 'any goal'} after its first "
                              "valid measurement: there are no parameters at a crossing to measure")
    for missing in [g for g in goals if g not in set(hit["goal"])]:
        log(f"warning: goal {missing}: no run crossed it after its first valid measurement; skipped")
    measured, failures = [], []
    began = time.perf_counter()
    for i, (_, row) in enumerate(hit.iterrows()):
        record = records.read_record(Path(row["run_dir"]) / records.RECORD_FILE)
        entry = _goal_entry(record, row["goal_threshold"])
        step = int(entry.get("probed_at") or round(entry["step"]))
        spent = time.perf_counter() - began
        left = f", about {spent / i * (len(hit) - i):.0f} s left" if i else ""
        log(f"[{i + 1}/{len(hit)}] {row['goal']}  {row['run_name']}: training it again to step {step} "
            f"({spent:.0f} s so far{left})")
        start = time.perf_counter()
        model, task = parameters_at(record["config"], step)
        try:  # one point without a line search (no lr lowers the loss there) does not stop the others
            point = FixedPoint(model, task, dtype=torch.float64 if float64 else torch.float32)
            sizes = batch_sizes or default_batch_sizes(int(row["batch_size"]), task.dataset_size)
            logger.info(f"    parameters ready ({time.perf_counter() - start:.1f} s); line search at "
                        f"B = {', '.join(map(str, sorted(set(sizes))))}")
            search = line_search(point, sizes, draws=draws, eps_guess=float(row["lr"]), seed=seed, n_boot=n_boot,
                                 level=level)
        except LineSearchError as exc:
            failures.append(f"{row['goal']} / {row['run_name']} at step {step}: {exc}")
            log(f"warning: {failures[-1]}; skipped")
            continue
        reference, source = _reference(point, task, entry)
        if hvp_draws:
            logger.info(f"    B_noise by Hessian-vector products on {hvp_draws} draws")
        hvp = hvp_b_noise(model, task, search.b_noise, hvp_draws, seed) if hvp_draws else None
        data = {**row.to_dict(), "step": step, "b_simple_record": entry.get("b_simple"),
                "seconds": time.perf_counter() - start}
        measured.append(Measured(data, search, reference, source, hvp))
        log(f"{row['goal']}  {row['run_name']}  step {step}: B_noise {search.b_noise:.4g} "
            f"[{search.b_noise_ci[0]:.4g}, {search.b_noise_ci[1]:.4g}]"
            + (f", by HVP {hvp.b_simple:.4g} +- {hvp.b_simple_se:.2g}" if hvp is not None else "")
            + (f", reference {reference:.4g}" if np.isfinite(reference) else "")
            + f"  ({data['seconds']:.1f} s)")
    if not measured:
        raise LineSearchError(f"no line search could be made; {failures[0]}")
    return measured, failures


# ---------------------------------------------------------------------------------------------
# Tables, summary and figure


def tables(measured: list[Measured]):
    """(per run, per run and batch size) DataFrames: line_search.csv and line_search_points.csv."""
    import pandas as pd

    rows, points = [], []
    for m in measured:
        s, fit = m.search, m.search.fit
        keys = {k: m.row.get(k) for k in ("goal", "run_name", "batch_size", "lr", "step")}
        rows.append({
            **keys, "b_noise": fit.b_noise, "b_noise_low": s.b_noise_ci[0], "b_noise_high": s.b_noise_ci[1],
            "b_noise_fit_low": fit.b_noise_ci[0], "b_noise_fit_high": fit.b_noise_ci[1],
            "eps_max": fit.eps_max, "eps_max_low": fit.eps_max_ci[0], "eps_max_high": fit.eps_max_ci[1],
            "b_noise_argmin": s.fit_argmin.b_noise, "fit_resid_rms": fit.resid_rms, "identified": fit.identified,
            "bootstrap_identified": s.boot_identified,
            "b_noise_hvp": m.hvp.b_simple if m.hvp is not None else math.nan,
            "b_noise_hvp_se": m.hvp.b_simple_se if m.hvp is not None else math.nan,
            "hvp_draws": m.hvp.updates if m.hvp is not None else 0,
            "b_noise_reference": m.reference, "reference_source": m.reference_source,
            "ratio_to_reference": fit.b_noise / m.reference if m.reference else math.nan,
            "b_simple_record": m.row.get("b_simple_record"),
            "line_search_batch_sizes": " ".join(str(p.batch_size) for p in s.points),
            "draws": s.points[0].draws, "seconds": m.row.get("seconds"), "message": fit.message,
            "warnings": "; ".join(s.warnings()),
        })
        for p in s.points:
            points.append({**{k: keys[k] for k in ("goal", "run_name", "step")}, "run_batch_size": keys["batch_size"],
                           "batch_size": p.batch_size, "eps_opt": p.eps_opt, "eps_opt_se": p.eps_opt_se,
                           "eps_best": p.eps_best, "eps_fit": float(fit.predict_lr(p.batch_size)), "draws": p.draws,
                           "dtype": p.dtype})
    return pd.DataFrame(rows), pd.DataFrame(points)


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.4g}"


def render_summary(table, source: str, files: list[Path], out_dir: Path, skipped: list[str] = ()) -> str:
    lines = [f"# B_noise by line search: {source}", "",
             "At the parameters where each best run crossed a goal, eps_opt(B) was measured by line search "
             "(one SGD step from there on each of many batches of B, the loss change on the whole training set) "
             "and eps_opt(B) = eps_max / (1 + B_noise/B) fitted (McCandlish et al. 2018, eq. 2.6-2.7). "
             "The interval is a bootstrap over the batches drawn; the fit's own interval reflects its residuals.", "",
             "B_noise by HVP is the other method at the same parameters: the two-batch Hessian-vector-product "
             "estimator, with its standard error.", "",
             "| goal | run | B | step | B_noise (line search) | interval | fit interval | eps_max | B_noise from minima "
             "| B_noise by HVP | reference B_noise | ratio | B_simple (record) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        ref = f"{_fmt(r.b_noise_reference)} ({r.reference_source})" if r.reference_source else ""
        lines.append(f"| {r.goal} | {r.run_name} | {r.batch_size} | {r.step} | {_fmt(r.b_noise)} "
                     f"| [{_fmt(r.b_noise_low)}, {_fmt(r.b_noise_high)}] | [{_fmt(r.b_noise_fit_low)}, "
                     f"{_fmt(r.b_noise_fit_high)}] | {_fmt(r.eps_max)} | {_fmt(r.b_noise_argmin)} "
                     f"| {_fmt(r.b_noise_hvp)} ± {_fmt(r.b_noise_hvp_se)} | {ref} "
                     f"| {_fmt(r.ratio_to_reference)} "
                     f"| {_fmt(r.b_simple_record)} |")
    notes = [f"- {r.goal} / {r.run_name}: {'; '.join(filter(None, [r.message, r.warnings]))}"
             for r in table.itertuples() if r.message or r.warnings]
    if notes:
        lines += ["", "Warnings:", *notes]
    if skipped:
        lines += ["", "No line search:", *[f"- {s}" for s in skipped]]
    lines += ["", "Files:", *[f"- {f.relative_to(out_dir)}" for f in files], ""]
    return "\n".join(lines)


def draw_figure(measured: list[Measured], path: Path) -> None:
    """eps_opt against B (log-log) with each run's fit, one panel per goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goals = list(dict.fromkeys(m.row["goal"] for m in measured))
    fig, axes = plt.subplots(1, len(goals), figsize=(4.5 * len(goals), 3.8), squeeze=False)
    for ax, goal in zip(axes[0], goals):
        for k, m in enumerate(m for m in measured if m.row["goal"] == goal):
            colour = f"C{k % 10}"
            b = np.array([p.batch_size for p in m.search.points], dtype=float)
            ax.errorbar(b, [p.eps_opt for p in m.search.points], yerr=[2 * p.eps_opt_se for p in m.search.points],
                        fmt="o", color=colour, capsize=2,
                        label=f"B={m.row['batch_size']}: B_noise {_fmt(m.search.b_noise) or 'not identified'}")
            ax.plot(b, [p.eps_best for p in m.search.points], "x", color=colour, alpha=0.6)
            if m.search.fit.identified:
                grid = np.geomspace(b.min() / 2, b.max() * 2, 100)
                ax.plot(grid, m.search.fit.predict_lr(grid), "-", color=colour, alpha=0.7)
        ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="optimal lr", title=goal)
        ax.legend(fontsize=7, title="o eps_opt (local), x curve minimum", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis.line_search",
        description="B_noise by the line search of McCandlish et al. 2018 (An Empirical Model of Large-Batch "
                    "Training, arXiv:1812.06162): at the parameters where each best run crossed a goal, the "
                    "lr that most lowers the training loss in one SGD step is measured at several batch sizes B, "
                    "averaging the loss change over many batches. Fitting eps_opt(B) = eps_max / (1 + B_noise/B) "
                    "to those lrs gives B_noise = tr(H Sigma) / (G^T H G) without any Hessian-vector product.",
        epilog="Writes line_search.csv, line_search_points.csv, summary.md and figures/line_search.png. "
               "Details: the module's docstring (analysis/line_search.py).")
    p.add_argument("sweep_dir", help="sweep directory holding runs/*/record.json")
    p.add_argument("--goal", help="only this goal (its label, e.g. 'train_error<=0.2', or its threshold)")
    p.add_argument("--batch-sizes", type=int, nargs="+", metavar="B",
                   help="batch sizes of the line search (default: B_run/4, B_run, 4 B_run, 16 B_run)")
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS, metavar="N",
                   help=f"batches drawn per batch size ({DEFAULT_DRAWS})")
    p.add_argument("--hvp-draws", type=int, default=DEFAULT_HVP_DRAWS, metavar="N",
                   help=f"batches for B_noise by Hessian-vector products at the same parameters "
                        f"({DEFAULT_HVP_DRAWS}; 0: not measured)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="R", help="bootstrap resamples (200)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches drawn (0)")
    p.add_argument("--float64", action="store_true",
                   help="measure in float64 throughout (default float32, float64 only where loss changes are "
                        "too small for it)")
    p.add_argument("--out", metavar="DIR", help="output folder (default SWEEP_DIR/line_search)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary")
    p.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")
    return p


def run(args: argparse.Namespace) -> Path:
    if args.batch_sizes is not None:
        bad = [b for b in args.batch_sizes if b <= 0]
        if bad:
            raise LineSearchError(f"--batch-sizes: {bad} must be > 0")
        if len(set(args.batch_sizes)) < tradeoff.MIN_BATCH_SIZES_FOR_FIT:
            raise LineSearchError(f"--batch-sizes: give at least {tradeoff.MIN_BATCH_SIZES_FOR_FIT} distinct batch "
                                  "sizes (the fit of eps_opt(B) has two parameters and needs a residual)")
    if args.draws < 10:
        raise LineSearchError(f"--draws {args.draws} must be >= 10")
    if args.hvp_draws < 0 or 0 < args.hvp_draws < 8:
        raise LineSearchError(f"--hvp-draws {args.hvp_draws} must be 0 (not measured) or >= 8 (a standard error "
                              "from fewer says nothing)")
    if args.bootstrap < 10:
        raise LineSearchError(f"--bootstrap {args.bootstrap} must be >= 10 (the interval comes from it)")
    if not 0 < args.level < 1:
        raise LineSearchError(f"--level {args.level} must be between 0 and 1")
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(to_stderr)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False
    try:
        measured, skipped = measure_sweep(args.sweep_dir, args.goal, args.batch_sizes, args.draws, args.bootstrap,
                                          args.level, args.seed, args.float64, logger.info, args.hvp_draws)
    finally:
        logger.removeHandler(to_stderr)
    out_dir = Path(args.out) if args.out else Path(args.sweep_dir) / "line_search"
    out_dir.mkdir(parents=True, exist_ok=True)
    table, points = tables(measured)
    files = [out_dir / "line_search.csv", out_dir / "line_search_points.csv", out_dir / "figures" / "line_search.png"]
    table.to_csv(files[0], index=False)
    points.to_csv(files[1], index=False)
    draw_figure(measured, files[2])
    summary_path = out_dir / "summary.md"
    summary = render_summary(table, str(args.sweep_dir), files + [summary_path], out_dir, skipped)
    summary_path.write_text(summary)
    if not args.quiet:
        print(summary)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    return run_command(run, _parser().parse_args(argv), LineSearchError)


if __name__ == "__main__":
    sys.exit(main())
