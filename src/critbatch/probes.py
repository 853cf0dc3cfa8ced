"""Measurements at fixed parameters, on batches drawn for them alone: the initial loss (the
reference of the divergence rule) and the noise-scale probes at initialisation and at the goals.
No training batch is used, so which parameters are probed (a goal judged on those batches) cannot
bias what is measured, and the measurements leave training's random streams as they were.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from critbatch.batches import Batches
from critbatch.config import RunConfig, Sampling
from critbatch.curvature import curvature_batch_sizes
from critbatch.gns import NoiseScale
from critbatch.steps import Step


@contextlib.contextmanager
def untouched(model: nn.Module, device: torch.device):
    """Measurements leave no trace: the random streams (dropout) and the buffers (BatchNorm
    statistics) are as they were."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


@torch.no_grad()
def initial_mean_loss(step: Step, batches: Batches, min_examples: int) -> float:
    """Loss of the initial model over at least min_examples examples: the reference that divergence
    is judged against. (The first batch alone will not do at small B: at B=1 one example's loss can
    be ~0, and a healthy run would then look diverged.)"""
    model = step.module(0)
    count = max(1, math.ceil(min_examples / batches.batch_size))
    return sum(float(batches.task.loss(model(x), y)) for x, y in (batches.next() for _ in range(count))) / count


def probe_noise(step: Step, config: RunConfig, device, seed: int, max_batches: int, members: list[int] | None = None,
                curvature_batches: int = 0) -> tuple[list[NoiseScale], list[NoiseScale] | None]:
    """B_simple (and, on at most `curvature_batches` batches, B_noise) of the step's current
    parameters, per member, from batches drawn for it alone with replacement:
    max(B, noise_scale.probe_batch_size) examples each, until the standard error of every asked
    member's estimate is below noise_scale.probe_precision of it or `max_batches` batches are
    spent. At fixed parameters the estimates are unbiased.
    Returns (B_simple estimates, B_noise estimates or None), NoiseScales fed with every batch."""
    ns, k, task = config.noise_scale, step.micro_batches, step.task
    size = max(config.batch_size, ns.probe_batch_size)
    size -= size % k
    batches = Batches(task, size, Sampling.with_replacement, seed, device)
    simple = [NoiseScale() for _ in range(step.members)]  # plain means: the parameters do not move
    noise = [NoiseScale() for _ in range(step.members)] if curvature_batches else None
    wanted = range(step.members) if members is None else members

    def precise(estimates, draws):
        return draws >= 8 and all(estimates[i].resolved and estimates[i].b_simple_se < ns.probe_precision
                                  * estimates[i].b_simple for i in wanted)

    for draw in range(max_batches):
        if precise(simple, draw):
            break
        small, big = step.measure(*batches.next())
        for estimate, s, b in zip(simple, small.tolist(), big.tolist()):
            estimate.update(s, b, size // k, size)
    if noise is None:
        return simple, None
    # B_noise is best resolved from micro-batches about B_noise large (below it G^T H G is buried in
    # noise, above it tr(H Sigma) is): B_simple, just measured, stands in for it
    guess = np.median([simple[i].b_simple for i in wanted if simple[i].resolved] or [math.inf])
    micro = int(min(max(size // k, guess if math.isfinite(guess) else 0), ns.max_hessian_micro_batch))
    curving = Batches(task, micro * k, Sampling.with_replacement, seed + 1, device)
    for draw in range(curvature_batches):
        if precise(noise, draw):
            break
        small, big = step.curvature(*curving.next())
        for estimate, s, b in zip(noise, small.tolist(), big.tolist()):
            estimate.update(s, b, *curvature_batch_sizes(micro * k, k))
    return simple, noise

