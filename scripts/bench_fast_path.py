"""Model-steps per second of four training loops, measured in one run, at several batch sizes:

  (a) dataloader: a typical user's loop — TensorDataset + DataLoader (sampling with replacement),
      copying each batch to the device, torch.optim;
  (b) eager:      the eager on-device loop, the issue's baseline — data on the device, batches by
                  index_select (critbatch.train.next_batch + compute_gradients + torch.optim);
  (c) plain:      critbatch's plain loop as a sweep runs it (critbatch.train.PlainSteps): on CUDA
                  each step is replayed from a CUDA graph;
  (d) packed:     critbatch's fast path — M learning rates as one vmapped model
                  (critbatch.packed.PackedModel + PackedOptimizer + PackedSteps), time per
                  model-step; on CUDA each step is replayed from a CUDA graph.
"sweep" is the path a sweep takes at that B with the default settings (packed for B <= 256 on a
GPU, plain otherwise). Also the noise-scale cost at the default interval (every 10th step) on the
plain and packed paths. Ratios are against (b) measured in the same run; rounds are interleaved so
a noisy machine hurts all loops alike. Runs on CUDA when available. `--sweep` also times the
default sweep with packing on and off (whole processes, interleaved).

    python scripts/bench_fast_path.py [--task digits] [--batch-sizes 16 64 256 1024 4096] [--members 8]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from critbatch.config import OptimizerConfig
from critbatch.cuda_graphs import WARMUP_CALLS, use_cuda_graphs
from critbatch.packed import PackedModel, PackedOptimizer, PackedSteps
from critbatch.tasks import build_task
from critbatch.micro_grads import MicroBatchNorms
from critbatch.train import (BatchSampler, PlainSteps, compute_gradients, make_optimizer, next_batch,
                             noise_micro_batches)

REPO = Path(__file__).resolve().parents[1]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_task(name: str, device, examples: int):
    """The task with its real data (digits), or synthetic tensors of the real shapes."""
    task = build_task(name) if name in ("digits", "linreg") else build_task(name, train_examples=examples)
    if name in ("digits", "linreg"):
        task.load(device)
    else:  # paper tasks: no data needed to time a step
        task.inputs = torch.randn(examples, *task.input_shape, device=device)
        task.targets = torch.randint(0, 10, (examples,), device=device)
    return task


def dataloader_loop(task, batch_size, steps, device):
    torch.manual_seed(0)
    model = task.make_model().to(device).train()
    optimizer = make_optimizer(model.parameters(), OptimizerConfig(name="momentum", lr=1e-3))
    dataset = torch.utils.data.TensorDataset(task.inputs.cpu(), task.targets.cpu())
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch_size * steps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    synchronize(device)
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def eager_loop(task, batch_size, steps, device):
    torch.manual_seed(0)
    model = task.make_model().to(device).train()
    optimizer = make_optimizer(model.parameters(), OptimizerConfig(name="momentum", lr=1e-3))
    generator = torch.Generator(device=device).manual_seed(0)
    sampler = BatchSampler(task.dataset_size, batch_size, "with_replacement", generator, device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next_batch(task, sampler, batch_size, generator)
        optimizer.zero_grad(set_to_none=True)
        compute_gradients(model, task, x, y)
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def run_steps(train_step, task, batch_size, steps, device, measure_every) -> float:
    """Seconds per call of train_step(x, y, measure), timed after its graphs (if any) are captured."""
    generator = torch.Generator(device=device).manual_seed(0)
    sampler = BatchSampler(task.dataset_size, batch_size, "with_replacement", generator, device)
    for step in range(2 * (WARMUP_CALLS + 1)):  # let both graphs (plain, measuring) be captured first
        train_step(*next_batch(task, sampler, batch_size, generator), bool(measure_every) and step % 2 == 0)
    synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        x, y = next_batch(task, sampler, batch_size, generator)
        train_step(x, y, bool(measure_every) and step % measure_every == 0)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def plain_loop(task, batch_size, steps, device, measure_every=0):
    torch.manual_seed(0)
    model = task.make_model().to(device).train()
    graphs = use_cuda_graphs("auto", device, batch_size)
    optimizer = make_optimizer(model.parameters(), OptimizerConfig(name="momentum", lr=1e-3), capturable=graphs)
    norms = MicroBatchNorms(model)
    train_step = PlainSteps(model, task, optimizer, noise_micro_batches(batch_size, 4),
                            norms if norms.supported else None, graphs)
    return run_steps(train_step, task, batch_size, steps, device, measure_every)


def packed_loop(task, batch_size, steps, device, members, measure_every=0):
    """Seconds per model-step; with measure_every > 0, every n-th step also measures B_simple."""
    torch.manual_seed(0)
    models = [task.make_model().to(device).train() for _ in range(members)]
    packed = PackedModel(task, models)
    optimizer = PackedOptimizer(packed.params, OptimizerConfig(name="momentum"),
                                torch.logspace(-4, -2, members, device=device))
    train_step = PackedSteps(packed, optimizer, noise_micro_batches(batch_size, 4),
                             use_cuda_graphs("auto", device, batch_size))
    return run_steps(train_step, task, batch_size, steps, device, measure_every) / members


def time_sweeps(rounds: int) -> list[str]:
    """Whole-process wall time of the default sweep, packing forced on vs off, interleaved."""
    times = {"on": [], "off": []}
    for _ in range(rounds):
        for mode, enabled in (("on", "true"), ("off", "false")):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "sweeps.launch", f"hydra.sweep.dir={tmp}/s",
                                f"packing.enabled={enabled}"], cwd=REPO, check=True, capture_output=True)
                times[mode].append(time.perf_counter() - start)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return [f"default sweep, median of {rounds}: packing on {on:.1f} s, off {off:.1f} s, on/off {on / off:.2f}"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=0, help="steps per measurement (default: by batch size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sweep", action="store_true", help="also time the default sweep, packing on and off")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = load_task(args.task, device, examples=max(8192, 2 * max(args.batch_sizes)))
    print(f"# {args.task} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.members} packed members, "
          f"median of {args.rounds} interleaved rounds")
    loops = {"dataloader": lambda B, n: dataloader_loop(task, B, n, device),
             "eager": lambda B, n: eager_loop(task, B, n, device),
             "plain": lambda B, n: plain_loop(task, B, n, device),
             "packed": lambda B, n: packed_loop(task, B, n, device, args.members),
             "plain+gns": lambda B, n: plain_loop(task, B, n, device, measure_every=10),
             "packed+gns": lambda B, n: packed_loop(task, B, n, device, args.members, measure_every=10)}
    shown = ("dataloader", "eager", "plain", "packed")
    print("model-steps per second (ratio: over eager, measured in the same rounds); gns: the noise-scale "
          "cost, measuring every 10th step")
    print(f"{'B':>6} " + " ".join(f"{name:>18}" for name in shown) + f" {'sweep path':>18}"
          f" {'gns plain':>10} {'gns packed':>10}")
    for batch_size in args.batch_sizes:
        steps = args.steps or max(20, min(400, 40_000 // batch_size))
        for name in ("eager", "plain", "packed"):  # warm up (allocator, kernels, vmap tracing)
            loops[name](batch_size, 5)
        timings = {name: [] for name in loops}
        for _ in range(args.rounds):
            for name, loop in loops.items():
                timings[name].append(loop(batch_size, steps))
        t = {name: statistics.median(v) for name, v in timings.items()}
        sweep = "packed" if device.type == "cuda" and batch_size <= 256 else "plain"  # packing.enabled=auto
        cells = [f"{1 / t[name]:>9.0f} ({t['eager'] / t[name]:>5.2f}x)" for name in (*shown, sweep)]
        print(f"{batch_size:>6} " + " ".join(f"{c:>18}" for c in cells)
              + f" {t['plain+gns'] / t['plain'] - 1:>10.1%} {t['packed+gns'] / t['packed'] - 1:>10.1%}", flush=True)
    if args.sweep:
        for line in time_sweeps(args.rounds):
            print(line)


if __name__ == "__main__":
    main()
