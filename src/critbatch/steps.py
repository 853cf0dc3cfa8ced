"""The training step, in one place: what one step of a run (or of a pack of runs) computes.

A `Step` takes a batch and returns per-member metrics and, on a measuring step, the squared norms
that the B_simple estimator needs: (mean over k micro-batches of |g_j|^2, |g|^2 of the batch).
Two implementations share the interface:

- `PlainStep`: one model and its torch optimizer. Forward, backward, noise measurement and
  update read top to bottom in `PlainStep.__call__`.
- `PackedStep`: M runs that differ only in their learning rate, as one model with stacked
  parameters stepped by vmap (critbatch.packed); member i is run i.
- `DataParallelStep`: a plain step on N ranks (critbatch.distributed): each rank computes the
  gradient of its slice of B/N examples and DDP averages them.

How the k micro-batch norms are computed is chosen once per step object (`NoiseMeasurement`):
from the one pass of the full batch by per-layer rules (critbatch.micro_grads), by k passes of
B/k examples where a layer has no rule (BatchNorm: each micro-batch normalised on its own, as
on k data-parallel workers), by a vmap over micro-batches in a pack, or on N ranks from each
rank's gradient before DDP's all-reduce and the averaged one after it.

`Graphed(step)` wraps any step so that its plain and its measuring step are replayed from CUDA
graphs (critbatch.cuda_graphs); without a GPU it calls the step as it is.
"""
from __future__ import annotations

import contextlib
import enum
import functools
from typing import ContextManager, Protocol

import torch
from torch import nn
from torch.func import functional_call, vmap

from critbatch import cuda_graphs
from critbatch.config import ConfigError, RunConfig
from critbatch.curvature import curvature_forms, curvature_forms_autograd
from critbatch.distributed import Ranks, check_data_parallel
from critbatch.gns import micro_batch_sq_norms
from critbatch.micro_grads import MicroBatchNorms
from critbatch.optimizers import make_optimizer
from critbatch.packed import PackedModel, PackedOptimizer
from critbatch.tasks import Task

#: (mean_j |g_j|^2 over the k micro-batches, |g|^2 of the whole batch), one value per member
Norms = tuple[torch.Tensor, torch.Tensor]


class NoiseMeasurement(str, enum.Enum):
    """How a measuring step gets its k micro-batch gradient norms (the record's
    summary.noise_measurement)."""
    one_pass = "one pass"                 # per-layer rules on the full batch's pass (micro_grads)
    k_passes = "k passes"                 # k forward/backward passes of B/k examples
    vmap = "vmap over micro-batches"      # a pack: one more vmap, over the micro-batches
    ranks = "ranks"                       # k = N ranks: each rank's gradient before the all-reduce (paper App. A.1)


class Step(Protocol):
    """The interface the training loop (critbatch.train.Training) steps through."""

    task: Task
    members: int                                   # runs stepped together (1 for a plain step)
    micro_batches: int                             # k of a measuring step (1: no measurement)
    noise_measurement: NoiseMeasurement | None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, measure: bool) -> tuple[dict[str, torch.Tensor], Norms | None]:
        """One update on the batch: per-member metrics [M], and on a measuring step the norms."""

    def measure(self, x: torch.Tensor, y: torch.Tensor) -> Norms:
        """The norms on this batch, without an update."""

    def curvature(self, x: torch.Tensor, y: torch.Tensor) -> Norms:
        """B_noise's two quadratic forms on this batch (critbatch.curvature), without an update."""

    def module(self, member: int) -> nn.Module:
        """A module holding one member's current parameters (to evaluate it)."""

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the parameters (the noise probe at a goal measures the kept ones)."""

    def swapped(self, snapshot: dict[str, torch.Tensor]) -> ContextManager:
        """The parameters of `snapshot` in place of the current ones for a block."""

    def keep(self, members: torch.Tensor) -> None:
        """Only these members go on (the others finished or diverged)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def per_member(values):
    """0-d tensors of a plain step as the [1]-shaped per-member tensors of a pack of one."""
    if values is None:
        return None
    if isinstance(values, dict):
        return {name: value.reshape(1) for name, value in values.items()}
    return tuple(value.reshape(1) for value in values)


def compute_gradients(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, micro_batches: int = 1,
                      rules: MicroBatchNorms | None = None) -> tuple[dict[str, torch.Tensor], Norms | None]:
    """Set p.grad to the gradient of the batch's mean loss and return the batch's metrics; with
    k > 1 micro-batches also the micro-batch norms: from the same pass by `rules` (a supported
    MicroBatchNorms of this model), else from k passes of B/k examples."""
    if micro_batches > 1 and rules is None:
        return _k_passes(model, task, x, y, micro_batches)
    with rules.recording() if micro_batches > 1 else contextlib.nullcontext():
        output = model(x)                          # forward
        loss = task.loss(output, y)
        loss.backward()                            # backward: p.grad = the batch's gradient
    metrics = task.metrics(output, y, loss.detach())
    norms = rules.sq_norms(micro_batches) if micro_batches > 1 else None   # the k shares' norms
    return metrics, norms


def _k_passes(model: nn.Module, task: Task, x, y, k: int) -> tuple[dict[str, torch.Tensor], Norms]:
    """k passes of B/k examples; p.grad is the mean of their gradients: the full batch's gradient
    where examples do not interact, and with BatchNorm the data-parallel gradient (each
    micro-batch normalised with its own statistics, as on k workers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    micro_grads, outputs, losses = [], [], []
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        output = model(xs)
        loss = task.loss(output, ys)
        micro_grads.append(torch.autograd.grad(loss, params))
        outputs.append(output.detach())
        losses.append(loss.detach())
    for p, *grads in zip(params, *micro_grads):
        p.grad = torch.stack(grads).mean(0)
    loss = torch.stack(losses).mean()
    return task.metrics(torch.cat(outputs), y, loss), micro_batch_sq_norms(micro_grads)


class PlainStep:
    """One model's step: gradients of the batch's mean loss (with the micro-batch norms on a
    measuring step), then the torch optimizer's update."""

    def __init__(self, config: RunConfig, task: Task, device, micro_batches: int, capturable: bool = False):
        self.model = task.make_model().to(device).train()
        self.task, self.members, self.micro_batches = task, 1, micro_batches
        # capturable: step counts on the device, so that a step replayed from a CUDA graph counts
        self.optimizer = make_optimizer(self.model.parameters(), config.optimizer, capturable=capturable)
        rules = MicroBatchNorms(self.model)
        self.rules = rules if rules.supported else None
        self.noise_measurement = (None if micro_batches == 1 else
                                  NoiseMeasurement.one_pass if self.rules else NoiseMeasurement.k_passes)

    def __call__(self, x, y, measure: bool):
        self.optimizer.zero_grad(set_to_none=True)
        metrics, norms = compute_gradients(self.model, self.task, x, y, self.micro_batches if measure else 1,
                                           self.rules)
        self.optimizer.step()
        return per_member(metrics), per_member(norms)

    def measure(self, x, y) -> Norms:
        self.optimizer.zero_grad(set_to_none=True)
        _, norms = compute_gradients(self.model, self.task, x, y, self.micro_batches, self.rules)
        self.optimizer.zero_grad(set_to_none=True)
        return per_member(norms)

    def curvature(self, x, y) -> Norms:
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # dropout here leaves training's stream
            forms = curvature_forms_autograd(self.model, self.task.loss, x, y, self.micro_batches)
        return per_member(forms)

    def module(self, member: int) -> nn.Module:
        return self.model

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    @contextlib.contextmanager
    def swapped(self, snapshot: dict[str, torch.Tensor]):
        current = self.snapshot()
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)   # the same tensors: captured graphs and the optimizer keep them
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in current.items():
                    params[name].copy_(value)

    def keep(self, members: torch.Tensor) -> None:
        """A plain step is one run, which ends with its step."""

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class PackedStep:
    """The step of M runs that differ only in their learning rate: per-member gradients (with
    the micro-batch norms on a measuring step) by vmap, then the optimizer's update with one lr
    per member. Each member follows its plain twin within float rounding."""

    def __init__(self, configs: list[RunConfig], task: Task, device, micro_batches: int):
        rng = torch.get_rng_state()  # every member starts where its plain twin starts
        models = []
        for _ in configs:
            torch.set_rng_state(rng)
            models.append(task.make_model().to(device).train())
        self.packed = PackedModel(task, models)
        self.scratch = models[0]  # a module to evaluate one member at a time
        self.task, self.members, self.micro_batches = task, len(configs), micro_batches
        self.optimizer = PackedOptimizer(self.packed.params, configs[0].optimizer,
                                         torch.tensor([c.optimizer.lr for c in configs], device=device))
        self.noise_measurement = None if micro_batches == 1 else NoiseMeasurement.vmap
        self._loaded: int | None = None  # the member whose parameters `scratch` holds

    def __call__(self, x, y, measure: bool):
        grads, metrics, norms = self.packed.gradients(x, y, self.micro_batches if measure else 1)
        self.optimizer.step(self.packed.params, grads)
        self._loaded = None
        return metrics, norms

    def measure(self, x, y) -> Norms:
        return self.packed.gradients(x, y, self.micro_batches)[2]

    def curvature(self, x, y) -> Norms:
        packed, task, k = self.packed, self.task, self.micro_batches

        def member(params, buffers):
            def loss(p, xs, ys):
                return task.loss(functional_call(packed.base, (p, buffers), (xs,)), ys)
            return curvature_forms(loss, params, x, y, k)

        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # dropout here leaves training's stream
            small, big = vmap(member, randomness="different")(packed.params, packed.buffers)
        return small.detach(), big.detach()

    def module(self, member: int) -> nn.Module:
        if self._loaded != member:
            self.scratch.load_state_dict(self.packed.member_state(member))
            self._loaded = member
        return self.scratch

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self.packed.params.items()}

    @contextlib.contextmanager
    def swapped(self, snapshot: dict[str, torch.Tensor]):
        current = self.snapshot()
        for name, value in snapshot.items():
            self.packed.params[name].copy_(value)
        self._loaded = None
        try:
            yield
        finally:
            for name, value in current.items():
                self.packed.params[name].copy_(value)
            self._loaded = None

    def keep(self, members: torch.Tensor) -> None:
        self.packed.keep(members)
        self.optimizer.keep(members)
        self.members = len(members)
        self._loaded = None

    def state_dict(self) -> dict:
        return {"packed": self.packed.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.packed.load_state_dict(state["packed"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._loaded = None


class RankNorms:
    """A DDP communication hook that averages each gradient bucket over the ranks, as DDP's
    default hook does, and while `measuring` adds up each bucket's squared norm before the
    all-reduce (this rank's B/N-example gradient) and after it (the B-example gradient)."""

    def __init__(self, size: int):
        self.size, self.measuring = size, False
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []

    @staticmethod
    def reduce(state: "RankNorms", bucket):  # DDP checks a hook's name and annotations: a plain function
        buffer = bucket.buffer()
        if state.measuring:
            state.before.append(torch.dot(buffer, buffer))
        buffer.div_(state.size)

        def averaged(future):
            reduced = future.value()[0]
            if state.measuring:
                state.after.append(torch.dot(reduced, reduced))
            return reduced

        return torch.distributed.all_reduce(buffer, async_op=True).get_future().then(averaged)

    def take(self) -> Norms:
        """(|g_rank|^2, |g|^2) of the pass just done, summed over its buckets."""
        norms = torch.stack(self.before).sum(), torch.stack(self.after).sum()
        self.before.clear()
        self.after.clear()
        return norms


class DataParallelStep(PlainStep):
    """A plain step on N ranks: each rank runs the model (wrapped in torch's DDP) on its B/N
    consecutive examples of the batch, DDP averages the gradients, and every rank applies the
    same update. The batch's metrics are the mean of the ranks' (every batch metric is a mean
    over examples, and the slices are equal).

    A measuring step's k micro-batches are the single process's: with k = N each rank's slice is
    one, and its norm is taken in the communication hook before the all-reduce, the batch's after
    it (RankNorms: no extra pass); with k = mN each rank measures its m micro-batches by the
    per-layer rules. The mean micro-batch norm is averaged over the ranks in the same all-reduce
    as the metrics. Curvature (B_noise) is computed by every rank on the whole batch, as one
    process computes it. Every call here is a collective: all ranks make it together."""

    def __init__(self, config: RunConfig, task: Task, device, micro_batches: int, ranks: Ranks):
        check_data_parallel(config, ranks)
        super().__init__(config, task, device, micro_batches)
        from torch.nn.parallel import DistributedDataParallel

        self.ranks = ranks
        self.ddp = DistributedDataParallel(self.model)  # on this rank's device (critbatch.distributed.join)
        self.hook = RankNorms(ranks.size)
        self.ddp.register_comm_hook(self.hook, RankNorms.reduce)
        self.local_micro_batches = max(1, micro_batches // ranks.size)
        if micro_batches > 1 and self.local_micro_batches == 1:
            self.noise_measurement = NoiseMeasurement.ranks

    def _gradients(self, x, y, measure: bool) -> tuple[dict[str, torch.Tensor], Norms | None]:
        x, y = self.ranks.part(x), self.ranks.part(y)
        ranks_measure = measure and self.noise_measurement is NoiseMeasurement.ranks
        rules = measure and not ranks_measure
        self.hook.measuring = ranks_measure
        with self.rules.recording() if rules else contextlib.nullcontext():
            output = self.ddp(x)
            loss = self.task.loss(output, y)
            loss.backward()                    # DDP: p.grad = the mean of the ranks' gradients
        metrics = self.task.metrics(output, y, loss.detach())
        norms = None
        if ranks_measure:
            norms = self.hook.take()
        elif rules:
            norms = self.rules.sq_norms(self.local_micro_batches)
        # one all-reduce: the whole batch's metrics and the ranks' mean micro-batch norm
        names = list(metrics)
        shared = [metrics[name].detach().float().reshape(()) for name in names]
        values = self.ranks.mean(torch.stack(shared + ([norms[0].float()] if norms else [])))
        metrics = {name: values[i] for i, name in enumerate(names)}
        return metrics, None if norms is None else (values[-1], norms[1])

    def __call__(self, x, y, measure: bool):
        self.optimizer.zero_grad(set_to_none=True)
        metrics, norms = self._gradients(x, y, measure)
        self.optimizer.step()
        return per_member(metrics), per_member(norms)

    def measure(self, x, y) -> Norms:
        self.optimizer.zero_grad(set_to_none=True)
        _, norms = self._gradients(x, y, measure=True)
        self.optimizer.zero_grad(set_to_none=True)
        return per_member(norms)


class Graphed:
    """Any Step, with its plain and its measuring step each replayed from a CUDA graph once
    captured (critbatch.cuda_graphs.GraphedStep); `enabled=False` calls the step as it is.
    Graphs are captured again after the tensors they read were replaced (keep, load_state_dict)."""

    def __init__(self, step: Step, enabled: bool):
        self.step, self.enabled = step, enabled
        self._reset()

    def _reset(self) -> None:
        self._graphs = {measure: cuda_graphs.GraphedStep(functools.partial(self.step, measure=measure), self.enabled)
                        for measure in (False, True)}

    def __call__(self, x, y, measure: bool):
        if not self.enabled:
            return self.step(x, y, measure)
        return self._graphs[measure](x, y)

    @property
    def failure(self) -> str | None:
        """Why a graph could not be captured (that step then runs eagerly), if one could not."""
        return next((g.failure for g in self._graphs.values() if g.failure), None)

    def keep(self, members: torch.Tensor) -> None:
        self.step.keep(members)
        self._reset()

    def load_state_dict(self, state: dict) -> None:
        self.step.load_state_dict(state)
        self._reset()

    # the rest of the Step interface, as the wrapped step has it
    task = property(lambda self: self.step.task)
    members = property(lambda self: self.step.members)
    micro_batches = property(lambda self: self.step.micro_batches)
    noise_measurement = property(lambda self: self.step.noise_measurement)

    def measure(self, x, y) -> Norms:
        return self.step.measure(x, y)

    def curvature(self, x, y) -> Norms:
        return self.step.curvature(x, y)

    def module(self, member: int) -> nn.Module:
        return self.step.module(member)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return self.step.snapshot()

    def swapped(self, snapshot: dict[str, torch.Tensor]) -> ContextManager:
        return self.step.swapped(snapshot)

    def state_dict(self) -> dict:
        return self.step.state_dict()


def make_step(configs: list[RunConfig], task: Task, device: torch.device, micro_batches: int, packed: bool,
              graphs: bool, ranks: Ranks | None = None) -> Graphed:
    """The step of these runs (one, or a pack), replayed from CUDA graphs when `graphs`; one run
    on several `ranks` is a DataParallelStep (neither packed nor graphed)."""
    if ranks is not None and ranks.size > 1:
        if packed or graphs:
            raise ConfigError("a run on several ranks is neither packed nor replayed from CUDA graphs")
        return Graphed(DataParallelStep(configs[0], task, device, micro_batches, ranks), False)
    if packed:
        step = PackedStep(configs, task, device, micro_batches)
    else:
        step = PlainStep(configs[0], task, device, micro_batches, capturable=graphs)
    return Graphed(step, graphs)
