"""B_noise's path average against its exact value in real linreg runs, before and after the
second-order rate (critbatch.monitor.IdealSteps): the figure of docs/noise_scales.md.

    python scripts/b_noise_path_check.py [--out docs/img/b_noise_path_before_after.png]

The runs and goals of tests/test_path_average.py::test_b_noise_path_average_is_the_exact_one_in_noisy_runs
(d = 64, B = 16 at lr 0.3 over 4 seeds and B = 64 at lr 0.6 over 6; B_noise every step on 20 draws
of 4 x 128 examples of its own); "before" is the first-order rate from the same measurements.
About 3 minutes on one core.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import NOISY_LINREG, b_noise_path_ratios  # noqa: E402

CASES = ((16, 0.3, 4), (64, 0.6, 6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/img/b_noise_path_before_after.png")
    args = parser.parse_args()
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    axes = fig.subplots(1, len(CASES), sharey=True)
    table = {}
    for ax, (batch_size, lr, seeds) in zip(axes, CASES):
        config = {**NOISY_LINREG, "batch_size": batch_size, "optimizer": {"name": "sgd", "lr": lr}}
        online, first = b_noise_path_ratios(config, range(seeds))
        table[f"B={batch_size}"] = {str(t): {"after": online[t], "before": first[t]} for t in online}
        goals = sorted(online, reverse=True)
        for i, threshold in enumerate(goals):
            for values, shift, marker, label in ((first[threshold], -0.12, "o", "first order (before)"),
                                                  (online[threshold], 0.12, "s", "second order (after)")):
                ax.plot(np.full(len(values), i + shift), values, marker, mfc="none" if shift < 0 else None,
                        color="C3" if shift < 0 else "C0", alpha=0.6, label=label if i == 0 else None)
                ax.plot([i + shift - 0.08, i + shift + 0.08], [np.mean(values)] * 2, "-",
                        color="C3" if shift < 0 else "C0", lw=2)
        ax.axhspan(0.9, 1.1, color="0.9", zorder=0, label="within 10%")
        ax.axhline(1.0, color="0.4", lw=1)
        ax.set_xticks(range(len(goals)), [f"excess loss {t:g}" for t in goals])
        ax.set_title(f"linreg d = 64, B = {batch_size}, lr {lr} ({seeds} seeds)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("B_noise path average / exact along the run")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("B_noise averaged along the path, in real runs: each seed (markers) and their mean (bars)", fontsize=10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
