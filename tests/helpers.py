"""What several test modules share: the repository, a small sweep, and launching it. Test modules
import from here (or conftest fixtures), never from one another."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A sweep of the digits task small enough for a test: 2 batch sizes x 2 lrs x 1 seed, easy goals,
# trained in the launching process (a worker process would spend 4 s importing torch for 1 s of
# training; the tests of workers set launcher.workers themselves).
SMALL = ["task=digits", "sweep.batch_sizes=[16,64]", "sweep.lr.count=2", "sweep.seeds=[0]",
         "goals.thresholds=[0.3,0.2]",
         "budget.max_steps=400", "launcher.threads=1", "launcher.workers=1"]

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


RUN_TIMING = {"wall_time", "setup_seconds", "pid", "host"}


def comparable(record: dict) -> dict:
    """The record as written (NaN as null), without what differs between any two runs (timings)
    or says how it ran (processes, the noise measurement's path)."""
    from critbatch import records

    record = json.loads(json.dumps(records._json_safe(record)))
    for key in RUN_TIMING | {"processes", "noise_measurement"}:
        record["summary"].pop(key, None)
        record["curve"].pop(key, None)
    for goal in record["goals"]:
        goal.pop("wall_time", None)
    return record


def assert_close(a, b, rtol: float, where: str = "record") -> tuple[float, str]:
    """Equal structure, equal strings and flags, numbers within rtol (relative to the larger of the
    two, at least 1e-3); returns the largest relative difference seen and where."""
    if isinstance(a, (dict, list)):
        assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
        if isinstance(a, dict):
            assert a.keys() == b.keys(), f"{where}: keys differ: {set(a) ^ set(b)}"
            pairs = [(a[k], b[k], f"{where}.{k}") for k in a]
        else:
            assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
            pairs = [(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
        return max([assert_close(x, y, rtol, w) for x, y, w in pairs] or [(0.0, where)])
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        difference = abs(a - b) / max(abs(a), abs(b), 1e-3)
        assert difference <= rtol, f"{where}: {a} != {b} (relative difference {difference:.2e} > {rtol})"
        return difference, where
    assert a == b, f"{where}: {a!r} != {b!r}"
    return 0.0, where


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


def _parent(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), None)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit() and _parent(int(entry.name)) == pid]


def descendants(pid: int) -> list[int]:
    """Every process `pid` started, and theirs, as now."""
    found = children(pid)
    return found + [d for child in found for d in descendants(child)]


def running(pids) -> list[int]:
    """Those of `pids` that still run (a zombie has ended: it waits only to be reaped)."""
    def alive(pid: int) -> bool:
        try:
            state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            return False
        return "zombie" not in state

    return [pid for pid in pids if alive(pid)]


def kill_leaves_nothing(process: subprocess.Popen, started: list[int], within: float) -> list[int]:
    """kill -9 `process`; those of `started` (what it started) still running `within` s later, [] if
    none. They are then killed, so that a failing test leaves no process to the next one."""
    import os
    import signal
    import time

    process.kill()
    process.wait(timeout=10)
    deadline = time.time() + within
    while running(started) and time.time() < deadline:
        time.sleep(0.2)
    left = running(started)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


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
