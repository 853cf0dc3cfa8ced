"""Model-steps per second of three training loops, measured in one run, at several batch sizes:

  (a) dataloader: a typical user's loop — TensorDataset + DataLoader (sampling with replacement),
      copying each batch to the device, torch.optim;
  (b) eager:      critbatch's plain loop — data on the device, batches by index_select
                  (critbatch.train.next_batch + compute_gradients + torch.optim);
  (c) packed:     critbatch's fast path — M learning rates as one vmapped model
                  (critbatch.packed.PackedModel + PackedOptimizer), time per model-step.

Also (d) the noise-scale measuring step's cost at the default interval, on the packed path.
Ratios are against (b) measured in the same run; rounds are interleaved so a noisy machine hurts
all loops alike. Runs on CUDA when available. `--sweep` also times the default sweep with packing
on and off (whole processes, interleaved).

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
from critbatch.packed import PackedModel, PackedOptimizer
from critbatch.tasks import build_task
from critbatch.train import BatchSampler, compute_gradients, make_optimizer, next_batch

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


def packed_loop(task, batch_size, steps, device, members, measure_every=0):
    """Seconds per model-step; with measure_every > 0, every n-th step also measures B_simple."""
    torch.manual_seed(0)
    models = [task.make_model().to(device).train() for _ in range(members)]
    packed = PackedModel(task, models)
    optimizer = PackedOptimizer(packed.params, OptimizerConfig(name="momentum"),
                                torch.logspace(-4, -2, members, device=device))
    generator = torch.Generator(device=device).manual_seed(0)
    sampler = BatchSampler(task.dataset_size, batch_size, "with_replacement", generator, device)
    k = 4 if batch_size % 4 == 0 else 1
    synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        x, y = next_batch(task, sampler, batch_size, generator)
        measure = measure_every and step % measure_every == 0
        grads, _, _ = packed.gradients(x, y, k if measure else 1)
        optimizer.step(packed.params, grads)
    synchronize(device)
    return (time.perf_counter() - start) / steps / members


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
    print(f"{'B':>6} {'dataloader':>11} {'eager':>9} {'packed':>9} {'packed+gns':>11}   "
          f"{'model-steps/s (eager)':>22} {'eager/dataloader':>17} {'eager/packed':>13} {'gns cost':>9}")
    for batch_size in args.batch_sizes:
        steps = args.steps or max(20, min(400, 40_000 // batch_size))
        timings = {"dataloader": [], "eager": [], "packed": [], "packed+gns": []}
        for loop in (eager_loop, packed_loop):  # warm up (allocator, kernels, vmap tracing)
            loop(task, batch_size, 5, device, *([args.members] if loop is packed_loop else []))
        for _ in range(args.rounds):
            timings["dataloader"].append(dataloader_loop(task, batch_size, steps, device))
            timings["eager"].append(eager_loop(task, batch_size, steps, device))
            timings["packed"].append(packed_loop(task, batch_size, steps, device, args.members))
            timings["packed+gns"].append(packed_loop(task, batch_size, steps, device, args.members, measure_every=10))
        t = {name: statistics.median(v) for name, v in timings.items()}
        print(f"{batch_size:>6} {t['dataloader'] * 1e3:>9.3f}ms {t['eager'] * 1e3:>7.3f}ms {t['packed'] * 1e3:>7.3f}ms "
              f"{t['packed+gns'] * 1e3:>9.3f}ms   {1 / t['eager']:>22.0f} {t['dataloader'] / t['eager']:>17.2f} "
              f"{t['eager'] / t['packed']:>13.2f} {t['packed+gns'] / t['packed'] - 1:>8.1%}", flush=True)
    if args.sweep:
        for line in time_sweeps(args.rounds):
            print(line)


if __name__ == "__main__":
    main()
