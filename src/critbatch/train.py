"""Train runs to their goals and record them: `train(config)` for one run, `train_pack(configs)`
for runs that differ only in their learning rate, trained together as one packed model.

One loop does both (a plain run is a pack of one), and reads top to bottom in `Training.run`:
every step draws a batch (critbatch.batches) and calls the step (critbatch.steps), which updates
the parameters and, every `noise_scale.every` steps, also returns the squared norms of k
micro-batch gradients that the B_simple estimator needs. Goals are judged on metrics smoothed by
an EMA whose window grows with the step count (critbatch.monitor), so the step at which a goal is
crossed is known to a few percent whatever the batch size. At geometrically spaced steps the loop
logs a curve point and asks stop_reason whether the run is over; each run's RunBook rewrites its
record now and then, so a killed job leaves a record marked "running".

One run may train on several processes (`ranks`, critbatch.distributed): every rank runs this
loop on the same batches, its step trains on its slice, and what one process alone would decide
(stop, checkpoint, interrupt) is decided once for all; only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import math
import signal
import time
import warnings
from pathlib import Path

import torch

from critbatch import records
from critbatch.batches import Batches
from critbatch.branches import finish_branch, keep_trunk_states, pending_state_step, start_from_trunk
from critbatch.config import SEED_OFFSETS, ConfigError, Device, RunConfig, Sampling, curvature_unsupported
from critbatch.cuda_graphs import use_cuda_graphs
from critbatch.distributed import RankFailure, Ranks, check_data_parallel, from_collective
from critbatch.curvature import curvature_batch_sizes, curvature_state
from critbatch.gns import noise_micro_batches
from critbatch.monitor import GoalCrossings, NoiseMeasurements, RunBook, SmoothedMetrics, log_steps, stop_reason
from critbatch.packed import check_packable
from critbatch.probes import initial_mean_loss, probe_noise, untouched
from critbatch.steps import make_step
from critbatch.tasks import Task, check_fingerprint

CHECKPOINT_FILE = "checkpoint.pt"
# 4: the step's state as critbatch.steps keeps it, the books' typed goals and summary, the data's
# fingerprint; 5: the path averages keep each measurement's own noise. A checkpoint of another
# version is not resumed: the run starts afresh.
CHECKPOINT_VERSION = 5
# B_simple (and B_noise) at initialisation, measured once per process for every run that starts
# from the same parameters (same task, seed and probe settings)
_INITIAL_NOISE: dict[str, dict] = {}


def pick_device(name: Device | str) -> torch.device:
    name = Device(name)
    if name is Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name is Device.cuda and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; use device=auto or device=cpu")
    return torch.device(name.value)


class Interrupted(Exception):
    """Training stopped at a step boundary because a signal asked it to (Interrupt); its state is
    in the checkpoint, from which the run resumes, and its record says "interrupted"."""


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


class Training:
    """The runs of one pack (one run, or runs that differ only in lr) from set-up to their records.

    `checkpoint_dir`: where the whole training state is saved every log.checkpoint_seconds and
    when `interrupt` is requested (and from where `resume` came); a resumed run continues exactly
    as its uninterrupted twin would have. `ranks`: the processes that train it together (every
    rank constructs its Training; rank 0 saves the checkpoints)."""

    def __init__(self, configs: list[RunConfig], task: Task, books: list[RunBook], packed: bool,
                 checkpoint_dir: str | Path | None = None, interrupt: Interrupt | None = None,
                 resume: dict | None = None, ranks: Ranks | None = None):
        setup_start = time.perf_counter()
        config = self.config = configs[0]
        self.packed, self.task, self.books = packed, task, list(books)
        self.ranks = ranks = ranks or Ranks.single()
        self.device = device = pick_device(config.device)
        B, ns, smoothing = config.batch_size, config.noise_scale, config.smoothing
        graphs = use_cuda_graphs(config.cuda_graphs, device, B) and ranks.size == 1
        torch.manual_seed(config.seed)
        task.load(device)
        self.k = noise_micro_batches(B, ns.micro_batches) if ns.enabled else 1
        self.train_step = make_step(configs, task, device, self.k, packed, graphs, ranks)
        if not ranks.main:  # dropout: a stream of its own per rank (rank 0 keeps the single process's)
            torch.manual_seed(config.seed + SEED_OFFSETS["ranks"] + ranks.rank)
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
        self.noise = NoiseMeasurements(B // self.k, B, ns.every, ns.relative_window, ns.min_examples / B,
                                       ns.min_per_window)
        # B_noise (critbatch.curvature): on a measuring step's batch, at most every `every` x hessian_every
        # steps, where it can be measured ...
        self.b_noise_skipped = curvature_unsupported(config, task) if ns.enabled and ns.hessian_every else None
        self.curving = self.k > 1 and ns.hessian_every > 0 and self.b_noise_skipped is None
        # ... or on batches of their own of k x hessian_micro_batch examples (their own random stream)
        curvature_size = B if ns.hessian_micro_batch is None else ns.hessian_micro_batch * max(self.k, 3)
        self.curvature_batches = (None if ns.hessian_micro_batch is None or not self.curving else
                                  Batches(task, curvature_size, Sampling.with_replacement,
                                          config.seed + SEED_OFFSETS["hessian_batches"], device))
        self.curvature = NoiseMeasurements(*curvature_batch_sizes(curvature_size, max(self.k, 3)), ns.every,
                                           ns.relative_window, ns.min_examples / B, ns.min_per_window)
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
            if config.branch is not None:  # a branch run starts where its trunk was
                start_from_trunk(self)
            self._measure_start(packed, graphs, setup_start)
        self.log_schedule = log_steps(config.log.relative_interval, start=self.next_log)
        self.eval_schedule = log_steps(smoothing.eval_relative_interval, start=self.next_eval) \
            if self.goal_source is self.evaluated else None

    def _measure_start(self, packed: bool, graphs: bool, setup_start: float) -> None:
        """The initial model's loss (the reference for divergence) and noise scale, into every book."""
        config, task, device, members = self.config, self.task, self.device, len(self.books)
        B, smoothing = config.batch_size, config.smoothing
        with untouched(self.train_step.module(0), device):
            initial_loss = initial_mean_loss(
                self.train_step, Batches(task, B, Sampling.with_replacement, config.seed + SEED_OFFSETS["initial_loss"],
                                         device), smoothing.min_examples)
            initial_noise = self._initial_noise() if self.k > 1 else {}
        for book in self.books:
            book.started(initial_loss, initial_noise, device=str(device), path="packed" if packed else "plain",
                         packed_members=members, noise_micro_batches=self.k, cuda_graphs=graphs,
                         noise_measurement=getattr(self.train_step.noise_measurement, "value", None),
                         b_noise_skipped=self.b_noise_skipped, data=task.fingerprint(), processes=self.ranks.size,
                         setup_seconds=time.perf_counter() - setup_start)

    def run(self) -> None:
        config, start = self.config, time.perf_counter() - self.elapsed
        while True:
            if self.interrupt is not None and self.interrupted():  # a step boundary: state consistent
                self.elapsed = time.perf_counter() - start
                self.stop_interrupted()
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
                small, big, form_cov = self.curvature_forms(x, y)  # before the update
                self.curvature.add(small, big, self.step, form_cov)
                self.last_curvature = self.step
            metrics, norms = self.train_step(x, y, measure)
            if measure:
                self.noise.add(*norms, self.step)
            self.smoothed.update(metrics, self.step)
            if self.goal_source is self.smoothed and self.smoothed.ready:
                self.goals.update(self.smoothed.values[:, self.goal_index], self.smoothed.center_step)
            self.step += 1
            if config.budget.max_seconds is not None and self.step % 64 == 0 \
                    and self.ranks.from_main(time.perf_counter() - start >= config.budget.max_seconds):
                self.next_log = self.step  # log and stop at the top of the loop

    def interrupted(self) -> bool:
        """A signal asked training to stop (on any rank: then every rank knows its name)."""
        signal_name = self.ranks.agreed_signal(self.interrupt.requested, self.step)
        if signal_name and not self.interrupt.requested:
            self.interrupt.requested = signal_name
        return bool(signal_name)

    def stop_interrupted(self):
        """Save the state, mark the runs interrupted and stop (Interrupted)."""
        self.save_checkpoint()
        signal_name = self.interrupt.requested
        for book in self.books:
            book.finish(records.Status.interrupted, f"{signal_name} at step {self.step}; a relaunch resumes it")
        raise Interrupted(f"{signal_name} at step {self.step}; the state is saved in {self.checkpoint_path} and "
                          "a relaunch resumes from it")

    def curvature_forms(self, x, y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """B_noise's two quadratic forms on the training batch, or averaged over hessian_draws
        batches of their own (each pair is unbiased, so their mean is), with the covariance of
        that mean [3, members] from the draws' spread (None from one draw): the path average
        corrects its rates to second order with it (monitor.IdealSteps)."""
        if self.curvature_batches is None:
            return (*self.train_step.curvature(x, y), None)
        draws = self.config.noise_scale.hessian_draws
        forms = [torch.stack(self.train_step.curvature(*self.curvature_batches.next())) for _ in range(draws)]
        forms = torch.stack(forms)  # [draws, 2, members]
        if draws == 1:
            return forms[0, 0], forms[0, 1], None
        mean = forms.mean(0)
        small, big = (forms - mean).unbind(1)
        # the mean's covariance: the draws' sample covariance over their number
        form_cov = torch.stack([small * small, big * big, small * big]).sum(1) / ((draws - 1) * draws)
        return mean[0], mean[1], form_cov

    def curvature_due(self) -> bool:
        ns = self.config.noise_scale
        return self.curving and (self.last_curvature is None
                                 or self.step - self.last_curvature >= ns.every * ns.hessian_every)

    def evaluate(self) -> None:
        """Evaluate every member's eval metrics at this step. On the steps of the evaluation
        schedule (when a goal is evaluated) they are smoothed and the goals judged on them; at
        other logged steps they are only recorded, so the logging interval never moves a goal."""
        if not self.task.eval_metrics or self.last_evaluation == self.step:
            return
        values = [self.task.evaluate(self.train_step.module(i)) for i in range(len(self.books))]
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

    def flush_measurements(self) -> None:
        """Measurements pending on the device go into the books."""
        self.noise.flush([book.add_noise for book in self.books])
        self.curvature.flush([book.add_curvature for book in self.books])

    def log(self) -> bool:
        """A curve point for every member; finished members leave the pack. False when none is left."""
        step, now = self.step, self.elapsed
        self.flush_measurements()
        crossed = self.goals.crossed_at.tolist()
        smoothed_eval = self.evaluated.member_dicts("smoothed_") if self.goal_source is self.evaluated \
            else [{}] * len(self.books)
        newly = [[j for j, (goal, at) in enumerate(zip(book.goals, crossed[i])) if not goal.reached and at >= 0]
                 for i, book in enumerate(self.books)]
        for i, (book, metrics) in enumerate(zip(self.books, self.smoothed.member_dicts("train_"))):
            if step == 0:
                metrics = {key: math.nan for key in metrics}
            if self.train_step.failure:
                book.note(cuda_graphs=False, cuda_graph_failure=self.train_step.failure)
            book.log(step, now, {**metrics, **self.latest_evaluation[i], **smoothed_eval[i]}, crossed[i])
        self.probe_goals(newly, crossed)
        keep_trunk_states(self, newly)
        outcomes = [stop_reason(book, step, now, self.goal_key) for book in self.books]
        # rank 0's clock decides the time budget and the checkpoints, for every rank
        outcomes, checkpoint_due = self.ranks.from_main(
            (outcomes, time.perf_counter() - self._last_checkpoint > self.config.log.checkpoint_seconds))
        for book, outcome in zip(self.books, outcomes):
            if outcome is not None:
                finish_branch(self, book)
                book.finish(*outcome)
            else:
                book.save_now_and_then()
        keep = [i for i, book in enumerate(self.books) if not book.finished]
        if len(keep) < len(self.books) and keep:  # finished and diverged members leave the pack
            members = torch.tensor(keep, device=self.device)
            for part in (self.train_step, self.smoothed, self.evaluated, self.goals, self.noise, self.curvature):
                part.keep(members)
            self.books = [self.books[i] for i in keep]
            self.latest_evaluation = [self.latest_evaluation[i] for i in keep]
            if self.packed:
                self.snapshots = [(at, {name: v[members] for name, v in snap.items()}) for at, snap in self.snapshots]
        while self.next_log <= step:
            self.next_log = next(self.log_schedule)
        if pending_state_step(self.config, step) < self.next_log:  # a trunk's state is due before: log there too
            self.log_schedule = itertools.chain([self.next_log], self.log_schedule)
            self.next_log = int(pending_state_step(self.config, step))
        if keep and checkpoint_due:
            self.save_checkpoint()
        return bool(keep)

    def _initial_noise(self) -> dict:
        """B_simple (and B_noise) at initialisation, for the summary."""
        config, ns = self.config, self.config.noise_scale
        key = json.dumps([config.task, config.seed, config.branch, dataclasses.asdict(ns), self.k,
                          max(config.batch_size, ns.probe_batch_size), str(self.device), self.ranks.size],
                         sort_keys=True, default=str)
        if key not in _INITIAL_NOISE:
            simple, curvature = probe_noise(
                self.train_step, config, self.device, config.seed + SEED_OFFSETS["probe"], ns.init_probe_batches,
                members=[0], curvature_batches=max(ns.init_hessian_probe_batches, ns.hessian_probe_batches)
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
        (or two of the smallest windows), 1% of the steps apart, at most probe_snapshots of them."""
        step, min_window = self.step, self.config.smoothing.min_examples / self.config.batch_size
        self.snapshots.append((step, self.train_step.snapshot()))
        reach = max(0.1 * step, 2 * min_window, 8)
        self.snapshots = [(at, snap) for at, snap in self.snapshots if at >= step - reach]
        self.next_snapshot = step + max(1, int(0.01 * step), int(reach / self.config.noise_scale.probe_snapshots))

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
        with untouched(self.train_step.module(0), self.device):
            for index, pairs in wanted.items():
                at, snapshot = self.snapshots[index]
                with self.train_step.swapped(snapshot):
                    simple, curvature = probe_noise(self.train_step, self.config, self.device,
                                                    self.config.seed + SEED_OFFSETS["probe"] + at, ns.probe_batches,
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
        """Save the whole state (with several ranks: every rank calls it, rank 0 writes)."""
        self._last_checkpoint = time.perf_counter()
        if self.checkpoint_path is None:
            return
        self.flush_measurements()
        rank_rng = self.ranks.gather(self.rng_state())  # dropout streams: one per rank
        if not self.ranks.main:
            return
        state = self.state_dict()
        if self.ranks.size > 1:
            state["rank_rng"] = rank_rng
        # Serialised in memory first: torch.save writing to a full disk fails with an opaque
        # "[enforce fail at inline_container.cc] unexpected pos", a plain write says ENOSPC.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        records.write_atomically(self.checkpoint_path, buffer.getbuffer())
        for book in self.books:  # the records say how far the checkpoint got
            book.save()

    def rng_state(self) -> dict:
        cuda = self.device.type == "cuda"
        return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}

    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION, "members": [book.run_id for book in self.books],
            "packed": self.packed, "data": self.task.fingerprint(),
            "step": self.step, "next_log": self.next_log, "next_eval": self.next_eval, "elapsed": self.elapsed,
            "last_evaluation": self.last_evaluation, "last_scheduled": self.last_scheduled,
            "latest_evaluation": self.latest_evaluation,
            "rng": self.rng_state(),
            "batches": self.batches.state_dict(),
            "curvature_batches": None if self.curvature_batches is None else self.curvature_batches.state_dict(),
            "train_step": self.train_step.state_dict(), "smoothed": self.smoothed.state_dict(),
            "evaluated": self.evaluated.state_dict(), "goals": self.goals.state_dict(),
            "noise": self.noise.state_dict(), "books": [book.state_dict() for book in self.books],
            "curvature": self.curvature.state_dict(), "last_curvature": self.last_curvature,
            "snapshots": [(at, {k: v.cpu() for k, v in snap.items()}) for at, snap in self.snapshots],
            "next_snapshot": self.next_snapshot,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("step", "next_log", "next_eval", "elapsed", "last_evaluation", "last_scheduled",
                    "latest_evaluation", "last_curvature", "next_snapshot"):
            setattr(self, key, state[key])
        # each rank its own stream back; a rank the checkpoint did not have keeps its fresh one
        rank_rng = state.get("rank_rng") or [state["rng"]]
        if self.ranks.rank < len(rank_rng):
            rng = rank_rng[self.ranks.rank]
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.batches.load_state_dict(state["batches"])
        if self.curvature_batches is not None:
            self.curvature_batches.load_state_dict(state["curvature_batches"])
        self.train_step.load_state_dict(state["train_step"])
        for part in ("smoothed", "evaluated", "goals", "noise", "curvature"):
            getattr(self, part).load_state_dict(state[part])
        self.snapshots = [(at, {k: v.to(self.device) for k, v in snap.items()}) for at, snap in state["snapshots"]]
        for book, book_state in zip(self.books, state["books"]):
            book.load_state_dict(book_state)
            book.status = records.Status.running
            book.note(resumed_at=(book.summary.resumed_at or []) + [self.step])


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def find_checkpoint(configs: list[RunConfig], out_dirs: list) -> tuple[Path | None, dict | None]:
    """The checkpoint of exactly these runs (the members still training when it was saved), if any
    of their directories holds one: (its directory, its state). A checkpoint of another set of runs
    (the grid was regrouped) or of another version is not used, and training starts afresh."""
    ids = [records.run_id(c.to_dict()) for c in configs]
    for out_dir in out_dirs:
        path = None if out_dir is None else Path(out_dir) / CHECKPOINT_FILE
        if path is None or not path.exists():
            continue
        try:
            state = load_checkpoint(path)
        except Exception as exc:  # torn or foreign: training starts afresh, the record says why
            warnings.warn(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); starting afresh")
            continue
        if state.get("version") == CHECKPOINT_VERSION and state.get("members") == ids:
            return path.parent, state
    return None, None


def train_pack(configs: list[RunConfig | dict], out_dirs: list[str | Path | None], packed: bool | None = None,
               guard=None, interrupt: Interrupt | None = None, ranks: Ranks | None = None) -> list[dict]:
    """Train runs that differ at most in their learning rate together and return their records
    (each also written to out_dir/record.json). One run trains as a plain model; several as one
    packed model (critbatch.steps.PackedStep), unless `packed=False` (then they must be one run).

    The whole state is saved to out_dir/checkpoint.pt (the first run's) every
    log.checkpoint_seconds and when `interrupt` is requested (training then raises Interrupted);
    called again with the same runs, training resumes from it. `guard`: see RunBook.save (on
    every rank: only rank 0 writes, but any rank records a failure of the ranks).

    `ranks`: one run trained by several processes, each calling train_pack with its Ranks
    (critbatch.distributed): rank 0 finds the checkpoint, and every rank resumes from it; rank 0
    writes the record and the checkpoints. When a rank dies or hangs, each rank left raises
    RankFailure after recording the run as failed (rank 0 may be the one that died)."""
    ranks = ranks or Ranks.single()
    configs = [RunConfig.from_dict(c) for c in configs]
    if ranks.size > 1:
        if len(configs) > 1 or packed:
            raise ConfigError("train_pack: a run on several ranks trains alone, never packed")
        check_data_parallel(configs[0], ranks)
        packed = False
    resume_dir, state = find_checkpoint(configs, out_dirs) if ranks.main else (None, None)
    resume_dir = ranks.from_main(resume_dir)  # every rank resumes from the checkpoint rank 0 chose
    if resume_dir is not None and state is None:
        state = load_checkpoint(Path(resume_dir) / CHECKPOINT_FILE)
    if state is not None:  # a pack that shrank to one member resumes packed, as it was saved
        packed = state["packed"]
    packed = len(configs) > 1 if packed is None else packed
    if len(configs) > 1 and not packed:
        raise ConfigError("train_pack: several runs train together only packed (packed=True)")
    if packed:
        check_packable(configs)
    task = configs[0].build_task()
    if state is not None:  # before any record is touched: parameters trained on other data are not resumed
        check_fingerprint(task, state["data"], Path(resume_dir) / CHECKPOINT_FILE)
    books = [RunBook(c, d if ranks.main else None, guard=guard if ranks.main else None)
             for c, d in zip(configs, out_dirs)]
    checkpoint_dir = resume_dir or next((d for d in out_dirs if d is not None), None)
    try:
        training = Training(configs, task, books, packed, checkpoint_dir, interrupt, resume=state, ranks=ranks)
        training.run()
    except Interrupted:
        raise
    except Exception as exc:
        failure = from_collective(exc, ranks.rank, ranks.timeout_s) if ranks.size > 1 else exc
        for book, out_dir in zip(books, out_dirs):
            if isinstance(failure, RankFailure) and out_dir is not None:  # the writer, rank 0, may be the rank that died
                book.path, book.guard = Path(out_dir) / records.RECORD_FILE, guard
            if not book.finished:
                try:
                    book.fail(failure)
                except records.NotOwner:
                    if ranks.main:
                        raise
        if failure is exc:
            raise
        raise failure from exc
    for out_dir in out_dirs if ranks.main else ():  # every run is over: nothing to resume
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
