"""What B_simple from the ranks costs a data-parallel run: training step time on N ranks (torch
DDP; gloo on the CPU, nccl on GPUs) with the noise scale measured from the ranks' gradients
(noise_scale.micro_batches = N: each rank's squared norm before DDP's all-reduce, the batch's
after it) against the same DDP run without it.

    python scripts/bench_ddp.py                    # 2 ranks on the CPU, digits and mnist1d
    python scripts/bench_ddp.py --ranks 2 --steps 2000 --reps 7

Each case trains critbatch.train.train_pack on every rank for a fixed number of steps (goals out of
reach) three ways, interleaved A B C A B C ... so that drifting machine load hits all alike:
A noise_scale.enabled false; B B_simple from the ranks at the defaults (every 10th step, more
often early in a run while the window is short; hessian_every 0); C B_simple on every step. It
reports rank 0's median seconds per step of A and the ratios B/A and C/A (1.00 = free). Time is
the training loop's wall time, not set-up (which holds the probes at initialisation).

On a busy machine the loop's times drift by more than what measuring costs; so, in the same run,
the step itself: DataParallelStep called on the same batches alternately measuring and not
(--paired such pairs), rank 0's median time of each, and their ratio (the measuring step's cost;
at the default of every 10th step a tenth of it, less early in a run when it measures more often).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gns import config_for  # noqa: E402  (the same fixed-length runs as bench_gns)

CASES = [  # (label, task, batch size, lr, goal metric, unreachable goal)
    ("digits B=64", {"name": "digits"}, 64, 0.1, "train_error", 1e-9),
    ("digits B=512", {"name": "digits"}, 512, 0.1, "train_error", 1e-9),
    ("mnist1d mlp B=256", {"name": "mnist1d", "model": "mlp"}, 256, 0.3, "train_error", 1e-9),
    ("mnist1d cnn B=256", {"name": "mnist1d", "model": "cnn"}, 256, 0.1, "train_error", 1e-9),
]


def modes(ranks: int) -> dict[str, dict]:
    return {"off": {"enabled": False},
            "B_simple": {"micro_batches": ranks, "hessian_every": 0},
            "every step": {"micro_batches": ranks, "hessian_every": 0, "every": 1}}


def on_each_rank(args) -> list[tuple[str, float, dict[str, float]]]:
    """In each rank: the timed runs; rank 0's medians."""
    from critbatch.distributed import join
    from critbatch.train import train_pack

    torch.set_num_threads(args.threads)
    ranks = join(300, args.device)
    rows = []
    for label, task, batch_size, lr, metric, goal in CASES:
        if args.cases and label not in args.cases:
            continue
        configs = {mode: config_for(task, batch_size, lr, metric, goal, args.steps, noise, args.device)
                   for mode, noise in modes(ranks.size).items()}
        times: dict[str, list[float]] = {mode: [] for mode in configs}
        for rep in range(args.reps + 1):  # the first round warms up: data, allocator, lazy imports
            for mode, config in configs.items():
                record = train_pack([config], [None], packed=False, ranks=ranks)[0]
                assert record["summary"]["steps"] == args.steps, record["summary"]
                if rep:
                    times[mode].append(record["summary"]["wall_time"] / args.steps)
        off = statistics.median(times["off"])
        ratios = {mode: statistics.median(t) / off for mode, t in times.items() if mode != "off"}
        plain, measuring = paired_step_times(configs["B_simple"], ranks, args.paired)
        rows.append((label, off, {**ratios, "step": measuring / plain, "plain step": plain}))
    return rows


def paired_step_times(config: dict, ranks, pairs: int) -> tuple[float, float]:
    """Median seconds of a plain and of a measuring DataParallelStep, called alternately on the
    same batches (the pairs see the same machine load)."""
    from critbatch.batches import Batches
    from critbatch.config import RunConfig
    from critbatch.steps import NoiseMeasurement, make_step

    run = RunConfig.from_dict(config)
    device = torch.device(args_device(run))
    torch.manual_seed(run.seed)
    task = run.build_task()
    task.load(device)
    step = make_step([run], task, device, ranks.size, packed=False, graphs=False, ranks=ranks)
    assert step.noise_measurement is NoiseMeasurement.ranks
    batches = Batches(task, run.batch_size, run.sampling, run.seed, device)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * pairs + 20):
        x, y = batches.next()
        measure = bool(i % 2)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(x, y, measure)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 20:  # warm-up: DDP's first buckets, the allocator
            times[measure].append(time.perf_counter() - start)
    return statistics.median(times[False]), statistics.median(times[True])


def args_device(run) -> str:
    return "cuda" if run.device.value == "cuda" or (run.device.value == "auto" and torch.cuda.is_available()) else "cpu"


def main() -> None:
    from sweeps.distributed import RankSpec, spawn_ranks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per timed run")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds per case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    parser.add_argument("--cases", nargs="*", help="labels of the cases to run (default: all)")
    parser.add_argument("--paired", type=int, default=2000, help="plain/measuring step pairs per case")
    args = parser.parse_args()
    rows = spawn_ranks(on_each_rank, (args,), {}, RankSpec(args.ranks, timeout_s=300))
    print(f"torch {torch.__version__}, {args.ranks} ranks on {args.device} ({'nccl' if args.device == 'cuda' else 'gloo'}),"
          f" {args.threads} thread(s) each, {args.steps} steps x {args.reps} interleaved rounds")
    print(f"{'case':<20} {'DDP ms/step':>12} {'+B_simple':>10} {'every step':>11}   "
          f"{'step ms':>8} {'measuring step':>15}")
    for label, off, ratios in rows:
        print(f"{label:<20} {1e3 * off:>12.3f} {ratios['B_simple']:>10.3f} {ratios['every step']:>11.3f}   "
              f"{1e3 * ratios['plain step']:>8.3f} {ratios['step']:>15.3f}")


if __name__ == "__main__":
    main()
