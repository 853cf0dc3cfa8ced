"""What several test modules share: the repository, a small sweep, and launching it. Test modules
import from here (or conftest fixtures), never from one another."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A sweep of the digits task small enough for a test: 2 batch sizes x 2 lrs x 1 seed, easy goals.
SMALL = ["task=digits", "sweep.batch_sizes=[16,64]", "sweep.lr.count=2", "sweep.seeds=[0]",
         "goals.thresholds=[0.3,0.2]",
         "budget.max_steps=400", "launcher.threads=1"]

# Linreg where G^T H G swings by factors of e from step to step (d = 64) and B_noise is measured
# every step on 20 draws of its own: the regime of B_noise's second-order path average.
NOISY_LINREG = {"task": {"name": "linreg", "dim": 64, "target_scale": 10.0}, "device": "cpu",
                "smoothing": {"min_examples": 64},
                "goals": {"metric": "exact_excess_loss", "thresholds": [0.3, 0.1, 0.03]},
                "noise_scale": {"every": 1, "hessian_every": 1, "hessian_micro_batch": 128, "hessian_draws": 20,
                                "probe_batches": 0}}

# What analysis.pareto writes for one sweep.
TABLES = ("steps_to_goal.csv", "steps_by_lr.csv", "best_runs.csv", "tradeoff_fits.csv",
          "input_problems.csv", "summary.md")
FIGURES = ("pareto_fronts", "noise_scales", "lr_vs_batch", "steps_heatmap", "training_curves")


def wait_for(condition, timeout: float, what: str):
    """The first truthy value of condition(), polled every half second; fails after `timeout` s."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def launch(*overrides: str, timeout: float = 300, cwd=REPO, python: str = sys.executable) -> subprocess.CompletedProcess:
    """`python -m sweeps.launch OVERRIDES` in a subprocess."""
    return subprocess.run([python, "-m", "sweeps.launch", *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def compose(*overrides: str) -> dict:
    """The composed config of `python -m sweeps.launch OVERRIDES`, as plain containers."""
    from sweeps.schema import compose as compose_config

    return compose_config(overrides)


def launch_here(sweep_dir: Path, *overrides: str) -> int:
    """sweeps.launch in this process; the value NEWLINE stands for a string with a line break
    (which a Hydra override cannot write)."""
    from sweeps.launch import launch as launch_sweep

    cfg = compose(*overrides)
    extra = cfg.get("launcher", {}).get("additional_parameters") or {}
    for key, value in extra.items():
        if value == "NEWLINE":
            extra[key] = "END\n#SBATCH --exclusive"
    return launch_sweep(cfg, sweep_dir, overrides=list(overrides))


def exact_ideal_steps(config: dict, steps: int, scale: str) -> np.ndarray:
    """A linreg run's own trajectory, replayed here in float64 from its batches (its seed's stream
    of fresh samples), and the noise scale `scale` ("b_simple" or "b_noise", closed forms from
    tests/reference/linreg_dynamics) along it: the ideal steps sum_s 1/(1 + scale(w_s)/B) after
    0..steps steps (McCandlish et al. eq. 2.10-2.11); B (s/ideal(s) - 1) is the exact path
    average. Plain SGD only."""
    import torch

    from critbatch.tasks import build_task
    from tests.reference.linreg_dynamics import linreg_problem, noise_scales

    task_options = {k: v for k, v in config["task"].items() if k != "name"}
    assert config["optimizer"]["name"] == "sgd" and set(task_options) <= {"dim", "decay", "target_scale"}
    spectrum, w_star = linreg_problem(**task_options)
    task = build_task("linreg", **task_options)
    task.load("cpu")
    generator = torch.Generator().manual_seed(config["seed"])
    B, lr, w, ideal = config["batch_size"], config["optimizer"]["lr"], np.zeros(len(spectrum)), [0.0]
    for _ in range(steps):
        ideal.append(ideal[-1] + 1 / (1 + noise_scales(spectrum, w_star, 1.0, w)[scale] / B))
        x, y = (t.double().numpy() for t in task.sample(B, generator))
        w = w - lr * x.T @ (x @ w - y) / B
    return np.array(ideal)


def b_noise_path_ratios(config: dict, seeds) -> tuple[dict, dict]:
    """Linreg runs of `config` (seeds `seeds`) measured as they train: at every goal reached after
    20 steps or more whose B_noise path average is resolved (standard error at most 25%, as the
    analysis counts it), the path average over the exact one along the run's own trajectory, as
    recorded (critbatch.monitor.IdealSteps with each measurement's noise) and at first order (the
    same measurements, known when the goal was crossed, without their noise). Two dicts
    {threshold: [ratio per seed]}."""
    from critbatch.config import RunConfig
    from critbatch.monitor import IdealSteps, RunBook
    from critbatch.tradeoff import MAX_PATH_RELATIVE_SE
    from critbatch.train import Training

    online, first = {}, {}
    for seed in seeds:
        values = {**config, "seed": seed}
        run = RunConfig.from_dict(values)
        book = RunBook(run, None)
        Training([run], run.validate(), [book], packed=False).run()
        exact = exact_ideal_steps(values, book.summary.steps, "b_noise")
        measured, B = book.ideal_noise, run.batch_size
        for goal in book.goals:
            if not goal.reached or goal.censored or goal.step < 20 \
                    or not goal.b_noise_path_se <= MAX_PATH_RELATIVE_SE * goal.b_noise_path:
                continue
            path = B * (goal.step / np.interp(goal.step, np.arange(len(exact)), exact) - 1)
            online.setdefault(goal.threshold, []).append(goal.b_noise_path / path)
            plain = IdealSteps(B, run.noise_scale.relative_window, run.noise_scale.min_examples / B)
            for s, g, t, w in zip(measured.steps, measured.grad, measured.trace, measured.gaps):
                if s <= goal.noise_center_step or s <= goal.step:
                    plain.advance(s, g, t, w)
            first.setdefault(goal.threshold, []).append(plain.path_average(goal.step) / path)
    return online, first
