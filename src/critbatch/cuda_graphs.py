"""Replay a training step as a CUDA graph: every kernel of the step is launched by one call,
instead of one Python dispatch each — which is what small models at small batch sizes wait on.

The step must be a function of fixed ("static") tensors only:
- its inputs are copied into the same buffers before every call;
- it updates parameters and optimizer state in place, at the same addresses;
- whatever changes from step to step is a tensor on the device (Adam's step count), never a
  Python number, because a captured graph replays the recorded kernels with their recorded
  arguments;
- its outputs are read before the next call overwrites them.
The first `warmup` calls run eagerly on a side stream (lazy initialisation — optimizer state,
cuBLAS workspaces — must happen before capture), the next one is captured and every call replays.
Each call is exactly one step: capturing records kernels without running them, and the replay
that follows runs them. Off the GPU, or disabled, the same function runs eagerly. Tests without
a GPU stand in for the capture by recording the step's operations once and replaying them
(tests/graph_replay.py), which catches a step that breaks the rules above. critbatch.steps.Graphed
wraps a training step's plain and measuring calls in one GraphedStep each.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from critbatch.config import ConfigError

WARMUP_CALLS = 3  # eager calls before capture (PyTorch's examples use 3)


class GraphedStep:
    """`step(*inputs)` that copies the inputs into static buffers and runs `fn` on them, replayed
    from a CUDA graph once captured. If capture fails, it warns and stays eager (`failure`)."""

    def __init__(self, fn: Callable, use_graph: bool, warmup: int = WARMUP_CALLS):
        self.fn, self.use_graph, self.warmup = fn, use_graph, warmup
        self.inputs: tuple[torch.Tensor, ...] | None = None
        self.replay: Callable[[], None] | None = None
        self.outputs = None
        self.eager_calls = 0
        self.failure: str | None = None

    @property
    def captured(self) -> bool:
        return self.replay is not None

    def __call__(self, *inputs: torch.Tensor):
        if not self.use_graph:  # eager: no static buffers needed
            return self.fn(*inputs)
        if self.inputs is None:
            self.inputs = tuple(t.clone() for t in inputs)
        else:
            for static, new in zip(self.inputs, inputs):
                static.copy_(new)
        if self.replay is not None:
            self.replay()
            return self.outputs
        if self.eager_calls < self.warmup:
            self.eager_calls += 1
            return self._warmup_call()
        try:
            self.replay, self.outputs = self._capture()
        except RuntimeError as exc:  # a step that syncs with the host cannot be captured
            self.use_graph, self.failure = False, f"{type(exc).__name__}: {exc}"
            warnings.warn(f"CUDA graph capture failed, running eagerly: {self.failure}", RuntimeWarning)
            return self.fn(*self.inputs)
        self.replay()
        return self.outputs

    def _warmup_call(self):
        side = torch.cuda.Stream()  # as PyTorch prescribes: warm up off the capturing stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def _capture(self):
        """(replay, outputs): record the step's kernels without running them."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(*self.inputs)
        return graph.replay, outputs


# auto graphs a step only up to this batch size: beyond it a step is bound by its arithmetic, not by
# launches (docs/speed.md), while each graph holds a batch's activations in GPU memory of its own.
AUTO_MAX_BATCH_SIZE = 1024


def use_cuda_graphs(setting, device: torch.device, batch_size: int) -> bool:
    """The run setting cuda_graphs: auto (on a CUDA device, for B <= AUTO_MAX_BATCH_SIZE), true
    (fails off one) or false."""
    if setting not in (True, False, "auto"):
        raise ConfigError(f"cuda_graphs={setting!r}; choose true, false or auto")
    if setting is True and device.type != "cuda":
        raise ConfigError(f"cuda_graphs=true needs a CUDA device, but the run is on {device}; use cuda_graphs=auto")
    if setting == "auto":
        return device.type == "cuda" and batch_size <= AUTO_MAX_BATCH_SIZE
    return setting
