"""The paper's image tasks (mnist, fashion_mnist, svhn, cifar10) on small files in the real formats.

tests/fake_datasets.py writes idx / .mat / pickle files where torchvision looks for them, so the
tasks read them through the same torchvision code a downloaded dataset goes through.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from critbatch.config import ConfigError, RunConfig
from critbatch.tasks import DataMissingError, TaskError, build_task
from critbatch.tasks.models import RandomCropFlip
from critbatch.train import train
from tests import fake_datasets as fake

PAPER_TASKS = ("mnist", "fashion_mnist", "svhn", "cifar10")
SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "svhn": (3, 32, 32), "cifar10": (3, 32, 32)}
FULL_SIZES = {"mnist": 60_000, "fashion_mnist": 60_000, "svhn": 73_257, "cifar10": 50_000}
WRITTEN = 30  # training examples each fake dataset holds (cifar10: 6 in each of 5 batches)


def write_fake(name: str, root: Path, monkeypatch, accept_md5: bool = True):
    """Write a small `name` dataset under root; returns its training images (N,C,H,W uint8), labels."""
    if name in ("mnist", "fashion_mnist"):
        return fake.write_mnist(root, WRITTEN, folder={"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name],
                                seed=len(name))
    if name == "svhn":
        images, labels, md5 = fake.write_svhn(root, WRITTEN)
        if accept_md5:
            fake.accept_fake_svhn(monkeypatch, md5)
        return images, labels
    images, labels, sums = fake.write_cifar10(root, WRITTEN // 5)
    if accept_md5:
        fake.accept_fake_cifar10(monkeypatch, sums)
    return images, labels


# ------------------------------------------------------------------ reading the data

@pytest.mark.parametrize("name", PAPER_TASKS)
def test_reads_the_files_torchvision_reads(name, tmp_path, monkeypatch):
    images, labels = write_fake(name, tmp_path, monkeypatch)
    n = WRITTEN - 3  # the first n examples (for cifar10 they span all five batch files)
    task = build_task(name, data_dir=str(tmp_path), train_examples=n)
    task.check_data()
    task.load(torch.device("cpu"))

    assert task.inputs.shape == (n, *SHAPES[name]) and task.inputs.dtype == torch.float32
    assert task.targets.dtype == torch.long and task.targets.tolist() == labels[:n].tolist()
    # Normalised per channel with the exact mean and std of the pixels used ...
    pixels = images[:n].astype(np.float64) / 255
    np.testing.assert_allclose(task.mean.numpy(), pixels.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(task.std.numpy(), pixels.std(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(task.inputs.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)
    # ... and undoing it gives back every pixel that was written, in the same place.
    restored = (task.inputs * task.std.view(1, -1, 1, 1) + task.mean.view(1, -1, 1, 1)) * 255
    assert torch.equal(restored.round().to(torch.uint8), torch.from_numpy(images[:n]))


def test_svhn_label_10_is_digit_0(tmp_path, monkeypatch):
    images, labels = write_fake("svhn", tmp_path, monkeypatch)
    task = build_task("svhn", data_dir=str(tmp_path), train_examples=WRITTEN)
    task.load(torch.device("cpu"))
    assert labels[:2].tolist() == [0, 0] and task.targets[:2].tolist() == [0, 0]
    assert set(task.targets.tolist()) <= set(range(10))


@pytest.mark.parametrize("name", ["svhn", "cifar10"])
def test_corrupted_files_fail_torchvisions_md5_check_with_the_download_command(name, tmp_path, monkeypatch):
    # Without swapping in the fakes' md5 sums the files count as corrupted, which shows that
    # torchvision's integrity check is on the path the tasks read through.
    write_fake(name, tmp_path, monkeypatch, accept_md5=False)
    task = build_task(name, data_dir=str(tmp_path), train_examples=WRITTEN)
    task.check_data()  # the files exist ...
    with pytest.raises(DataMissingError, match=f"scripts/download_data.py .*--datasets {name}"):
        task.load(torch.device("cpu"))  # ... but are not the real ones


def test_fewer_examples_on_disk_than_expected_is_an_error(tmp_path, monkeypatch):
    write_fake("mnist", tmp_path, monkeypatch)
    task = build_task("mnist", data_dir=str(tmp_path))  # expects all 60000
    with pytest.raises(TaskError, match="30 training examples, fewer than the 60000"):
        task.load(torch.device("cpu"))


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_missing_dataset_names_the_download_command(name, tmp_path):
    data_dir = str(tmp_path / "nowhere")
    config = RunConfig.from_dict({"task": {"name": name, "data_dir": data_dir}})
    config.validate()  # building the task needs no data
    with pytest.raises(ConfigError) as info:
        config.validate(check_data=True)
    assert f"python scripts/download_data.py --data-dir {data_dir} --datasets {name}" in str(info.value)


def test_incomplete_dataset_names_the_missing_file(tmp_path, monkeypatch):
    write_fake("mnist", tmp_path, monkeypatch)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()  # torchvision needs it too
    with pytest.raises(DataMissingError, match="t10k-labels-idx1-ubyte"):
        build_task("mnist", data_dir=str(tmp_path)).check_data()


# ------------------------------------------------------------------ options

@pytest.mark.parametrize("name", PAPER_TASKS)
def test_sizes_are_known_without_data(name):
    assert build_task(name, data_dir="/nonexistent").dataset_size == FULL_SIZES[name]
    assert build_task(name, data_dir="/nonexistent", train_examples=100).dataset_size == 100
    assert build_task(name, data_dir="/nonexistent", train_examples=10**9).dataset_size == FULL_SIZES[name]


@pytest.mark.parametrize("name, options", [
    ("mnist", {"train_examples": 0}), ("mnist", {"train_examples": 2.5}), ("svhn", {"dropout": 1.0}),
    ("fashion_mnist", {"augment": "yes"}), ("cifar10", {"depth": 31}), ("cifar10", {"dropout": 0.4}),
])
def test_bad_options_are_refused(name, options):
    with pytest.raises(TaskError):
        build_task(name, **options)


# ------------------------------------------------------------------ models

def cnn_params(channels: int, side: int) -> int:
    return ((5 * 5 * channels * 32 + 32) + (5 * 5 * 32 * 64 + 64)
            + ((side // 4) ** 2 * 64 * 1024 + 1024) + (1024 * 10 + 10))


def resnet_params(n: int) -> int:
    """Bias-free 3x3 convs, BatchNorm (2 per channel), option-A shortcuts (no parameters)."""
    total = 3 * 3 * 3 * 16 + 2 * 16  # stem
    width = 16
    for out in (16, 32, 64):
        for _ in range(n):
            total += 3 * 3 * width * out + 3 * 3 * out * out + 2 * (2 * out)
            width = out
    return total + 64 * 10 + 10


EXPECTED_PARAMS = {"mnist": cnn_params(1, 28), "fashion_mnist": cnn_params(1, 28),
                   "svhn": cnn_params(3, 32), "cifar10": resnet_params(5)}


def test_parameter_counts_by_hand():
    assert EXPECTED_PARAMS == {"mnist": 3_274_634, "fashion_mnist": 3_274_634,
                               "svhn": 4_259_274, "cifar10": 464_154}  # ResNet-32: the paper's "0.46M"


@pytest.mark.parametrize("name", PAPER_TASKS)
@pytest.mark.parametrize("augment", [False, True])
def test_models(name, augment):
    torch.manual_seed(0)
    model = build_task(name, augment=augment).make_model()
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]
    x = torch.randn(3, *SHAPES[name])
    assert model(x).shape == (3, 10)
    model.eval()
    assert model(x).shape == (3, 10)


def test_cnn_dropout_option_reaches_the_model():
    model = build_task("mnist", dropout=0.25).make_model()
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.25]


def test_augmentation_crops_and_flips_only_in_training():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5) + 1
    layer = RandomCropFlip(padding=2, flip=True)
    layer.eval()
    assert torch.equal(layer(x), x)
    layer.train()
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for _ in range(20):
        out = layer(x)
        assert out.shape == x.shape
        for i in range(2):  # every output image is a 5x5 window of the padded image, maybe mirrored
            windows = [padded[i, :, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
            assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    assert len({tuple(layer(x).flatten().tolist()) for _ in range(20)}) > 1  # random, not one fixed crop


# ------------------------------------------------------------------ training and download

@pytest.mark.parametrize("name, options", [
    pytest.param(name, {}, marks=[pytest.mark.slow] if name != "mnist" else [])  # mnist: the fast tier's one
    for name in PAPER_TASKS] + [pytest.param("cifar10", {"augment": True, "depth": 8}, marks=pytest.mark.slow)])
def test_two_training_steps_write_a_record(name, options, tmp_path, monkeypatch):
    write_fake(name, tmp_path / "data", monkeypatch)
    task = {"name": name, "data_dir": str(tmp_path / "data"), "train_examples": WRITTEN, **options}
    # small probes and no B_noise: on random fake data B_simple is never resolved, so the default
    # probes at initialisation (200 batches of 512; B_noise on micro-batches of 4096) would take
    # minutes of a CNN on a CPU (tests/test_curvature.py checks B_noise)
    record = train(dict(task=task, batch_size=8, budget={"max_steps": 2}, device="cpu",
                        noise_scale={"probe_batch_size": 8, "hessian_every": 0}), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == on_disk["status"] == "budget_exhausted"
    assert on_disk["summary"]["steps"] == 2 and on_disk["config"]["task"].items() >= task.items()
    assert all(np.isfinite(on_disk["curve"]["train_loss"][1:]))


def load_download_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "download_data.py"
    spec = importlib.util.spec_from_file_location("download_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_script_skips_present_data_and_explains_a_failed_download(tmp_path, monkeypatch, capsys):
    import torchvision.datasets

    script = load_download_script()
    write_fake("mnist", tmp_path, monkeypatch)
    assert script.main(["--data-dir", str(tmp_path), "--datasets", "mnist"]) == 0
    assert "mnist: already present" in capsys.readouterr().out

    def offline(self):  # what torchvision raises when every mirror is unreachable
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -3]>")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    assert script.main(["--data-dir", str(tmp_path), "--datasets", "mnist", "fashion_mnist"]) == 1
    err = capsys.readouterr().err
    assert "fashion_mnist: download FAILED" in err and "no internet access" in err
