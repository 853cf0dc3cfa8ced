"""Time one training step of each task on synthetic tensors of the real shapes (no data needed).

    python scripts/bench_task_steps.py                      # CPU: B=64
    python scripts/bench_task_steps.py --device cuda        # B in 16, 64, 256, 4096

A step is what critbatch.steps does: compute_gradients (one forward and backward pass; with
--micro-batches k also a measuring step, as on every noise_scale.every-th step: the one-pass
micro-batch norms of critbatch.micro_grads, and for comparison k passes of B/k) and an SGD update. Times are the fastest (and the median) of --steps
steps after --warmup steps, all variants taking turns (on a busy machine --threads 1 is steadier:
with several threads one descheduled thread stalls each op). Ratios to the `digits` task at the
same batch size use the fastest, so a sweep's cost can be scaled from a digits sweep on the same
machine.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from critbatch.tasks import build_task
from critbatch.micro_grads import MicroBatchNorms
from critbatch.steps import compute_gradients
from critbatch.train import pick_device

TASKS = ("digits", "mnist", "fashion_mnist", "svhn", "cifar10")
INPUT_SHAPES = {"digits": (64,)}  # the image tasks carry theirs as `input_shape`


class Step:
    """One task's model, optimizer and synthetic batch; calling it times one training step."""

    def __init__(self, name: str, batch_size: int, device: torch.device, micro_batches: int,
                 one_pass: bool = True):
        torch.manual_seed(0)
        self.task = build_task(name)
        shape = getattr(self.task, "input_shape", None) or INPUT_SHAPES[name]
        self.model = self.task.make_model().to(device)
        self.model.train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.x = torch.randn(batch_size, *shape, device=device)
        self.y = torch.randint(10, (batch_size,), device=device)
        self.device, self.micro_batches = device, micro_batches
        self.norms = MicroBatchNorms(self.model) if one_pass and micro_batches > 1 else None
        self.times: list[float] = []

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        compute_gradients(self.model, self.task, self.x, self.y, self.micro_batches, self.norms)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def time_steps(steps: list[Step], rounds: int, warmup: int) -> list[tuple[float, float]]:
    """(fastest, median) seconds per step of each. The steps take turns, round after round, so
    that other load on the machine slows them alike; the fastest is the least disturbed."""
    for i in range(warmup + rounds):
        for step in steps:
            seconds = step()
            if i >= warmup:
                step.times.append(seconds)
    return [(min(step.times), statistics.median(step.times)) for step in steps]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 64 on CPU; 16 64 256 4096 on CUDA")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 10 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--micro-batches", type=int, default=4,
                        help="also time the noise-scale step with this many micro-batches (1: skip)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    batch_sizes = args.batch_sizes or ([16, 64, 256, 4096] if device.type == "cuda" else [64])
    steps = args.steps or (50 if device.type == "cuda" else 10)
    tasks = ["digits"] + [t for t in args.tasks if t != "digits"]  # the reference, measured first
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# device {device} ({where}), torch {torch.__version__}; "
          f"fastest and median of {steps} interleaved rounds after {args.warmup}")
    k = args.micro_batches
    head = f"{'task':<14}{'B':>6}{'ms/step':>10}{'(median)':>10}{'x digits':>10}{'examples/s':>12}"
    if k > 1:
        head += f"{f'one pass k={k}':>15}{'x plain':>9}{f'{k} passes':>10}{'x plain':>9}"
    print(head)
    for batch_size in batch_sizes:
        runs = [Step(name, batch_size, device, 1) for name in tasks]
        measuring = k > 1 and batch_size % k == 0
        if measuring:
            runs += [Step(name, batch_size, device, k, one_pass=True) for name in tasks]
            runs += [Step(name, batch_size, device, k, one_pass=False) for name in tasks]
        times = time_steps(runs, steps, args.warmup)
        n = len(tasks)
        plain = times[:n]
        one_pass, k_passes = (times[n:2 * n], times[2 * n:]) if measuring else ([None] * n, [None] * n)
        for name, (seconds, median), with_k, with_passes in zip(tasks, plain, one_pass, k_passes):
            line = (f"{name:<14}{batch_size:>6}{seconds * 1e3:>10.2f}{median * 1e3:>10.2f}"
                    f"{seconds / plain[0][0]:>10.1f}{batch_size / seconds:>12.0f}")
            if with_k is not None:
                line += (f"{with_k[0] * 1e3:>15.2f}{with_k[0] / seconds:>9.2f}"
                         f"{with_passes[0] * 1e3:>10.2f}{with_passes[0] / seconds:>9.2f}")
            print(line, flush=True)

if __name__ == "__main__":
    main()
