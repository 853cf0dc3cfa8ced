"""One run on N processes (ranks): what the training loop needs of torch.distributed.

Each rank holds the whole model and takes a slice of B/N examples of every batch; DDP averages
their gradients, so every rank applies the same update (critbatch.steps.DataParallelStep). All
ranks run the same training loop with the same bookkeeping: the batch's metrics and the noise
norms are averaged over the ranks, and whatever depends on one process's clock or signals
(stop or go on at a logged step, the time budget, a checkpoint now, an interrupt) is decided once
and shared (`Ranks.from_main`, `Ranks.agreed_signal`), so that every rank makes the same calls
into torch.distributed in the same order. Only rank 0 writes records and checkpoints.

The number of ranks is not part of a run's identity: N ranks compute the B-example mean gradient
and the k micro-batch norms of the same batches as one process, in another order of float
additions (like `device`); dropout masks come from each rank's own stream (like `device`, other
draws of the same distribution). What cannot be computed the same way is refused
(`data_parallel_problem`): BatchNorm (its statistics would be per rank), packing and CUDA graphs.

A collective that fails because another rank died (at once: the connection closes) or did not
answer within the process group's timeout raises RankFailure naming the rank and the timeout.

`Ranks.single()` is one process: every method returns what it is given, without a collective.
"""
from __future__ import annotations

import datetime
import os
import signal

import torch

from critbatch.config import ConfigError, RunConfig

#: The environment torchrun and submitit.helpers.TorchDistributedEnvironment export to each rank.
WORLD_SIZE, RANK, LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"
#: The ranks agree on an interrupt (a signal some rank received) at every step boundary that is a
#: multiple of this: a collective per step would cost more than the few steps it saves.
SIGNAL_POLL_STEPS = 16


class RankFailure(RuntimeError):
    """A collective failed: another rank died or hung. The process group cannot go on."""


def from_collective(exc: BaseException, rank: int, timeout_s: float | None) -> BaseException:
    """`exc` as a RankFailure when it comes from a collective whose peer died or timed out (gloo
    and NCCL say so in RuntimeErrors of their own wording), else `exc` itself."""
    if isinstance(exc, RankFailure):
        return exc
    text = str(exc)
    markers = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "gloo", "NCCL",
               "Broken pipe", "DistBackendError", "DistNetworkError")
    distributed_error = getattr(torch.distributed, "DistError", ())
    if not (isinstance(exc, distributed_error) or (isinstance(exc, RuntimeError)
                                                   and any(m in text for m in markers))):
        return exc
    limit = f" within the {timeout_s:g} s timeout (launcher.rank_timeout_s)" if timeout_s else ""
    first = text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__
    return RankFailure(f"rank {rank}: another rank died or did not answer{limit}; the run cannot go on "
                       f"({type(exc).__name__}: {first})")


class Ranks:
    """This process's place among the ranks of one run, and the few collectives the loop needs."""

    def __init__(self, rank: int = 0, size: int = 1, timeout_s: float | None = None, device: str = "cpu"):
        self.rank, self.size, self.timeout_s = rank, size, timeout_s
        self.device = device  # where the collectives' own tensors live (nccl: on this rank's GPU)

    @classmethod
    def single(cls) -> "Ranks":
        return cls()

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes records and checkpoints."""
        return self.rank == 0

    def _collective(self, call, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            failure = from_collective(exc, self.rank, self.timeout_s)
            if failure is exc:
                raise
            raise failure from exc

    def part(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a batch: its B/N consecutive examples (the single process's
        micro-batches are consecutive slices too, so micro-batch j of the whole batch is a
        micro-batch of rank j*N/k)."""
        return batch if self.size == 1 else batch.chunk(self.size)[self.rank]

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a tensor of equal shape on each (in place)."""
        if self.size == 1:
            return values
        self._collective(torch.distributed.all_reduce, values)
        return values.div_(self.size)

    def from_main(self, value):
        """Rank 0's value of a picklable object, on every rank."""
        if self.size == 1:
            return value
        box = [value]
        self._collective(torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, value) -> list | None:
        """Every rank's value (a picklable object) on rank 0, in rank order; None elsewhere."""
        if self.size == 1:
            return [value]
        out = [None] * self.size if self.main else None
        self._collective(torch.distributed.gather_object, value, out, dst=0)
        return out

    def agreed_signal(self, requested: str | None, step: int) -> str | None:
        """The signal that some rank received (by name), agreed at a step boundary, or None.
        One process looks at every step; N ranks every SIGNAL_POLL_STEPS steps."""
        if self.size == 1:
            return requested
        if step % SIGNAL_POLL_STEPS:
            return None
        number = torch.tensor([float(signal.Signals[requested].value) if requested else 0.0], device=self.device)
        self._collective(torch.distributed.all_reduce, number, op=torch.distributed.ReduceOp.MAX)
        return signal.Signals(int(number.item())).name if number.item() else None

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, size={self.size})"


def in_rank_environment() -> bool:
    """This process is one of several ranks (torchrun, submitit's TorchDistributedEnvironment,
    or sweeps.distributed's local spawner set the environment)."""
    return int(os.environ.get(WORLD_SIZE, "1")) > 1


def join(timeout_s: float, device: str = "auto") -> Ranks:
    """Join the process group the environment describes (env://: MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE): nccl when the ranks train on GPUs, gloo on the CPU. Every collective waits at
    most `timeout_s` for the other ranks. One process (no such environment): Ranks.single()."""
    if not in_rank_environment():
        return Ranks.single()
    size, rank = int(os.environ[WORLD_SIZE]), int(os.environ[RANK])
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:  # one GPU per rank of this node
        torch.cuda.set_device(int(os.environ.get(LOCAL_RANK, "0")) % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank,
                                                 world_size=size, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as exc:
            failure = from_collective(exc, rank, timeout_s)
            raise failure from exc
    return Ranks(rank, size, timeout_s, "cuda" if cuda else "cpu")


def leave() -> None:
    """Leave the process group after a run that went well (after a failure the process exits:
    tearing down a broken group can wait on the dead rank)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def data_parallel_problem(config: RunConfig, ranks: int, field: str = "launcher.processes") -> str | None:
    """Why this run cannot train on `ranks` ranks as it would in one process (None: it can).
    `field` names the setting that asked for them, in the message."""
    from critbatch.gns import noise_micro_batches
    from critbatch.micro_grads import MicroBatchNorms, has_batchnorm

    if ranks == 1:
        return None
    B = config.batch_size
    if ranks > B:
        return f"{field}={ranks} ranks exceed batch_size={B}: every rank needs at least one example of each batch"
    if B % ranks:
        return (f"batch_size={B} is not divisible by {field}={ranks}: each rank trains on an equal slice of "
                "every batch; choose batch sizes that are multiples of the number of ranks")
    if config.branch is not None or config.log.states_at_steps or config.log.states_at_goals:
        return (f"a branch sweep's runs (its trunk and its branches) train in one process each; "
                f"leave {field} at 1 for python -m sweeps.branch")
    if config.cuda_graphs is True:
        return f"cuda_graphs=true with {field}={ranks}: CUDA graphs are not combined with data-parallel runs"
    with torch.device("meta"):  # the architecture only
        model = config.build_task().make_model()
    if has_batchnorm(model):
        return (f"task {config.task['name']!r} has BatchNorm, which would normalise each rank's slice on its own "
                f"with {field}={ranks} (another model than the single process trains); train it in one process")
    ns = config.noise_scale
    if ns.enabled:
        k = noise_micro_batches(B, ns.micro_batches)
        if k % ranks:
            return (f"noise_scale.micro_batches={ns.micro_batches} gives k={k} micro-batches at batch_size={B}, "
                    f"not a multiple of {field}={ranks}: each rank measures whole micro-batches of its slice; set "
                    f"noise_scale.micro_batches={ranks} (the ranks' own gradients, measured at no extra pass) "
                    "or a multiple of it")
        if k > ranks and not MicroBatchNorms(model).supported:
            return (f"noise_scale.micro_batches={ns.micro_batches}: {k // ranks} micro-batches per rank need the "
                    f"one-pass rules, which task {config.task['name']!r}'s model lacks; set "
                    f"noise_scale.micro_batches={ranks} (each rank's slice is one micro-batch)")
    return None


def check_data_parallel(config: RunConfig, ranks: Ranks) -> None:
    problem = data_parallel_problem(config, ranks.size, "ranks")
    if problem is not None:
        raise ConfigError(problem)
