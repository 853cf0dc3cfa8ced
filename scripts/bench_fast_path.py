"""Model-steps per second of four training loops, measured in one run, at several batch sizes:

  (a) dataloader: a typical user's loop — TensorDataset + DataLoader (sampling with replacement),
      copying each batch to the device, torch.optim;
  (b) eager:      the eager on-device loop, the issue's baseline — data on the device, batches by
                  index_select (critbatch.batches.Batches + critbatch.steps.compute_gradients + torch.optim);
  (c) plain:      critbatch's plain loop as a sweep runs it (critbatch.steps.PlainStep): on CUDA
                  each step is replayed from a CUDA graph;
  (d) packed:     critbatch's fast path — M learning rates as one vmapped model
                  (critbatch.steps.PackedStep), time per model-step; on CUDA each step is
                  replayed from a CUDA graph. Not for models with BatchNorm (n/a).
"sweep" is the path a sweep takes at that B with the default settings (packed for
B <= packing.max_batch_size on a GPU, plain otherwise). Also the noise-scale cost at the default
interval (every noise_scale.every-th step) on the plain and packed paths. Ratios are against (b)
measured in the same run; rounds are interleaved so a noisy machine hurts all loops alike. Runs on
CUDA when available. `--sweep` also times the default sweep with packing on and off (whole
processes, interleaved).

    python scripts/bench_fast_path.py [--task digits] [--batch-sizes 16 64 256 1024 4096] [--members 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from critbatch.config import OptimizerConfig, RunConfig, Sampling
from critbatch.cuda_graphs import WARMUP_CALLS, use_cuda_graphs
from critbatch.gns import noise_micro_batches
from critbatch.optimizers import make_optimizer
from critbatch.batches import Batches
from critbatch.packed import packable
from critbatch.steps import compute_gradients, make_step
from critbatch.tasks import build_task

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # sweeps.schema (the packing defaults), also from a plain checkout
from sweeps.schema import PackingConfig  # noqa: E402  (imports neither Hydra nor submitit)

OPTIMIZER = OptimizerConfig(name="momentum", lr=1e-3)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_task(name: str, device, examples: int):
    """The task with its real data (digits, mnist1d, linreg), or, for the paper's image tasks,
    synthetic tensors of the real shapes (no download needed to time a step)."""
    task = build_task(name)
    if hasattr(task, "input_shape"):
        task = build_task(name, train_examples=examples)
        task.inputs = torch.randn(examples, *task.input_shape, device=device)
        task.targets = torch.randint(0, 10, (examples,), device=device)
    else:
        task.load(device)
    return task


def run_config(task_name: str, batch_size: int, device) -> RunConfig:
    """The settings a sweep's run at this B would have (momentum SGD), on this device."""
    return RunConfig(task={"name": task_name}, optimizer=OPTIMIZER, batch_size=batch_size, device=str(device))


def dataloader_loop(task, batch_size, steps, device):
    torch.manual_seed(0)
    model = task.make_model().to(device).train()
    optimizer = make_optimizer(model.parameters(), OPTIMIZER)
    if task.dataset_size is None:  # a streaming task: a fixed sample stands in for a dataset
        inputs, targets = task.sample(max(8192, batch_size), torch.Generator(device=device).manual_seed(0))
    else:
        inputs, targets = task.inputs, task.targets
    dataset = torch.utils.data.TensorDataset(inputs.cpu(), targets.cpu())
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
    optimizer = make_optimizer(model.parameters(), OPTIMIZER)
    batches = Batches(task, batch_size, Sampling.with_replacement, 0, device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = batches.next()
        optimizer.zero_grad(set_to_none=True)
        compute_gradients(model, task, x, y)
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def run_steps(step_fn, task, batch_size, steps, device, measure_every) -> float:
    """Seconds per call of step_fn(x, y, measure) (a PlainStep or PackedStep), timed after its
    graphs (if any) are captured."""
    batches = Batches(task, batch_size, Sampling.with_replacement, 0, device)
    for step in range(2 * (WARMUP_CALLS + 1)):  # let both graphs (plain, measuring) be captured first
        step_fn(*batches.next(), bool(measure_every) and step % 2 == 0)
    synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        x, y = batches.next()
        step_fn(x, y, bool(measure_every) and step % measure_every == 0)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def micro_batches(config: RunConfig) -> int:
    """k of a measuring step, as critbatch.train.Training picks it."""
    return noise_micro_batches(config.batch_size, config.noise_scale.micro_batches)


def plain_loop(task, config: RunConfig, steps, device, measure=False):
    """Seconds per step of critbatch's plain loop; with `measure`, every noise_scale.every-th step
    also measures B_simple."""
    torch.manual_seed(0)
    step_fn = make_step([config], task, device, micro_batches(config), packed=False,
                        graphs=use_cuda_graphs(config.cuda_graphs, device, config.batch_size))
    return run_steps(step_fn, task, config.batch_size, steps, device, config.noise_scale.every if measure else 0)


def packed_loop(task, config: RunConfig, steps, device, members, measure=False):
    """Seconds per model-step of a pack of `members` learning rates; with `measure`, every
    noise_scale.every-th step also measures B_simple."""
    torch.manual_seed(0)
    configs = [dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, lr=float(lr)))
               for lr in torch.logspace(-4, -2, members)]
    step_fn = make_step(configs, task, device, micro_batches(config), packed=True,
                        graphs=use_cuda_graphs(config.cuda_graphs, device, config.batch_size))
    every = config.noise_scale.every if measure else 0
    return run_steps(step_fn, task, config.batch_size, steps, device, every) / members


def sweep_path(config: RunConfig, device, can_pack: bool) -> str:
    """The path a sweep's run at this B takes with packing.enabled=auto (sweeps.jobs.packs)."""
    small = config.batch_size <= PackingConfig().max_batch_size
    return "packed" if device.type == "cuda" and small and can_pack else "plain"


def time_sweeps(rounds: int, overrides: list[str]) -> list[str]:
    """Whole-process wall time of the default sweep, packing forced on vs off, interleaved."""
    times = {"on": [], "off": []}
    for _ in range(rounds):
        for mode, enabled in (("on", "true"), ("off", "false")):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "sweeps.launch", f"hydra.sweep.dir={tmp}/s",
                                       f"packing.enabled={enabled}", *overrides],
                                      cwd=REPO, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"sweeps.launch (packing {mode}) failed with exit status "
                                     f"{done.returncode}:\n{done.stderr[-4000:]}")
                times[mode].append(time.perf_counter() - start)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    what = "default sweep" + (f" ({' '.join(overrides)})" if overrides else "")
    return [f"{what}, median of {rounds}: packing on {on:.1f} s, off {off:.1f} s, on/off {on / off:.2f}"]


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
    parser.add_argument("--sweep-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides for the --sweep sweep (default: none, the default sweep as it is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = load_task(args.task, device, examples=max(8192, 2 * max(args.batch_sizes)))
    can_pack = packable(run_config(args.task, args.batch_sizes[0], device))
    print(f"# {args.task} on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{f'{args.members} packed members' if can_pack else 'not packable (BatchNorm)'}, "
          f"median of {args.rounds} interleaved rounds")
    every = RunConfig().noise_scale.every
    print(f"model-steps per second (ratio: over eager, measured in the same rounds); gns: the noise-scale "
          f"cost, measuring every {every}th step")
    shown = ("dataloader", "eager", "plain", "packed")
    print(f"{'B':>6} " + " ".join(f"{name:>18}" for name in shown) + f" {'sweep path':>18}"
          f" {'gns plain':>10} {'gns packed':>10}")
    for batch_size in args.batch_sizes:
        config = run_config(args.task, batch_size, device)
        loops = {"dataloader": lambda n: dataloader_loop(task, batch_size, n, device),
                 "eager": lambda n: eager_loop(task, batch_size, n, device),
                 "plain": lambda n: plain_loop(task, config, n, device),
                 "plain+gns": lambda n: plain_loop(task, config, n, device, measure=True)}
        if can_pack:
            loops.update({"packed": lambda n: packed_loop(task, config, n, device, args.members),
                          "packed+gns": lambda n: packed_loop(task, config, n, device, args.members, measure=True)})
        steps = args.steps or max(20, min(400, 40_000 // batch_size))
        for name in ("eager", "plain", "packed"):  # warm up (allocator, kernels, vmap tracing)
            if name in loops:
                loops[name](5)
        timings = {name: [] for name in loops}
        for _ in range(args.rounds):
            for name, loop in loops.items():
                timings[name].append(loop(steps))
        t = {name: statistics.median(v) for name, v in timings.items()}

        def cell(name):
            return f"{1 / t[name]:>9.0f} ({t['eager'] / t[name]:>5.2f}x)" if name in t else "n/a"

        def cost(name):
            return f"{t[name + '+gns'] / t[name] - 1:>10.1%}" if name in t else f"{'n/a':>10}"

        cells = [cell(name) for name in (*shown, sweep_path(config, device, can_pack))]
        print(f"{batch_size:>6} " + " ".join(f"{c:>18}" for c in cells) + f" {cost('plain')} {cost('packed')}",
              flush=True)
    if args.sweep:
        for line in time_sweeps(args.rounds, args.sweep_overrides):
            print(line)


if __name__ == "__main__":
    main()
