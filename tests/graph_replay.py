"""A CPU stand-in for CUDA-graph capture, for machines without a GPU (CI): the step's ATen ops
are recorded once, with their arguments, and replayed on the same tensors, which is what a CUDA
graph does with its kernels. A step that keeps a changing value in Python (a step count in an
int, a number read back with .item()) gets that value frozen at capture here as there, so its
replayed results drift from the eager ones."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from critbatch.cuda_graphs import GraphedStep


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def replay(self) -> None:
        """Run every op again; a fresh result is copied into the recorded output (a graph's
        static output), while in-place ops and views write to the recorded memory themselves.
        The recorded ops include the backward pass's: autograd has nothing to add (no_grad)."""
        with torch.no_grad():
            self._replay()

    def _replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for recorded, result in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                if isinstance(recorded, torch.Tensor) and recorded.data_ptr() != result.data_ptr():
                    recorded.copy_(result)


class ReplayedStep(GraphedStep):
    """GraphedStep with OpRecorder in place of torch.cuda.CUDAGraph."""

    def _warmup_call(self):
        return self.fn(*self.inputs)

    def _capture(self):
        with OpRecorder() as recorder:  # unlike a capture this runs the step, so the first replay is skipped
            outputs = self.fn(*self.inputs)
        pending = [True]

        def replay():
            if pending:
                pending.clear()
            else:
                recorder.replay()
        return replay, outputs
