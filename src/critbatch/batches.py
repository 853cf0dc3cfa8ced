"""The batches of a run: index tensors drawn on the data's device, or fresh samples of a task that
draws them (streaming tasks), each run from its own seeded random stream. No DataLoader: the data
is one tensor on the device and a batch is `task.batch(index)`.
"""
from __future__ import annotations

import torch

from critbatch.config import Sampling
from critbatch.tasks import Task


class BatchSampler:
    """Indices of each batch: i.i.d. with replacement (as the theory assumes), or epoch shuffling."""

    def __init__(self, size: int, batch_size: int, mode: Sampling, generator: torch.Generator, device):
        self.size, self.batch_size, self.mode = size, batch_size, Sampling(mode)
        self.generator, self.device = generator, device
        self.order = torch.empty(0, dtype=torch.long, device=device)  # the epoch's indices not yet drawn

    def next(self) -> torch.Tensor:
        if self.mode is Sampling.with_replacement:
            return torch.randint(self.size, (self.batch_size,), generator=self.generator, device=self.device)
        while self.order.numel() < self.batch_size:  # a batch may straddle two epochs
            perm = torch.randperm(self.size, generator=self.generator, device=self.device)
            self.order = torch.cat([self.order, perm])
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return batch


class Batches:
    """The batches of a run: drawn from the task's dataset by a BatchSampler, or fresh samples
    from a streaming task; from their own seeded random stream."""

    def __init__(self, task: Task, batch_size: int, mode: Sampling, seed: int, device):
        self.task, self.batch_size = task, batch_size
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.sampler = (None if task.dataset_size is None
                        else BatchSampler(task.dataset_size, batch_size, mode, self.generator, device))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sampler is None:
            return self.task.sample(self.batch_size, self.generator)
        return self.task.batch(self.sampler.next())

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(),
                "order": None if self.sampler is None else self.sampler.order.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        if self.sampler is not None:
            self.sampler.order = state["order"].to(self.sampler.device)
