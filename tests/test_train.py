"""One training run: goal-step resolution, divergence, budget, determinism, crash safety, sampling,
and that measuring the noise scale leaves the parameter updates unchanged."""
from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import lru_cache

import numpy as np
import pytest
import torch
from scipy import stats

from critbatch import records
from critbatch.config import RunConfig
from critbatch.tasks import build_task
from critbatch.tasks.digits import Digits
from critbatch.monitor import GoalCrossings, SmoothedMetrics
from critbatch.batches import BatchSampler
from critbatch.train import train


# Isotropic, nearly noiseless linear regression: the loss falls by orders of magnitude, so a goal's
# crossing step is well defined (the curve is steep in log-step) and exact_loss is known at every step.
LINREG = {"name": "linreg", "dim": 16, "decay": 0.0, "noise_std": 0.1, "target_scale": 10.0}
LINREG_GOALS = [2.0, 0.5, 0.1]
LINREG_LR = {8: 0.005, 512: 0.02}  # a few hundred steps at B=8, ~130 at B=512


def linreg_config(batch_size, metric="exact_loss", relative_interval=0.0, seed=0, **extra):
    config = {"task": dict(LINREG), "optimizer": {"name": "sgd", "lr": LINREG_LR[batch_size]},
              "batch_size": batch_size, "seed": seed, "device": "cpu",
              "goals": {"metric": metric, "thresholds": LINREG_GOALS},
              "budget": {"max_steps": 20_000}, "log": {"relative_interval": relative_interval}}
    config.update(extra)
    return config


@lru_cache(maxsize=None)
def _cached_run(config_json: str) -> str:
    return json.dumps(train(json.loads(config_json)))


def run(config: dict) -> dict:
    """train(config), cached: several tests look at the same runs. Returns a fresh copy."""
    return json.loads(_cached_run(json.dumps(config, sort_keys=True)))


def first_crossing(steps, values, threshold) -> int:
    """The first logged step whose value is <= threshold: the truth when every step is logged."""
    below = np.nonzero(np.asarray(values, dtype=float) <= threshold)[0]
    assert len(below), f"the curve never reaches {threshold}"
    return int(np.asarray(steps)[below[0]])


# ---------------------------------------------------------------------------------------------
# goal-step resolution
# ---------------------------------------------------------------------------------------------

def test_relative_interval_zero_logs_every_step():
    record = run(linreg_config(512))
    steps = record["curve"]["step"]
    assert steps == list(range(len(steps)))
    assert steps[-1] == record["summary"]["steps"]


def smoothing_tolerance(config: dict, truth: float) -> float:
    """How far a smoothed metric's crossing may lie from the true one: the EMA's lag is removed by
    its centre step to first order; what remains is bounded by the window, relative_window * step
    but never fewer than min_examples / B steps. Allow twice the relative window plus the minimum."""
    smoothing = RunConfig.from_dict(config).smoothing
    return 2 * smoothing.relative_window * truth + smoothing.min_examples / config["batch_size"] + 1


@pytest.mark.parametrize("batch_size", [8, 512])
def test_eval_metric_goal_step_evaluated_every_step(batch_size):
    """exact_loss evaluated at every step (eval_relative_interval 0) and smoothed like a batch
    metric: the recorded crossing is within the smoothing tolerance of the first step whose exact
    loss meets the goal, and is never the first valid value (that would be censored)."""
    config = linreg_config(batch_size, "exact_loss", smoothing={"eval_relative_interval": 0.0})
    record = run(config)
    assert record["status"] == records.COMPLETED
    curve = record["curve"]
    for goal in record["goals"]:
        truth = first_crossing(curve["step"], curve["exact_loss"], goal["threshold"])
        assert goal["reached"] and not goal["censored"]
        assert abs(goal["step"] - truth) <= smoothing_tolerance(config, truth), (goal, truth)
        assert goal["examples"] == pytest.approx(goal["step"] * batch_size)


@pytest.mark.parametrize("batch_size", [8, 512])
def test_train_loss_goal_step_within_smoothing_error(batch_size):
    """Goals on the smoothed training loss: the expected batch loss IS exact_loss at that step, so
    the first step where exact_loss meets the goal is the truth. The EMA's lag is corrected by its
    centre step; what remains is bounded by the window: relative_window * step, but never fewer
    than min_examples / B steps. Allow twice the relative window plus the minimum window."""
    config = linreg_config(batch_size, "train_loss")
    smoothing = RunConfig.from_dict(config).smoothing
    record = run(config)
    truth_run = run(linreg_config(batch_size, "exact_loss"))  # same seed, so the same trajectory
    assert record["status"] == records.COMPLETED
    n = len(truth_run["curve"]["step"])
    assert record["curve"]["exact_loss"][:n] == truth_run["curve"]["exact_loss"][:n]
    curve = record["curve"]  # logged at every step, and it runs on past the last goal
    min_window = smoothing.min_examples / batch_size
    for goal in record["goals"]:
        truth = first_crossing(curve["step"], curve["exact_loss"], goal["threshold"])
        tolerance = 2 * smoothing.relative_window * truth + min_window + 1
        assert abs(goal["step"] - truth) <= tolerance, (goal, truth, tolerance)
        # goals are never judged on fewer than min_examples examples
        assert goal["step"] >= (min_window - 1) / 2
    # the test is not vacuous: the goals are crossed late enough that the relative window matters
    assert min(first_crossing(curve["step"], curve["exact_loss"], t) for t in LINREG_GOALS) > 50


@pytest.mark.parametrize("batch_size", [8, 512])
def test_eval_goal_does_not_depend_on_the_logging_interval(batch_size):
    """Default logging (every 5% of the steps) records fewer curve points than logging every step,
    but evaluated goals are judged on their own schedule: the same crossings either way, and the
    same trajectory at every logged step."""
    truth_run = run(linreg_config(batch_size, "exact_loss", relative_interval=0.0))
    config = linreg_config(batch_size, "exact_loss", relative_interval=0.05)
    interval = RunConfig.from_dict(config).log.relative_interval
    record = run(config)
    steps = record["curve"]["step"]
    # geometric: each logged step is at most `interval` beyond the previous one (or the next step)
    assert all(b - a <= max(1, interval * a) for a, b in zip(steps, steps[1:-1]))
    assert len(steps) < 0.6 * len(truth_run["curve"]["step"])
    every = truth_run["curve"]
    assert [every["exact_loss"][s] for s in steps if s < len(every["step"])] == \
        [v for s, v in zip(steps, record["curve"]["exact_loss"]) if s < len(every["step"])]
    assert [g["step"] for g in record["goals"]] == [g["step"] for g in truth_run["goals"]]


@pytest.mark.parametrize("batch_size", [1, 64])
def test_smoothed_metric_lag_is_removed_to_first_order(batch_size):
    """On a noiseless, linearly falling metric the EMA lags by its window (here up to ~100 steps),
    but its centre step removes the lag exactly: the goal steps are the true crossings."""
    relative_window, min_examples = 0.05, 64
    smoothed = SmoothedMetrics(["loss"], 1, batch_size, relative_window, min_examples, "cpu")
    thresholds = [4950.0, 4500.0, 3000.0]
    goals = GoalCrossings(thresholds, 1, "cpu")
    lag = []
    for step in range(2300):
        smoothed.update({"loss": torch.tensor(5000.0 - step)}, step)
        if smoothed.ready:
            goals.update(smoothed.values[:, 0], smoothed.center_step)
        lag.append(step - smoothed.center_step)
    crossed = dict(enumerate(goals.crossed_at[0].tolist()))
    assert all(s >= 0 for s in crossed.values())
    for i, threshold in enumerate(thresholds):
        truth = 5000.0 - threshold  # interpolated between the centres around it
        assert crossed[i] == pytest.approx(truth, abs=0.01)
    assert max(lag) > 50  # the uncorrected EMA would be this late


def test_goals_wait_for_min_examples():
    """At B=1 a single example's loss is chi-square distributed: half the time it is below half
    the expected loss. Judged on one batch, a goal at half the initial loss would be 'reached' at
    step 0; with the min_examples window it is not reached while the loss has not moved."""
    task = build_task("linreg", **{k: v for k, v in LINREG.items() if k != "name"})
    initial = task.exact(torch.zeros(LINREG["dim"]))["exact_loss"]
    for seed in range(4):
        config = {"task": dict(LINREG), "optimizer": {"name": "sgd", "lr": 1e-7}, "batch_size": 1,
                  "seed": seed, "device": "cpu", "noise_scale": {"enabled": False},
                  "goals": {"metric": "train_loss", "thresholds": [0.5 * initial]},
                  "budget": {"max_steps": 600}}
        record = train(config)
        assert record["status"] == records.BUDGET_EXHAUSTED
        assert not record["goals"][0]["reached"]


# ---------------------------------------------------------------------------------------------
# divergence, budget
# ---------------------------------------------------------------------------------------------

def test_healthy_small_batch_run_is_not_called_diverged():
    """Divergence is judged against the initial model's mean loss over min_examples examples. Were
    it the first batch's loss, a B=1 run whose first example happens to fit well (chi-square: a
    loss below 1/10 of the mean has probability ~1/4) would be called diverged at once."""
    for seed in range(6):
        config = {"task": dict(LINREG), "optimizer": {"name": "sgd", "lr": 1e-7}, "batch_size": 1,
                  "seed": seed, "device": "cpu", "noise_scale": {"enabled": False},
                  "goals": {"metric": "exact_loss", "thresholds": [1e-6]}, "budget": {"max_steps": 300}}
        record = train(config)
        assert record["status"] == records.BUDGET_EXHAUSTED, (seed, record["summary"]["reason"])


def digits_config(**extra):
    config = {"task": {"name": "digits", "hidden": 32}, "optimizer": {"name": "sgd", "lr": 0.1},
              "batch_size": 32, "seed": 0, "device": "cpu",
              "goals": {"metric": "train_error", "thresholds": [0.5, 0.2]},
              "budget": {"max_steps": 2000}}
    config.update(extra)
    return config


def test_huge_lr_diverges_with_reason(tmp_path):
    record = train(digits_config(optimizer={"name": "sgd", "lr": 100.0}), tmp_path)
    assert record["status"] == records.DIVERGED
    assert "loss" in record["summary"]["reason"]
    assert record["summary"]["steps"] < 100  # noticed early, not at the end of the budget
    assert all(not g["reached"] and g.get("step") is None for g in record["goals"])
    on_disk = records.read_record(tmp_path / records.RECORD_FILE)
    assert on_disk["status"] == records.DIVERGED
    frame = records.load_sweep(tmp_path)
    assert list(frame["status"]) == [records.DIVERGED] * 2
    assert not frame["reached"].any() and frame["steps"].isna().all()


@pytest.mark.parametrize("budget, steps", [({"max_steps": 25}, 25),
                                           ({"max_steps": None, "max_examples": 790}, 25)])
def test_budget_exhausted(budget, steps):
    record = train(digits_config(budget=budget, goals={"metric": "train_error", "thresholds": [0.001]}))
    assert record["status"] == records.BUDGET_EXHAUSTED
    assert "budget" in record["summary"]["reason"]
    assert record["summary"]["steps"] == steps
    assert record["curve"]["step"][-1] == steps
    assert not record["goals"][0]["reached"]


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------

TIMING = {"wall_time", "setup_seconds"}


def without_timing(record: dict) -> dict:
    record = copy.deepcopy(record)
    for key in TIMING:
        record["summary"].pop(key, None)
        record["curve"].pop(key, None)
    for goal in record["goals"]:
        goal.pop("wall_time", None)
    return record


def test_same_seed_same_record_different_seed_differs(tmp_path):
    config = digits_config(budget={"max_steps": 120})
    paths = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train({**config, "seed": seed}, tmp_path / name)
        paths.append(tmp_path / name / records.RECORD_FILE)
    a, b, c = (without_timing(records.read_record(p)) for p in paths)
    assert any(g["reached"] for g in a["goals"])  # goal entries (with b_simple) are compared too
    assert math.isfinite(a["goals"][0]["b_simple"])
    assert a == b
    assert a["curve"]["train_loss"] != c["curve"]["train_loss"]
    assert a["run_id"] != c["run_id"]


# ---------------------------------------------------------------------------------------------
# measuring the noise scale does not change training
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("every", [1, 10])
def test_noise_scale_measurement_leaves_updates_unchanged(monkeypatch, every):
    models = []
    make_model = Digits.make_model

    def keep_model(self):
        model = make_model(self)
        if next(model.parameters()).device.type != "meta":  # not the architecture-only checks
            models.append(model)
        return model

    monkeypatch.setattr(Digits, "make_model", keep_model)
    base = digits_config(optimizer={"name": "momentum", "lr": 0.05}, budget={"max_steps": 60},
                         goals={"metric": "train_error", "thresholds": [0.001]})
    off = train({**base, "noise_scale": {"enabled": False}})
    on = train({**base, "noise_scale": {"enabled": True, "every": every, "micro_batches": 4}})
    assert on["summary"]["noise_micro_batches"] == 4 and off["summary"]["noise_micro_batches"] == 1
    assert on["curve"]["b_simple"][-1] > 0  # it did measure
    assert all(math.isnan(v) for v in off["curve"]["b_simple"])
    model_off, model_on = models
    moved = 0.0
    for p_off, p_on, p_init in zip(model_off.parameters(), model_on.parameters(),
                                   Digits(hidden=32).make_model().parameters()):
        torch.testing.assert_close(p_on, p_off, rtol=1e-4, atol=1e-6)
        moved = max(moved, float((p_off - p_init).detach().abs().max()))
    assert moved > 1e-2  # the parameters did move, so the comparison means something
    np.testing.assert_allclose(on["curve"]["train_loss"][1:], off["curve"]["train_loss"][1:], rtol=1e-4)


def test_recorded_b_simple_matches_exact_on_linreg():
    """The B_simple that a run records (micro-batch sizes wired through train) agrees with the
    closed form, within 4 standard errors estimated from the spread over seeds. The lr is tiny, so
    the weights (and the truth) stay put; the window spans the whole run."""
    estimates, exact = [], []
    for seed in range(6):
        config = {"task": {"name": "linreg", "dim": 64, "decay": 1.0, "noise_std": 1.0, "target_scale": 10.0},
                  "optimizer": {"name": "sgd", "lr": 1e-6}, "batch_size": 128, "seed": seed, "device": "cpu",
                  "goals": {"metric": "exact_loss", "thresholds": [1e-6]}, "budget": {"max_steps": 150},
                  "noise_scale": {"every": 1, "micro_batches": 4, "relative_window": 1.0}}
        curve = train(config)["curve"]
        estimates.append(curve["b_simple"][-1])
        exact.append(curve["exact_b_simple"][-1])
    se = np.std(estimates, ddof=1) / math.sqrt(len(estimates))
    assert abs(np.mean(estimates) - np.mean(exact)) < 4 * se, (estimates, exact, se)
    assert se < 0.05 * np.mean(exact)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------

def test_epoch_shuffle_covers_every_example_once_per_epoch():
    size, batch_size, epochs = 10, 3, 6  # batches straddle epoch boundaries
    sampler = BatchSampler(size, batch_size, "epoch_shuffle", torch.Generator().manual_seed(0), "cpu")
    drawn = torch.cat([sampler.next() for _ in range(size * epochs // batch_size)])
    assert len(drawn) == size * epochs
    orders = drawn.reshape(epochs, size)
    for order in orders:
        assert sorted(order.tolist()) == list(range(size))
    assert len({tuple(o.tolist()) for o in orders}) > 1  # reshuffled every epoch


def test_epoch_shuffle_batch_equal_to_dataset():
    sampler = BatchSampler(7, 7, "epoch_shuffle", torch.Generator().manual_seed(0), "cpu")
    for _ in range(3):
        assert sorted(sampler.next().tolist()) == list(range(7))


def test_with_replacement_is_uniform_and_iid():
    size, batch_size = 10, 50
    sampler = BatchSampler(size, batch_size, "with_replacement", torch.Generator().manual_seed(0), "cpu")
    drawn = torch.cat([sampler.next() for _ in range(400)])
    counts = torch.bincount(drawn, minlength=size).numpy()
    assert stats.chisquare(counts).pvalue > 1e-4
    # repeats within a batch happen (with replacement): P(no repeat in 50 draws of 10) is ~0
    assert any(len(set(sampler.next().tolist())) < batch_size for _ in range(5))


def test_epoch_shuffle_training_run():
    record = train(digits_config(sampling="epoch_shuffle", batch_size=64, budget={"max_steps": 300}))
    assert record["status"] == records.COMPLETED


# ---------------------------------------------------------------------------------------------
# crash safety: a killed writer leaves the old record or none, never a torn one
# ---------------------------------------------------------------------------------------------

def _write_records_forever(path, seed, first_written):
    """Child process: rewrite a large record at `path` in a loop, each version self-consistent.
    The payload is a long string, so most of the time goes into writing the file itself."""
    rng = np.random.default_rng(seed)
    version = 0
    while True:
        version += 1
        size = int(rng.integers(4_000_000, 8_000_000))
        records.write_record(path, {"schema_version": records.SCHEMA_VERSION, "run_id": "x", "status": "running", "config": {},
                                    "goals": [], "summary": {"version": version, "size": size},
                                    "curve": {"blob": "abcdefgh"[version % 8] * size}})
        first_written.set()


def test_killed_writer_never_leaves_a_torn_record(tmp_path):
    """SIGKILL a process that keeps rewriting a large record, at random moments: the file is always
    the last complete version (strict JSON, valid schema, self-consistent), never a torn one.
    (A plain open-and-write fails this test: about half of the kills land inside the write.)"""
    context = multiprocessing.get_context("fork")  # no re-import of torch in the child: fast
    rng = np.random.default_rng(0)
    path = tmp_path / "runs" / "r" / records.RECORD_FILE
    versions = []
    for attempt in range(10):
        first_written = context.Event()
        writer = context.Process(target=_write_records_forever, args=(path, attempt, first_written))
        writer.start()
        try:
            assert first_written.wait(30)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.join()
        assert writer.exitcode == -signal.SIGKILL
        record = records.read_record(path)  # strict JSON with the schema's keys, or it raises
        assert len(record["curve"]["blob"]) == record["summary"]["size"]
        assert set(record["curve"]["blob"]) == {"abcdefgh"[record["summary"]["version"] % 8]}
        versions.append(record["summary"]["version"])
    assert max(versions) > 1  # killed mid-stream, after several rewrites
    # temp files of interrupted writes are never mistaken for records
    assert list(records.iter_record_paths(tmp_path)) == [path]
    with pytest.warns(UserWarning, match="partial record"):
        problems = records.load_sweep(tmp_path).attrs["problems"]
    assert [p["path"] for p in problems] == [str(path)]


TRAINER = textwrap.dedent("""
    import sys
    from critbatch.train import train
    train({"task": {"name": "linreg", "noise_std": 1.0}, "optimizer": {"name": "sgd", "lr": 0.01},
           "batch_size": 16, "device": "cpu", "goals": {"metric": "exact_loss", "thresholds": [0.1]},
           "budget": {"max_steps": 10**9}, "log": {"checkpoint_seconds": 0.05}}, sys.argv[1])
""")


def test_killed_training_job_leaves_a_partial_record_that_load_sweep_reports(tmp_path):
    finished_dir = tmp_path / "runs" / "finished"
    train(digits_config(budget={"max_steps": 10}), finished_dir)
    killed_dir = tmp_path / "runs" / "killed"
    path = killed_dir / records.RECORD_FILE
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-c", TRAINER, str(killed_dir)], env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait for a checkpoint written after training began
            if path.exists() and records.read_record(path)["summary"]["steps"] > 0:
                break
            assert job.poll() is None, "the training job ended on its own"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 60 s")
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    record = records.read_record(path)
    assert record["status"] == records.RUNNING
    assert record["curve"]["step"]
    assert not records.is_complete(path)
    with pytest.warns(UserWarning, match="partial record"):
        frame = records.load_sweep(tmp_path)
    assert set(frame["run_dir"]) == {str(finished_dir)}
    problems = frame.attrs["problems"]
    assert [p["path"] for p in problems] == [str(path)]
    assert "running" in problems[0]["problem"]
