"""The packed fast path gives each member the result of its plain twin, and drops finished members."""
from __future__ import annotations

import dataclasses

import math

import pytest
import torch
from torch import nn

from critbatch import records
from critbatch.config import RunConfig
from critbatch.packed import PackedOptimizer
from critbatch.micro_grads import has_batchnorm
from critbatch.train import train, train_pack
from sweeps.jobs import packs, run_group

LRS = {"sgd": [0.1, 0.8, 50.0], "momentum": [0.02, 0.1, 5.0], "adam": [0.002, 0.01, 1.0]}


def digits_configs(optimizer: str, batch_size: int = 32, **extra) -> list[dict]:
    base = {"task": {"name": "digits", "hidden": 32}, "batch_size": batch_size, "device": "cpu",
            "goals": {"metric": "train_error", "thresholds": [0.3, 0.1, 0.05]}, "budget": {"max_steps": 600},
            **extra}
    return [{**base, "optimizer": {"name": optimizer, "lr": lr}} for lr in LRS[optimizer]]


def assert_same_run(plain: dict, packed: dict) -> None:
    assert packed["status"] == plain["status"]
    assert packed["summary"]["steps"] == plain["summary"]["steps"]
    for a, b in zip(plain["goals"], packed["goals"]):
        assert (a["reached"], a["censored"]) == (b["reached"], b["censored"])
        if a["reached"] and not a["censored"]:
            assert b["step"] == pytest.approx(a["step"], abs=1e-3)
            assert b["b_simple"] == pytest.approx(a["b_simple"], rel=1e-3)
    for key in ("step", "train_loss", "train_error", "b_simple", "exact_loss"):
        if key in plain["curve"]:
            x, y = torch.tensor(plain["curve"][key], dtype=torch.float64), torch.tensor(packed["curve"][key], dtype=torch.float64)
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6, equal_nan=True), key


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_packed_members_equal_their_plain_twins(optimizer):
    configs = digits_configs(optimizer)
    plain = [train(c) for c in configs]
    packed = train_pack(configs, [None] * len(configs))
    assert {r["status"] for r in plain} >= {records.COMPLETED, records.DIVERGED}  # the pack mixes fates
    for a, b in zip(plain, packed):
        assert_same_run(a, b)
    assert all(r["summary"]["path"] == "packed" for r in packed)


def test_packed_evaluated_goals_and_epoch_shuffling():
    # linreg's goals are a closed-form metric evaluated per member at the logged steps.
    base = {"task": {"name": "linreg", "dim": 16}, "batch_size": 16, "device": "cpu",
            "goals": {"metric": "exact_excess_loss", "thresholds": [1.0, 0.3]}, "budget": {"max_steps": 800}}
    configs = [{**base, "optimizer": {"name": "sgd", "lr": lr}} for lr in (0.05, 0.2, 0.6)]
    for a, b in zip([train(c) for c in configs], train_pack(configs, [None] * 3)):
        assert_same_run(a, b)
    shuffled = digits_configs("sgd", batch_size=64, sampling="epoch_shuffle")
    for a, b in zip([train(c) for c in shuffled], train_pack(shuffled, [None] * 3)):
        assert_same_run(a, b)


def test_finished_and_diverged_members_stop_costing_compute(monkeypatch):
    members_per_step = []
    original = PackedOptimizer.step

    def counting_step(self, params, grads):
        members_per_step.append(next(iter(params.values())).shape[0])
        return original(self, params, grads)

    monkeypatch.setattr(PackedOptimizer, "step", counting_step)
    packed = train_pack(digits_configs("sgd"), [None] * 3)
    steps = [r["summary"]["steps"] for r in packed]
    assert len(set(steps)) == 3  # diverged early, finished fast, finished slowly
    # Every member-step computed belongs to a member still running at that step.
    assert sum(members_per_step) == sum(steps)
    assert members_per_step[0] == 3 and members_per_step[-1] == 1


def test_batchnorm_models_are_not_packable():
    assert has_batchnorm(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert not has_batchnorm(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)))


def test_packs_follow_the_config():
    small, large = ([RunConfig.from_dict(c) for c in digits_configs("sgd", batch_size=b)] for b in (32, 1024))
    packing = {"enabled": True, "max_batch_size": 256, "max_members": 2}
    groups = packs(small + large, packing)
    # a pack of one trains plain
    assert sorted((len(g), packed) for g, packed in groups) == [(1, False)] * 4 + [(2, True)]
    assert all(not packed for g, packed in groups if g[0].batch_size == 1024)  # large B: alone
    assert packs(small, {"enabled": False}) == [([c], False) for c in small]
    mixed = small[:1] + [dataclasses.replace(small[1], seed=7)]  # another seed: another batch stream, not packable
    assert [len(g) for g, _ in packs(mixed, packing)] == [1, 1]


def test_a_sweep_group_gives_the_same_records_packed_or_not(tmp_path):
    configs = digits_configs("momentum", batch_size=16)
    plain_summaries = run_group(str(tmp_path / "plain"), configs, packing={"enabled": False})
    packed_summaries = run_group(str(tmp_path / "packed"), configs, packing={"enabled": True, "max_batch_size": 256})
    assert {s["path"] for s in plain_summaries} == {"plain"} and {s["path"] for s in packed_summaries} == {"packed"}
    plain = records.load_sweep(tmp_path / "plain").sort_values(["run_id", "goal_threshold"])
    packed = records.load_sweep(tmp_path / "packed").sort_values(["run_id", "goal_threshold"])
    assert plain["run_id"].tolist() == packed["run_id"].tolist()
    assert plain["status"].tolist() == packed["status"].tolist()
    for a, b in zip(plain["steps"], packed["steps"]):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-3)


def test_packed_members_measure_b_noise_on_their_own_batches_as_their_plain_twins():
    """B_noise on batches of its own (noise_scale.hessian_micro_batch): the packed members draw the
    same batches and integrate the same path average as their plain twins."""
    base = {"task": {"name": "linreg", "dim": 16}, "batch_size": 16, "device": "cpu",
            "goals": {"metric": "exact_excess_loss", "thresholds": [1.0, 0.3]}, "budget": {"max_steps": 400},
            "noise_scale": {"hessian_every": 1, "hessian_micro_batch": 32, "hessian_draws": 2}}
    configs = [{**base, "optimizer": {"name": "sgd", "lr": lr}} for lr in (0.1, 0.3)]
    checked = 0
    for a, b in zip([train(c) for c in configs], train_pack(configs, [None] * 2)):
        assert_same_run(a, b)
        for x, y in zip(a["goals"], b["goals"]):
            if x["reached"] and not x["censored"]:
                assert math.isfinite(x["b_noise_path"]) and y["b_noise_path"] == pytest.approx(x["b_noise_path"], rel=1e-3)
                checked += 1
    assert checked >= 3
