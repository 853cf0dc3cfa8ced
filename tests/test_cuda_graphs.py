"""The CUDA-graph replay of a packed step gives the eager step's results.

On any machine: with tests/graph_replay.py standing in for the CUDA graph (the step's ops recorded
once and replayed on the same tensors), whole packed runs equal their eager twins — which fails
for a step that keeps a changing value in Python. On a GPU (scripts/gpu_check.sh runs these where
one is lent): the same with real CUDA graphs."""
from __future__ import annotations

import json

import pytest
import torch

from torch import nn

import critbatch.cuda_graphs
from critbatch import records
import critbatch.train
from critbatch.config import ConfigError
from critbatch.cuda_graphs import GraphedStep, use_cuda_graphs
from critbatch.train import train_pack
from critbatch.tasks import registered_task
from critbatch.tasks.digits import Digits
from critbatch.train import train
from tests.graph_replay import ReplayedStep


class DigitsBatchNormDropout(Digits):
    """digits with BatchNorm (running statistics updated in place) and dropout (random numbers)."""

    def make_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.hidden), nn.BatchNorm1d(self.hidden), nn.ReLU(),
                             nn.Dropout(0.2), nn.Linear(self.hidden, 10))


@pytest.fixture(autouse=True, scope="module")
def batchnorm_dropout_task():
    """The task is registered for this module's tests only."""
    with registered_task("digits_batchnorm_dropout", DigitsBatchNormDropout):
        yield


def replaying(monkeypatch, module) -> list:
    """Make `module`'s loop replay its steps with tests/graph_replay.py in place of CUDA graphs;
    returns a list that grows by one per replay."""
    replays = []

    class CountingReplayedStep(ReplayedStep):
        def _capture(self):
            replay, outputs = super()._capture()
            return (lambda: (replays.append(1), replay())), outputs

    monkeypatch.setattr(critbatch.cuda_graphs, "GraphedStep", CountingReplayedStep)
    monkeypatch.setattr(module, "use_cuda_graphs", lambda setting, device, batch_size: True)
    return replays


def assert_same_records(eager: list[dict], replayed: list[dict]) -> None:
    for a, b in zip(eager, replayed):
        assert a["status"] == b["status"] and a["summary"]["steps"] == b["summary"]["steps"]
        # as written (NaN as null: an unmeasured value equals itself), without wall times
        untimed = [json.dumps(records._json_safe([{k: v for k, v in goal.items() if k != "wall_time"}
                                                  for goal in r["goals"]])) for r in (a, b)]
        assert untimed[0] == untimed[1]
        for key in ("train_loss", "train_error", "b_simple"):
            assert torch.allclose(torch.tensor(a["curve"][key], dtype=torch.float64),
                                  torch.tensor(b["curve"][key], dtype=torch.float64), equal_nan=True), key

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_the_setting_is_checked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_cuda_graphs("auto", cpu, 16) and not use_cuda_graphs(False, cuda, 16)
    assert use_cuda_graphs("auto", cuda, 1024) and not use_cuda_graphs("auto", cuda, 2048)  # large B: no gain
    assert use_cuda_graphs(True, cuda, 16384)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        use_cuda_graphs(True, cpu, 16)
    with pytest.raises(ConfigError, match="choose true, false or auto"):
        use_cuda_graphs("yes", cpu, 16)


def test_eager_graphed_step_runs_the_function():
    state = torch.zeros(3)

    def step(x):
        state.add_(x)
        return state * 2

    graphed = GraphedStep(step, use_graph=False)
    for i in range(5):
        out = graphed(torch.full((3,), float(i)))
    assert torch.equal(out, torch.full((3,), 20.0)) and not graphed.captured


def counting_steps(count_in_tensor: bool):
    """A step whose update depends on how many steps ran: the count lives in a tensor or in Python."""
    state, count = torch.zeros(3), {"python": 0, "tensor": torch.zeros(())}

    def step(x):
        if count_in_tensor:
            count["tensor"].add_(1)
            state.mul_(0.5).add_(x * count["tensor"])
        else:
            count["python"] += 1
            state.mul_(0.5).add_(x * count["python"])
        return state.norm()
    return step


@pytest.mark.parametrize("count_in_tensor", [True, False])
def test_replay_matches_eager_only_when_changing_values_live_in_tensors(count_in_tensor):
    torch.manual_seed(0)
    batches = [torch.randn(3) for _ in range(8)]
    eager_step, replayed = counting_steps(count_in_tensor), ReplayedStep(counting_steps(count_in_tensor), True)
    eager = [float(eager_step(x)) for x in batches]
    replays = [float(replayed(x)) for x in batches]
    assert replayed.captured
    assert (replays == pytest.approx(eager, rel=1e-6)) is count_in_tensor  # a Python count freezes at capture


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_packed_runs_with_replayed_steps_equal_eager_ones(optimizer, monkeypatch):
    base = {"task": {"name": "digits", "hidden": 32}, "batch_size": 32, "device": "cpu",
            "goals": {"metric": "train_error", "thresholds": [0.3, 0.1, 0.05]}, "budget": {"max_steps": 400}}
    lrs = {"sgd": [0.1, 0.8, 50.0], "momentum": [0.02, 0.1, 5.0], "adam": [0.002, 0.01, 1.0]}[optimizer]
    configs = [{**base, "optimizer": {"name": optimizer, "lr": lr}} for lr in lrs]
    eager = train_pack(configs, [None] * 3)
    replays = replaying(monkeypatch, critbatch.train)
    replayed = train_pack(configs, [None] * 3)
    assert len(replays) > 0.8 * max(r["summary"]["steps"] for r in replayed)  # most steps were replays
    assert len({r["summary"]["steps"] for r in replayed}) == 3  # members left: graphs captured again
    assert_same_records(eager, replayed)


# Adam's replay on the plain path needs torch.optim.Adam(capturable=True), which only CUDA allows:
# it is covered by the GPU test below.
@pytest.mark.parametrize("task,optimizer,lr", [("digits", "sgd", 0.5), ("digits", "momentum", 0.1),
                                               ("digits_batchnorm_dropout", "momentum", 0.05)])
def test_plain_runs_with_replayed_steps_equal_eager_ones(task, optimizer, lr, monkeypatch):
    config = {"task": {"name": task, "hidden": 32}, "batch_size": 32, "device": "cpu",
              "optimizer": {"name": optimizer, "lr": lr},
              "goals": {"metric": "train_error", "thresholds": [0.3, 0.1, 0.05]}, "budget": {"max_steps": 300}}
    eager = train(config)
    replays = replaying(monkeypatch, critbatch.train)
    replayed = train(config)
    # BatchNorm's micro-batch gradients take k passes (data-parallel statistics), the others one
    measurement = "k passes" if task == "digits_batchnorm_dropout" else "one pass"
    assert replayed["summary"]["cuda_graphs"] is True and replayed["summary"]["noise_measurement"] == measurement
    assert len(replays) > 0.8 * replayed["summary"]["steps"] > 0
    assert_same_records([eager], [replayed])


@needs_cuda
def test_a_replayed_step_follows_new_inputs_and_state():
    state = torch.zeros(4, device="cuda")
    count = torch.zeros((), device="cuda")

    def step(x):
        count.add_(1)
        state.mul_(0.5).add_(x * count)
        return {"state": state.clone(), "norm": state.norm()}

    graphed = GraphedStep(step, use_graph=True, warmup=2)
    expected = torch.zeros(4, device="cuda")
    for i in range(1, 9):
        x = torch.randn(4, device="cuda")
        out = graphed(x)
        expected = expected * 0.5 + x * i
        assert torch.allclose(out["state"], expected) and torch.allclose(out["norm"], expected.norm())
    assert graphed.captured and graphed.failure is None


@needs_cuda
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("optimizer,lrs", [("momentum", [0.02, 0.1, 5.0]), ("adam", [0.002, 0.01, 1.0])])
def test_runs_give_the_same_records_with_and_without_cuda_graphs(optimizer, lrs, packed):
    base = {"task": {"name": "digits", "hidden": 32}, "batch_size": 32, "device": "cuda",
            "goals": {"metric": "train_error", "thresholds": [0.3, 0.1, 0.05]}, "budget": {"max_steps": 600}}
    configs = [{**base, "optimizer": {"name": optimizer, "lr": lr}} for lr in lrs]
    run = (lambda cs: train_pack(cs, [None] * len(cs))) if packed else (lambda cs: [train(c) for c in cs])
    eager = run([{**c, "cuda_graphs": False} for c in configs])
    graphed = run([{**c, "cuda_graphs": True} for c in configs])
    assert all(r["summary"]["cuda_graphs"] is True and "cuda_graph_failure" not in r["summary"] for r in graphed)
    for a, b in zip(eager, graphed):
        assert a["status"] == b["status"] and a["summary"]["steps"] == b["summary"]["steps"]
        for goal_a, goal_b in zip(a["goals"], b["goals"]):
            assert goal_a["reached"] == goal_b["reached"]
            if goal_a["reached"]:
                assert goal_b["step"] == pytest.approx(goal_a["step"], abs=1e-3)
                assert goal_b["b_simple"] == pytest.approx(goal_a["b_simple"], rel=1e-3)
        for key in ("train_loss", "b_simple"):
            x = torch.tensor(a["curve"][key], dtype=torch.float64)
            y = torch.tensor(b["curve"][key], dtype=torch.float64)
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6, equal_nan=True), key
