"""Bad settings raise ConfigError naming the field, before any training starts."""
from __future__ import annotations

import dataclasses
import math

import pytest

from critbatch import records
from critbatch.config import ConfigError, RunConfig
from critbatch.tasks import TASKS
from critbatch.train import train


def config(**changes) -> dict:
    values = {"task": {"name": "digits"}, "optimizer": {"name": "sgd", "lr": 0.1}, "batch_size": 32,
              "goals": {"metric": "train_error", "thresholds": [0.2, 0.1]}, "device": "cpu"}
    values.update(changes)
    return values


def test_defaults_and_a_good_config_validate():
    RunConfig.from_dict({})
    parsed = RunConfig.from_dict(config())
    assert parsed.optimizer.lr == 0.1 and parsed.batch_size == 32
    assert RunConfig.from_dict(parsed.to_dict()).to_dict() == parsed.to_dict()  # round-trips


BAD = [
    # (changes, field named in the message, other words the message must hold)
    ({"task": {"name": "imagenet"}}, "task.name", sorted(TASKS)),
    ({"task": "digits"}, "task", ["name"]),
    ({"task": {"name": "digits", "hiden": 64}}, "hiden", ["hidden"]),
    ({"task": {"name": "digits", "hidden": 0}}, "hidden", []),
    ({"optimizer": {"name": "lamb", "lr": 0.1}}, "optimizer.name", ["sgd", "momentum", "adam"]),
    ({"optimizer": "sgd"}, "optimizer", ["mapping"]),
    ({"batch_size": 0}, "batch_size", []),
    ({"batch_size": -8}, "batch_size", []),
    ({"batch_size": 32.0}, "batch_size", ["integer"]),
    ({"batch_size": "32"}, "batch_size", []),
    ({"batch_size": True}, "batch_size", []),
    ({"batch_size": 2000, "sampling": "epoch_shuffle"}, "batch_size", ["1797", "epoch_shuffle"]),
    ({"sampling": "shuffle"}, "sampling", ["with_replacement", "epoch_shuffle"]),
    ({"optimizer": {"name": "sgd", "lr": 0.0}}, "optimizer.lr", []),
    ({"optimizer": {"name": "sgd", "lr": -0.1}}, "optimizer.lr", []),
    ({"optimizer": {"name": "sgd", "lr": math.nan}}, "optimizer.lr", []),
    ({"optimizer": {"name": "sgd", "lr": math.inf}}, "optimizer.lr", []),
    ({"optimizer": {"name": "sgd", "lr": "0.1"}}, "optimizer.lr", []),
    ({"goals": {"metric": "train_error", "thresholds": [0.1, 0.2]}}, "goals.thresholds", ["decreasing"]),
    ({"goals": {"metric": "train_error", "thresholds": [0.1, 0.1]}}, "goals.thresholds", ["decreasing"]),
    ({"goals": {"metric": "train_error", "thresholds": []}}, "goals.thresholds", []),
    ({"goals": {"metric": "train_error", "thresholds": 0.1}}, "goals.thresholds", ["list"]),
    ({"goals": {"metric": "train_error", "thresholds": [0.2, math.nan]}}, "goals.thresholds", []),
    ({"goals": {"metric": "exact_loss", "thresholds": [0.2]}}, "goals.metric", ["train_error", "train_loss"]),
    ({"task": {"name": "linreg"}, "goals": {"metric": "train_error", "thresholds": [0.2]}},
     "goals.metric", ["exact_loss", "train_loss"]),
    ({"batchsize": 32}, "batchsize", ["batch_size"]),
    ({"optimizer": {"name": "sgd", "learning_rate": 0.1}}, "optimizer.learning_rate", ["optimizer.lr"]),
    ({"noise_scale": {"every": 10, "microbatches": 4}}, "noise_scale.microbatches", []),
    ({"noise_scale": {"micro_batches": 1}}, "micro_batches", []),
    ({"noise_scale": {"every": "10"}}, "every", []),
    ({"noise_scale": {"beta": 1.0}}, "beta", []),
    ({"budget": {"max_steps": 0}}, "budget.max_steps", []),
    ({"budget": {"max_steps": None}}, "budget", ["max_steps", "max_examples", "max_seconds"]),
    ({"seed": "0"}, "seed", []),
    ({"device": "tpu"}, "device", ["cpu", "cuda"]),
    ({"log": {"relative_interval": -0.1}}, "log.relative_interval", []),
    ({"divergence": {"loss_ratio": 1.0}}, "divergence.loss_ratio", []),
    ({"smoothing": {"relative_window": 0.0}}, "relative_window", []),
]


@pytest.mark.parametrize("changes, field, words", BAD, ids=[f"{c}" for c, _, _ in BAD])
def test_bad_setting_raises_config_error_naming_the_field(changes, field, words):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(config(**changes))
    message = str(info.value)
    assert field in message
    for word in words:
        assert str(word) in message, (word, message)


@pytest.mark.parametrize("changes, field, words", BAD[:12], ids=[f"{c}" for c, _, _ in BAD[:12]])
def test_train_rejects_bad_config_before_writing_anything(tmp_path, changes, field, words):
    with pytest.raises(ConfigError, match=field.split(".")[-1]):
        train(config(**changes), tmp_path / "run")
    assert not (tmp_path / "run" / records.RECORD_FILE).exists()


def test_batch_size_above_dataset_is_fine_with_replacement():
    RunConfig.from_dict(config(batch_size=4096, sampling="with_replacement"))


def test_a_parsed_config_cannot_be_edited_and_is_not_parsed_again():
    parsed = RunConfig.from_dict(config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.optimizer.lr = -1.0
    assert RunConfig.from_dict(parsed) is parsed


def test_task_defaults_come_from_the_task_constructor():
    """Options left out take the constructor's defaults, and are part of the run's identity."""
    parsed = RunConfig.from_dict(config(task={"name": "digits", "hidden": 16}))
    assert parsed.task == {"name": "digits", "hidden": 16, "depth": 1, "dropout": 0.0}
    spelled_out = RunConfig.from_dict(config(task={"name": "digits", "hidden": 16, "depth": 1}))
    assert records.run_id(parsed.to_dict()) == records.run_id(spelled_out.to_dict())


def test_more_micro_batches_than_examples_measures_per_example_norms():
    from critbatch.gns import noise_micro_batches

    parsed = RunConfig.from_dict(config(batch_size=8, noise_scale={"micro_batches": 64}))
    assert noise_micro_batches(parsed.batch_size, parsed.noise_scale.micro_batches) == 8
    with pytest.raises(ConfigError, match="batch_size=1 cannot measure the noise scale"):
        RunConfig.from_dict(config(batch_size=1))
