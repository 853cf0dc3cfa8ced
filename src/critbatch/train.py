"""Train runs to their goals and record them: `train(config)` for one run, `train_pack(configs)`
for runs that differ only in their learning rate, trained as one packed model (critbatch.packed).

One loop does both: a plain run is a pack of one. It reads top to bottom in `Training.run`: every
step draws a batch (i.i.d. with replacement by default, as the theory assumes), and the step
object (PlainStep here, PackedStep in critbatch.packed) computes the full-batch gradient and
updates; every `noise_scale.every` steps it also returns the squared norms of k micro-batch
gradients that the B_simple estimator needs. Goals are judged on metrics smoothed by an EMA whose
window grows with the step count (critbatch.monitor), so the step at which a goal is crossed is
known to a few percent whatever the batch size. At geometrically spaced steps the loop logs a
curve point and asks stop_reason whether the run is over; each run's RunBook rewrites its record
now and then, so a killed job leaves a record marked "running".
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from critbatch import records
from critbatch.config import ConfigError, RunConfig, hessian_interval
from critbatch.cuda_graphs import TrainSteps, use_cuda_graphs
from critbatch.curvature import curvature_batch_sizes, curvature_forms_autograd, curvature_state
from critbatch.gns import NoiseScale, micro_batch_sq_norms, noise_micro_batches
from critbatch.micro_grads import MicroBatchNorms
from critbatch.optimizers import make_optimizer
from critbatch.monitor import GoalCrossings, NoiseMeasurements, RunBook, SmoothedMetrics, log_steps, stop_reason
from critbatch.tasks import Task

INIT_MAX_BATCHES = 200   # B_simple at initialisation: at most this many measuring batches
MAX_SNAPSHOTS = 32       # parameter copies kept for the noise probe at goals
_INITIAL_NOISE: dict[str, dict] = {}  # Training._initial_noise's measurements, by what they depend on
INIT_CURVATURE_BATCHES = 64      # B_noise at initialisation: at most this many batches (or hessian_probe_batches)
MAX_CURVATURE_MICRO_BATCH = 4096  # examples per micro-batch of a B_noise probe


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; use device=auto or device=cpu")
    return torch.device(name)


class BatchSampler:
    """Indices of each batch, on the data's device: i.i.d. with replacement, or epoch shuffling."""

    def __init__(self, size: int, batch_size: int, mode: str, generator: torch.Generator, device):
        self.size, self.batch_size, self.mode = size, batch_size, mode
        self.generator, self.device = generator, device
        self._order = torch.empty(0, dtype=torch.long, device=device)

    def next(self) -> torch.Tensor:
        if self.mode == "with_replacement":
            return torch.randint(self.size, (self.batch_size,), generator=self.generator, device=self.device)
        while self._order.numel() < self.batch_size:  # a batch may straddle two epochs
            perm = torch.randperm(self.size, generator=self.generator, device=self.device)
            self._order = torch.cat([self._order, perm])
        batch, self._order = self._order[:self.batch_size], self._order[self.batch_size:]
        return batch


class Batches:
    """The batches of a run: drawn from the task's dataset by a BatchSampler, or fresh samples
    from a streaming task; from their own seeded random stream."""

    def __init__(self, task: Task, batch_size: int, mode: str, seed: int, device):
        self.task, self.batch_size = task, batch_size
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.sampler = (None if task.dataset_size is None
                        else BatchSampler(task.dataset_size, batch_size, mode, self.generator, device))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sampler is None:
            return self.task.sample(self.batch_size, self.generator)
        index = self.sampler.next()
        return self.task.inputs.index_select(0, index), self.task.targets.index_select(0, index)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(),
                "order": None if self.sampler is None else self.sampler._order.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.sampler is not None:
            self.sampler._order = state["order"].to(self.sampler.device)


def has_batchnorm(model: nn.Module) -> bool:
    """BatchNorm couples the examples of a batch (and updates statistics in place)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    small_sq_norm: torch.Tensor | None = None  # mean |g|^2 over micro-batches of B/k
    big_sq_norm: torch.Tensor | None = None    # |g|^2 of the full batch B


def compute_gradients(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor,
                      micro_batches: int = 1, norms: MicroBatchNorms | None = None) -> StepResult:
    """Set p.grad to the batch's gradient of the mean loss; with k > 1 micro-batches, also return
    the squared norms that the noise-scale estimator needs. With `norms` (a supported
    MicroBatchNorms of this model) they come from the same single pass; else from k passes of
    B/k examples, and p.grad is the mean of the k micro-batch gradients: exactly the full-batch
    gradient for a model whose examples do not interact, and for one with BatchNorm the gradient
    of data-parallel training, each micro-batch normalised with its own statistics."""
    if micro_batches <= 1 or norms is not None:
        with norms.recording() if micro_batches > 1 else contextlib.nullcontext():
            output = model(x)
            loss = task.loss(output, y)
            loss.backward()
        result = StepResult(loss.detach(), task.metrics(output, y, loss))
        if micro_batches > 1:
            result.small_sq_norm, result.big_sq_norm = norms.sq_norms(micro_batches)
        return result
    params = [p for p in model.parameters() if p.requires_grad]
    micro_grads, outputs, losses = [], [], []
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        output = model(xs)
        loss = task.loss(output, ys)
        micro_grads.append(torch.autograd.grad(loss, params))
        outputs.append(output.detach())
        losses.append(loss.detach())
    for p, *grads in zip(params, *micro_grads):
        p.grad = torch.stack(grads).mean(0)
    loss = torch.stack(losses).mean()
    small, big = micro_batch_sq_norms(micro_grads)
    return StepResult(loss, task.metrics(torch.cat(outputs), y, loss), small, big)


class PlainStep(TrainSteps):
    """One model's training step (a pack of one): gradients, with the noise-scale norms when
    measuring, then the optimizer's update; replayed from CUDA graphs when `graphs` is on.
    Returns (metrics, norms): per-member tensors of shape [1], norms None on plain steps."""

    def __init__(self, config: RunConfig, task: Task, device, micro_batches: int, graphs: bool):
        self.model = task.make_model().to(device).train()
        self.task, self.members = task, 1
        self.optimizer = make_optimizer(self.model.parameters(), config.optimizer, capturable=graphs)
        norms = MicroBatchNorms(self.model)  # measuring steps in one pass where the model's layers allow
        self.norms = norms if norms.supported else None
        self.noise_measurement = None if micro_batches == 1 else "one pass" if self.norms else f"{micro_batches} passes"
        super().__init__(micro_batches, graphs)

    def _step(self, x, y, micro_batches):
        self.optimizer.zero_grad(set_to_none=True)
        result = compute_gradients(self.model, self.task, x, y, micro_batches, self.norms)
        self.optimizer.step()
        norms = None if micro_batches == 1 else (result.small_sq_norm.reshape(1), result.big_sq_norm.reshape(1))
        return {name: value.reshape(1) for name, value in result.metrics.items()}, norms

    def measure(self, x, y, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise-scale norms on this batch, without an update."""
        self.optimizer.zero_grad(set_to_none=True)
        result = compute_gradients(self.model, self.task, x, y, micro_batches, self.norms)
        self.optimizer.zero_grad(set_to_none=True)
        return result.small_sq_norm.reshape(1), result.big_sq_norm.reshape(1)

    def module(self, member: int) -> nn.Module:
        return self.model

    def curvature(self, x, y, micro_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The curvature forms of B_noise on this batch (critbatch.curvature), without an update."""
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # dropout here leaves training's stream
            small, big = curvature_forms_autograd(self.model, self.task.loss, x, y, micro_batches)
        return small.reshape(1), big.reshape(1)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the parameters (for the noise probe at a goal's crossing)."""
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    @contextlib.contextmanager
    def swapped(self, snapshot: dict[str, torch.Tensor]):
        """The parameters of `snapshot` in place of the current ones, in the same tensors."""
        current = self.snapshot()
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    params[name].copy_(value)

    def keep(self, members: torch.Tensor) -> None:
        """A pack of one never shrinks: it ends with its run."""

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


@torch.no_grad()
def initial_mean_loss(step, batches: Batches, min_examples: int) -> float:
    """Loss of the initial model over at least min_examples examples: the reference that divergence
    is judged against. (The first batch alone will not do at small B: at B=1 one example's loss can
    be ~0, and a healthy run would then look diverged.)"""
    model = step.module(0)
    count = max(1, math.ceil(min_examples / batches.batch_size))
    return sum(float(batches.task.loss(model(x), y)) for x, y in (batches.next() for _ in range(count))) / count


def probe_noise(step, task: Task, config: RunConfig, device, micro_batches: int, seed: int, max_batches: int,
                members: list[int] | None = None, curvature_batches: int = 0) -> tuple[list[NoiseScale], list | None]:
    """B_simple (and, on at most `curvature_batches` batches, B_noise) of the step's current
    parameters, per member, from batches drawn for it alone with replacement:
    max(B, noise_scale.probe_batch_size) examples each, until the standard error of every asked
    member's estimate is below noise_scale.probe_precision of it or `max_batches` batches are
    spent. At fixed parameters the estimates are unbiased; no training batch is used, so the choice
    of the parameters (a goal judged on those batches) cannot bias them.
    Returns (B_simple estimates, B_noise estimates or None), NoiseScales fed with every batch."""
    ns, k = config.noise_scale, micro_batches
    size = max(config.batch_size, ns.probe_batch_size)
    size -= size % k
    batches = Batches(task, size, "with_replacement", seed, device)
    simple = [NoiseScale() for _ in range(step.members)]  # plain means: the parameters do not move
    noise = [NoiseScale() for _ in range(step.members)] if curvature_batches else None
    wanted = range(step.members) if members is None else members

    def precise(estimates, draws):
        return draws >= 8 and all(estimates[i].resolved and estimates[i].b_simple_se < ns.probe_precision
                                  * estimates[i].b_simple for i in wanted)

    for draw in range(max_batches):
        if precise(simple, draw):
            break
        small, big = step.measure(*batches.next(), k)
        for estimate, s, b in zip(simple, small.tolist(), big.tolist()):
            estimate.update(s, b, size // k, size)
    if noise is None:
        return simple, None
    # B_noise is best resolved from micro-batches about B_noise large (below it G^T H G is buried in
    # noise, above it tr(H Sigma) is): B_simple, just measured, stands in for it
    guess = np.median([simple[i].b_simple for i in wanted if simple[i].resolved] or [math.inf])
    micro = int(min(max(size // k, guess if math.isfinite(guess) else 0), MAX_CURVATURE_MICRO_BATCH))
    curving = Batches(task, micro * k, "with_replacement", seed + 1, device)
    for draw in range(curvature_batches):
        if precise(noise, draw):
            break
        small, big = step.curvature(*curving.next(), k)
        for estimate, s, b in zip(noise, small.tolist(), big.tolist()):
            estimate.update(s, b, *curvature_batch_sizes(micro * k, k))
    return simple, noise


@contextlib.contextmanager
def untouched(model: nn.Module, device: torch.device):
    """Measurements before training leave no trace: the random streams (dropout) and the buffers
    (BatchNorm statistics) are as they were."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


class Interrupted(Exception):
    """Training stopped at a step boundary because a signal asked it to (Interrupt); its state is
    in the checkpoint, from which the run resumes."""


class Interrupt:
    """A flag that signal handlers set and the training loop reads at the next step boundary, where
    its state is consistent: a handler that saved or stopped mid-step would leave the parameters
    updated and the step count not. `handling(signals)` installs such handlers for a block."""

    def __init__(self):
        self.requested: str | None = None  # the name of the signal received

    def request(self, signum, frame=None) -> None:
        self.requested = signal.Signals(signum).name

    @contextlib.contextmanager
    def handling(self, signals):
        previous = {sig: signal.signal(sig, self.request) for sig in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


CHECKPOINT_FILE = "checkpoint.pt"
# 2: B_noise's path average keeps its variance (a version-1 state cannot resume it); 3: so does
# B_simple's, from each measurement's own |G|^2 (a version-2 state holds the window's)
CHECKPOINT_VERSION = 3


class Training:
    """The runs of one pack (one run, or runs that differ only in lr) from set-up to their records.

    `checkpoint_dir`: where the whole training state is saved every log.checkpoint_seconds and
    when `interrupt` is requested (and from where `resume` came); a resumed run continues exactly
    as its uninterrupted twin would have."""

    def __init__(self, configs: list[RunConfig], task: Task, books: list[RunBook], packed: bool,
                 checkpoint_dir: str | Path | None = None, interrupt: Interrupt | None = None,
                 resume: dict | None = None):
        setup_start = time.perf_counter()
        config = self.config = configs[0]
        self.packed = packed
        self.task, self.books = task, list(books)
        self.device = device = pick_device(config.device)
        B, ns, smoothing = config.batch_size, config.noise_scale, config.smoothing
        graphs = use_cuda_graphs(config.cuda_graphs, device, B)
        torch.manual_seed(config.seed)
        task.load(device)
        self.k = noise_micro_batches(B, ns.micro_batches) if ns.enabled else 1
        if packed:
            from critbatch.packed import PackedStep
            self.step_fn = PackedStep(configs, task, device, self.k, graphs)
        else:
            self.step_fn = PlainStep(config, task, device, self.k, graphs)
        self.batches = Batches(task, B, config.sampling, config.seed, device)
        members = len(configs)
        self.smoothed = SmoothedMetrics(task.batch_metrics, members, B, smoothing.relative_window,
                                        smoothing.min_examples, device)
        self.evaluated = SmoothedMetrics(task.eval_metrics, members, B, smoothing.relative_window,
                                         smoothing.min_examples, device)
        metric = config.goals.metric
        self.goal_source = self.evaluated if metric in task.eval_metrics else self.smoothed
        self.goal_index = self.goal_source.names.index(metric.removeprefix("train_") if metric.startswith("train_")
                                                       and self.goal_source is self.smoothed else metric)
        self.goals = GoalCrossings(config.goals.thresholds, members, device)
        # the curve column of the smoothed goal metric, which the no-progress rule watches
        self.goal_key = f"smoothed_{metric}" if self.goal_source is self.evaluated else metric
        self.noise = NoiseMeasurements(B // self.k, B, ns.every, ns.relative_window, ns.min_examples / B)
        # B_noise (critbatch.curvature): on a measuring step's batch, at most every `every` x hessian_every steps
        self.hessian_every = hessian_interval(config, task) if ns.enabled else 0
        self.curving = self.k > 1 and self.hessian_every > 0
        # ... or on batches of its own of k x hessian_micro_batch examples (their own random stream)
        curvature_size = B if ns.hessian_micro_batch is None else ns.hessian_micro_batch * max(self.k, 3)
        self.curvature_batches = (None if ns.hessian_micro_batch is None or not self.curving else
                                  Batches(task, curvature_size, "with_replacement", config.seed + 31_337, device))
        self.curvature = NoiseMeasurements(*curvature_batch_sizes(curvature_size, max(self.k, 3)), ns.every,
                                           ns.relative_window, ns.min_examples / B, into="add_curvature")
        self.last_curvature: int | None = None  # the step of the last B_noise measurement
        self.step = 0
        self.last_evaluation: int | None = None   # the step of the latest evaluation
        self.last_scheduled: int | None = None    # ... and of the latest one on the evaluation schedule
        self.latest_evaluation: list[dict] = [{} for _ in configs]
        self.next_log, self.next_eval = 0, 0 if self.goal_source is self.evaluated else -1
        self.elapsed = 0.0  # seconds of training so far
        # recent parameters, so that B_simple at a goal is probed at the parameters that crossed it
        self.probing = self.k > 1 and ns.probe_batches > 0
        self.snapshots: list[tuple[int, dict]] = []
        self.next_snapshot = 0
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.interrupt, self._last_checkpoint = interrupt, time.perf_counter()
        if resume is not None:
            self.load_state_dict(resume)
        else:
            self._measure_start(packed, graphs, setup_start)
        self.log_schedule = log_steps(config.log.relative_interval, start=self.next_log)
        self.eval_schedule = log_steps(smoothing.eval_relative_interval, start=self.next_eval) \
            if self.goal_source is self.evaluated else None

    def _measure_start(self, packed: bool, graphs: bool, setup_start: float) -> None:
        """The initial model's loss (the reference for divergence) and noise scale, into every book."""
        config, task, device, members = self.config, self.task, self.device, len(self.books)
        B, smoothing = config.batch_size, config.smoothing
        with untouched(self.step_fn.module(0), device):
            initial_loss = initial_mean_loss(self.step_fn, Batches(task, B, "with_replacement", config.seed + 7_919,
                                                                   device), smoothing.min_examples)
            initial_noise = self._initial_noise() if self.k > 1 else {}
        for book in self.books:
            book.started(initial_loss, initial_noise, device=str(device), path="packed" if packed else "plain",
                         packed_members=members, noise_micro_batches=self.k, cuda_graphs=graphs,
                         noise_measurement=self.step_fn.noise_measurement, **task.fingerprint(),
                         setup_seconds=time.perf_counter() - setup_start)

    def run(self) -> None:
        config, start = self.config, time.perf_counter() - self.elapsed
        while True:
            if self.interrupt is not None and self.interrupt.requested:  # a step boundary: state consistent
                self.elapsed = time.perf_counter() - start
                self.save_checkpoint()
                raise Interrupted(f"{self.interrupt.requested} at step {self.step}; the state is saved in "
                                  f"{self.checkpoint_path} and a relaunch resumes from it")
            # ---- evaluated metrics (a goal's, densely; the curve's, at logged steps) ----
            if self.step in (self.next_eval, self.next_log):
                self.evaluate()
            # ---- at geometrically spaced steps: curve point, goals, stop or go on ----
            if self.step == self.next_log or self.step >= self.books[0].max_steps:
                self.elapsed = time.perf_counter() - start
                if not self.log():
                    return
            if self.probing and self.step >= self.next_snapshot:
                self.take_snapshot()
            # ---- one training step ----
            x, y = self.batches.next()
            measure = self.k > 1 and self.noise.due(self.step)
            if measure and self.curvature_due():
                self.curvature.add(*self.curvature_forms(x, y), self.step)  # before the update
                self.last_curvature = self.step
            metrics, norms = self.step_fn(x, y, measure)
            if measure:
                self.noise.add(*norms, self.step)
            self.smoothed.update(metrics, self.step)
            if self.goal_source is self.smoothed and self.smoothed.ready:
                self.goals.update(self.smoothed.values[:, self.goal_index], self.smoothed.center_step)
            self.step += 1
            if config.budget.max_seconds is not None and self.step % 64 == 0 \
                    and time.perf_counter() - start >= config.budget.max_seconds:
                self.next_log = self.step  # log and stop at the top of the loop

    def curvature_forms(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """B_noise's two quadratic forms on the training batch, or averaged over hessian_draws
        batches of their own (each pair is unbiased, so their mean is)."""
        if self.curvature_batches is None:
            return self.step_fn.curvature(x, y, self.k)
        draws = self.config.noise_scale.hessian_draws
        forms = [self.step_fn.curvature(*self.curvature_batches.next(), self.k) for _ in range(draws)]
        return sum(f[0] for f in forms) / draws, sum(f[1] for f in forms) / draws

    def curvature_due(self) -> bool:
        ns = self.config.noise_scale
        return self.curving and (self.last_curvature is None
                                 or self.step - self.last_curvature >= ns.every * self.hessian_every)

    def evaluate(self) -> None:
        """Evaluate every member's eval metrics at this step. On the steps of the evaluation
        schedule (when a goal is evaluated) they are smoothed and the goals judged on them; at
        other logged steps they are only recorded, so the logging interval never moves a goal."""
        if not self.task.eval_metrics or self.last_evaluation == self.step:
            return
        values = [self.task.evaluate(self.step_fn.module(i)) for i in range(len(self.books))]
        self.latest_evaluation, self.last_evaluation = values, self.step
        if self.step != self.next_eval:
            return
        gap = self.step - self.last_scheduled if self.last_scheduled is not None else 1
        self.evaluated.update({name: torch.tensor([v[name] for v in values]) for name in self.task.eval_metrics},
                              self.step, gap)
        self.last_scheduled = self.step
        if self.evaluated.ready:
            self.goals.update(self.evaluated.values[:, self.goal_index], self.evaluated.center_step)
        while self.next_eval <= self.step:
            self.next_eval = next(self.eval_schedule)

    def log(self) -> bool:
        """A curve point for every member; finished members leave the pack. False when none is left."""
        step, now = self.step, self.elapsed
        self.noise.flush(self.books)
        self.curvature.flush(self.books)
        crossed = self.goals.crossed_at.tolist()
        evaluated = self.latest_evaluation
        smoothed_eval = self.evaluated.member_dicts("smoothed_") if self.goal_source is self.evaluated \
            else [{}] * len(self.books)
        newly = [[j for j, (goal, at) in enumerate(zip(book.record["goals"], crossed[i])) if not goal["reached"] and at >= 0]
                 for i, book in enumerate(self.books)]
        for i, (book, metrics) in enumerate(zip(self.books, self.smoothed.member_dicts("train_"))):
            if step == 0:
                metrics = {key: math.nan for key in metrics}
            if self.step_fn.failure:
                book.record["summary"].update(cuda_graphs=False, cuda_graph_failure=self.step_fn.failure)
            book.log(step, now, {**metrics, **evaluated[i], **smoothed_eval[i]}, crossed[i])
        self.probe_goals(newly, crossed)
        for i, book in enumerate(self.books):
            outcome = stop_reason(book, step, now, self.goal_key)
            if outcome is not None:
                book.finish(*outcome)
            else:
                book.save_now_and_then()
        keep = [i for i, book in enumerate(self.books) if not book.finished]
        if len(keep) < len(self.books) and keep:  # finished and diverged members leave the pack
            members = torch.tensor(keep, device=self.device)
            for part in (self.step_fn, self.smoothed, self.evaluated, self.goals, self.noise, self.curvature):
                part.keep(members)
            self.books = [self.books[i] for i in keep]
            self.latest_evaluation = [self.latest_evaluation[i] for i in keep]
            if self.packed:
                self.snapshots = [(at, {name: v[members] for name, v in snap.items()}) for at, snap in self.snapshots]
            self.step_fn.reset()
        while self.next_log <= step:
            self.next_log = next(self.log_schedule)
        if keep and time.perf_counter() - self._last_checkpoint > self.config.log.checkpoint_seconds:
            self.save_checkpoint()
        return bool(keep)

    def _initial_noise(self) -> dict:
        """B_simple (and B_noise) at initialisation, for the summary: measured once per process for
        every run that starts from the same parameters (same task, seed and probe settings)."""
        config = self.config
        key = json.dumps([config.task, config.seed, dataclasses.asdict(config.noise_scale), self.k,
                          max(config.batch_size, config.noise_scale.probe_batch_size), str(self.device)],
                         sort_keys=True, default=str)
        if key not in _INITIAL_NOISE:
            simple, curvature = probe_noise(
                self.step_fn, self.task, config, self.device, self.k, config.seed + 104_729, INIT_MAX_BATCHES,
                members=[0], curvature_batches=max(INIT_CURVATURE_BATCHES, config.noise_scale.hessian_probe_batches)
                if self.curving else 0)
            noise = simple[0]  # every member starts from these parameters
            measured = {"b_simple_init": noise.b_simple, "b_simple_init_se": noise.b_simple_se,
                        "grad_sq_norm_init": noise.grad_sq_norm, "trace_sigma_init": noise.trace_sigma,
                        "noise_init_batches": noise.updates}
            if curvature is not None:
                measured.update({f"{key}_init": value for key, value in curvature_state(curvature[0]).items()
                                 if key in ("b_noise", "b_noise_se", "grad_h_grad", "trace_h_sigma",
                                            "curvature_updates")})
            _INITIAL_NOISE[key] = measured
        return dict(_INITIAL_NOISE[key])

    # ---- B_simple at a goal: probed at the parameters that crossed it ----

    def take_snapshot(self) -> None:
        """Keep the parameters now, and those of the recent past in which a goal's crossing can lie
        (its smoothing window behind the step where it is noticed): for the last 10% of the steps
        (or two of the smallest windows), 1% of the steps apart, at most MAX_SNAPSHOTS of them."""
        step, min_window = self.step, self.config.smoothing.min_examples / self.config.batch_size
        self.snapshots.append((step, self.step_fn.snapshot()))
        reach = max(0.1 * step, 2 * min_window, 8)
        self.snapshots = [(at, snap) for at, snap in self.snapshots if at >= step - reach]
        self.next_snapshot = step + max(1, int(0.01 * step), int(reach / MAX_SNAPSHOTS))

    def probe_goals(self, newly: list[list[int]], crossed: list[list[float]]) -> None:
        """For every goal a member newly crossed: B_simple of the kept parameters nearest its
        crossing step, probed with batches of its own (probe_noise), into the member's book."""
        if not self.probing or not any(newly) or not self.snapshots:
            return
        wanted: dict[int, list[tuple[int, int]]] = {}  # snapshot index -> (member, goal)
        for i, goals in enumerate(newly):
            for j in goals:
                nearest = min(range(len(self.snapshots)), key=lambda n: abs(self.snapshots[n][0] - crossed[i][j]))
                wanted.setdefault(nearest, []).append((i, j))
        ns = self.config.noise_scale
        with untouched(self.step_fn.module(0), self.device):
            for index, pairs in wanted.items():
                at, snapshot = self.snapshots[index]
                with self.step_fn.swapped(snapshot):
                    simple, curvature = probe_noise(self.step_fn, self.task, self.config, self.device, self.k,
                                                    self.config.seed + 104_729 + at, ns.probe_batches,
                                                    members=sorted({i for i, _ in pairs}),
                                                    curvature_batches=ns.hessian_probe_batches if self.curving else 0)
                for i, j in pairs:
                    state = simple[i].state()
                    if curvature is not None:
                        state.update(curvature_state(curvature[i]))
                    self.books[i].goal_noise(j, state, probed_at=at)

    # ---- checkpoints: the whole state, so that a resumed run continues exactly as it would have ----

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> None:
        self._last_checkpoint = time.perf_counter()
        if self.checkpoint_path is None:
            return
        self.noise.flush(self.books)  # measurements pending on the device go into the books first
        self.curvature.flush(self.books)
        state = self.state_dict()
        # Serialised in memory first: torch.save writing to a full disk fails with an opaque
        # "[enforce fail at inline_container.cc] unexpected pos", a plain write says ENOSPC.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        records.write_atomically(self.checkpoint_path, buffer.getbuffer())
        for book in self.books:  # the records say how far the checkpoint got
            book.save()

    def state_dict(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "version": CHECKPOINT_VERSION, "members": [book.record["run_id"] for book in self.books],
            "packed": self.packed,
            "step": self.step, "next_log": self.next_log, "next_eval": self.next_eval, "elapsed": self.elapsed,
            "last_evaluation": self.last_evaluation, "last_scheduled": self.last_scheduled,
            "latest_evaluation": self.latest_evaluation,
            "rng": {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None},
            "batches": self.batches.state_dict(),
            "curvature_batches": None if self.curvature_batches is None else self.curvature_batches.state_dict(),
            "step_fn": self.step_fn.state_dict(), "smoothed": self.smoothed.state_dict(),
            "evaluated": self.evaluated.state_dict(), "goals": self.goals.state_dict(),
            "noise": self.noise.state_dict(), "books": [book.state_dict() for book in self.books],
            "curvature": self.curvature.state_dict(), "last_curvature": self.last_curvature,
            "snapshots": [(at, {k: v.cpu() for k, v in snap.items()}) for at, snap in self.snapshots],
            "next_snapshot": self.next_snapshot,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("step", "next_log", "next_eval", "elapsed", "last_evaluation", "last_scheduled",
                    "latest_evaluation"):
            setattr(self, key, state[key])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.batches.load_state_dict(state["batches"])
        if self.curvature_batches is not None:
            self.curvature_batches.load_state_dict(state["curvature_batches"])
        self.step_fn.load_state_dict(state["step_fn"])
        self.step_fn.reset()  # graphs captured on other tensors
        for part in ("smoothed", "evaluated", "goals", "noise", "curvature"):
            getattr(self, part).load_state_dict(state[part])
        self.last_curvature = state["last_curvature"]
        self.snapshots = [(at, {k: v.to(self.device) for k, v in snap.items()}) for at, snap in state["snapshots"]]
        self.next_snapshot = state["next_snapshot"]
        for book, book_state in zip(self.books, state["books"]):
            book.load_state_dict(book_state)
            book.record["summary"].setdefault("resumed_at", []).append(self.step)


def find_checkpoint(configs: list[RunConfig], out_dirs: list) -> tuple[Path | None, dict | None]:
    """The checkpoint of exactly these runs (the members still training when it was saved), if any
    of their directories holds one: (its directory, its state). A checkpoint of another set of runs
    (the grid was regrouped) is not used, and training starts afresh."""
    ids = [records.run_id(c.to_dict()) for c in configs]
    for out_dir in out_dirs:
        path = None if out_dir is None else Path(out_dir) / CHECKPOINT_FILE
        if path is None or not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torn or foreign: training starts afresh, the record says why
            warnings.warn(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); starting afresh")
            continue
        if state.get("version") == CHECKPOINT_VERSION and state.get("members") == ids and "packed" in state:
            return path.parent, state
    return None, None


def train_pack(configs: list[RunConfig | dict], out_dirs: list[str | Path | None], packed: bool | None = None,
               guard=None, interrupt: Interrupt | None = None) -> list[dict]:
    """Train runs that differ at most in their learning rate together and return their records
    (each also written to out_dir/record.json). One run trains as a plain model; several as one
    packed model (critbatch.packed), unless `packed=False` (then they must be one run).

    The whole state is saved to out_dir/checkpoint.pt (the first run's) every
    log.checkpoint_seconds and when `interrupt` is requested (training then raises Interrupted);
    called again with the same runs, training resumes from it. `guard`: see RunBook.save."""
    configs = [RunConfig.from_dict(c) if isinstance(c, dict) else c for c in configs]
    resume_dir, state = find_checkpoint(configs, out_dirs)
    if state is not None:  # a pack that shrank to one member resumes packed, as it was saved
        packed = state["packed"]
    packed = len(configs) > 1 if packed is None else packed
    if len(configs) > 1 and not packed:
        raise ConfigError("train_pack: several runs train together only packed (packed=True)")
    if packed:
        from critbatch.packed import check_packable
        check_packable(configs)
    task = configs[0].validate()
    books = [RunBook(c, d, guard=guard) for c, d in zip(configs, out_dirs)]  # guard: see RunBook.save
    checkpoint_dir = resume_dir or next((d for d in out_dirs if d is not None), None)
    try:
        training = Training(configs, task, books, packed, checkpoint_dir, interrupt, resume=state)
        training.run()
    except Interrupted:
        raise
    except Exception as exc:
        for book in books:
            if not book.finished:
                book.fail(exc)
        raise
    for out_dir in out_dirs:  # every run is over: nothing to resume
        if out_dir is not None:
            (Path(out_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
    return [book.record for book in books]


def train(config: RunConfig | dict, out_dir: str | Path | None = None) -> dict:
    """Run one configuration to its goals and return its record (also written to out_dir/record.json).

    Args:
        config: a RunConfig, or the nested dict of its settings (defaults fill the rest).
        out_dir: where record.json goes (None: nowhere).

    Returns:
        The record (docs/records.md): status, per-goal steps and noise scale, curve, summary.

    >>> record = train({"task": {"name": "digits", "hidden": 32}, "batch_size": 64, "device": "cpu",
    ...                 "goals": {"metric": "train_error", "thresholds": [0.5, 0.2]}})
    >>> record["status"], [goal["reached"] for goal in record["goals"]]
    ('completed', [True, True])
    """
    return train_pack([config], [out_dir], packed=False)[0]
