"""What the B_simple estimator costs: training step time with the noise scale measured vs not.

    python scripts/bench_gns.py                 # digits at B=32 and 256, and linreg, on the CPU
    python scripts/bench_gns.py --device cuda --reps 7

Each case runs critbatch.train.train for a fixed number of steps (goals out of reach) with
noise_scale.enabled false (A) and true (B, default every=10, micro_batches=4), interleaved
A B A B ... so that drifting machine load hits both alike; it reports the median seconds per
step of each and their ratio B/A (1.00 = free). Time is the training loop's wall time, not setup.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from critbatch.train import train

CASES = [  # (label, task, batch size, lr, goal metric, unreachable goal)
    ("digits B=32", {"name": "digits"}, 32, 0.1, "train_error", 0.0),
    ("digits B=256", {"name": "digits"}, 256, 0.1, "train_error", 0.0),
    ("linreg B=256", {"name": "linreg"}, 256, 0.01, "exact_loss", 0.0),
]


def seconds_per_step(task, batch_size, lr, metric, goal, steps, noise, device) -> float:
    config = {"task": task, "optimizer": {"name": "sgd", "lr": lr}, "batch_size": batch_size,
              "device": device, "goals": {"metric": metric, "thresholds": [goal]},
              "budget": {"max_steps": steps}, "noise_scale": {"enabled": noise},
              "log": {"checkpoint_seconds": 1e9}}
    record = train(config)
    assert record["summary"]["steps"] == steps, record["summary"]
    return record["summary"]["wall_time"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per timed run")
    parser.add_argument("--reps", type=int, default=5, help="A/B pairs per case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU threads, "
          f"{args.steps} steps x {args.reps} interleaved pairs; noise_scale every=10, micro_batches=4")
    print(f"{'case':<14} {'off ms/step':>12} {'on ms/step':>12} {'on/off':>7}  {'pair ratios (min..max)':>22}")
    for label, task, batch_size, lr, metric, goal in CASES:
        run = lambda noise: seconds_per_step(task, batch_size, lr, metric, goal, args.steps, noise, args.device)  # noqa: E731
        run(False), run(True)  # warm-up: data loading, allocator, lazy imports
        off, on = [], []
        for _ in range(args.reps):
            off.append(run(False))
            on.append(run(True))
        ratios = [b / a for a, b in zip(off, on)]
        print(f"{label:<14} {1e3 * statistics.median(off):>12.3f} {1e3 * statistics.median(on):>12.3f} "
              f"{statistics.median(on) / statistics.median(off):>7.3f}  "
              f"{min(ratios):>10.3f} .. {max(ratios):.3f}")


if __name__ == "__main__":
    main()
