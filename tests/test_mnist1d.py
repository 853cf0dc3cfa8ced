"""MNIST-1D: data generated offline by the `mnist1d` package and cached, the repository's CNN and
MLP, and training through critbatch.train.

Every test generates real data with the package, in a tmp_path data_dir. Small num_samples keep
the data tests fast; the accuracy tests use the standard 5,000 (4,000 training examples).
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from critbatch.config import ConfigError, RunConfig
from critbatch.tasks import TaskError, build_task, task_options
from critbatch.tasks.mnist1d import MNIST1D, train_examples
from critbatch.train import train

mnist1d_data = pytest.importorskip("mnist1d.data")
from mnist1d.utils import ObjectView  # noqa: E402

SMALL = 200  # examples: 160 training, 40 test


def package_dataset(num_samples: int, seed: int) -> dict:
    """What the package itself makes for these settings (its standard args otherwise)."""
    args = mnist1d_data.get_dataset_args(as_dict=True)
    args.update(num_samples=num_samples, seed=seed)
    return mnist1d_data.make_dataset(ObjectView(args))


def small_task(tmp_path, **options) -> MNIST1D:
    return build_task("mnist1d", data_dir=str(tmp_path / "data"), num_samples=options.pop("num_samples", SMALL),
                      **options)


# ------------------------------------------------------------------ generation

def test_generation_matches_the_package_and_is_deterministic(tmp_path):
    task = small_task(tmp_path, seed=7)
    first, second = task.generate(), task.generate()
    expected = package_dataset(SMALL, 7)
    for name in ("x", "y", "x_test", "y_test"):
        np.testing.assert_array_equal(first[name], expected[name])
        np.testing.assert_array_equal(second[name], expected[name])
    assert first["x"].shape == (160, 40) and first["x_test"].shape == (40, 40)
    # Another seed is other data: the seed option reaches make_dataset.
    assert not np.array_equal(small_task(tmp_path, seed=8).generate()["x"], first["x"])


def test_load_gives_the_package_data_as_tensors(tmp_path):
    task = small_task(tmp_path, seed=3)
    task.load(torch.device("cpu"))
    expected = package_dataset(SMALL, 3)
    assert task.inputs.shape == (160, 40) and task.inputs.dtype == torch.float32
    assert task.targets.dtype == torch.long and task.test_targets.dtype == torch.long
    assert task.test_inputs.shape == (40, 40)
    np.testing.assert_array_equal(task.inputs.numpy(), expected["x"].astype(np.float32))
    np.testing.assert_array_equal(task.targets.numpy(), expected["y"])
    np.testing.assert_array_equal(task.test_inputs.numpy(), expected["x_test"].astype(np.float32))
    np.testing.assert_array_equal(task.test_targets.numpy(), expected["y_test"])
    assert set(task.targets.tolist()) == set(range(10))


def test_generation_never_touches_the_network(tmp_path, monkeypatch):
    import socket

    def offline(*args, **kwargs):
        raise AssertionError("mnist1d data must be generated offline")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(mnist1d_data.requests, "get", offline)  # what get_dataset(download=True) calls
    task = small_task(tmp_path)
    task.check_data()
    task.load(torch.device("cpu"))
    assert task.inputs.shape == (160, 40)


def test_generating_leaves_the_global_random_generators_as_they_were(tmp_path):
    np.random.seed(123)
    random.seed(456)
    expected = (np.random.rand(3).tolist(), random.random())
    np.random.seed(123)
    random.seed(456)
    small_task(tmp_path).generate()  # make_dataset reseeds both generators with the data seed
    assert (np.random.rand(3).tolist(), random.random()) == expected


@pytest.mark.parametrize("num_samples", [10, 19, 37, 123, 1001])
def test_training_size_is_known_without_data_and_matches_the_split(num_samples, tmp_path):
    task = build_task("mnist1d", data_dir=str(tmp_path / "nowhere"), num_samples=num_samples)
    assert task.dataset_size == train_examples(num_samples)
    assert not (tmp_path / "nowhere").exists()  # building the task touched nothing
    assert len(package_dataset(num_samples, 42)["y"]) == task.dataset_size


def test_default_sizes():
    task = build_task("mnist1d", data_dir="/nonexistent")
    assert task.dataset_size == task.train_size == 4000
    assert task_options("mnist1d") == {"data_dir": "data", "num_samples": 5000, "seed": 42, "model": "mlp",
                                       "channels": 25, "hidden": 100}


# ------------------------------------------------------------------ the cache

def test_cache_is_written_with_its_settings_and_reused(tmp_path, monkeypatch):
    task = small_task(tmp_path, seed=5)
    task.load(torch.device("cpu"))
    path = tmp_path / "data" / "mnist1d" / f"mnist1d_n{SMALL}_seed5.npz"
    assert task.cache_file == path and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    with np.load(path) as stored:
        meta = json.loads(str(stored["meta"]))
    assert meta["settings"]["args"]["num_samples"] == SMALL and meta["settings"]["args"]["seed"] == 5
    assert meta["settings"]["args"]["padding"] == [36, 60] and "url" not in meta["settings"]["args"]
    assert meta["settings"]["mnist1d_version"] == "0.0.2.post1"
    mtime = path.stat().st_mtime_ns

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached data should have been used")

    monkeypatch.setattr(mnist1d_data, "make_dataset", no_generation)
    again = small_task(tmp_path, seed=5)
    again.load(torch.device("cpu"))
    again.check_data()
    assert path.stat().st_mtime_ns == mtime
    assert torch.equal(again.inputs, task.inputs) and torch.equal(again.test_targets, task.test_targets)


def test_a_cache_made_with_other_settings_is_regenerated(tmp_path):
    # Put seed 1's data where seed 2's belongs: its recorded settings say seed 1, so loading
    # seed 2 must regenerate rather than train on seed 1's data.
    one, two = small_task(tmp_path, seed=1), small_task(tmp_path, seed=2)
    one.check_data()
    two.cache_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(one.cache_file, two.cache_file)
    two.load(torch.device("cpu"))
    np.testing.assert_array_equal(two.inputs.numpy(), package_dataset(SMALL, 2)["x"].astype(np.float32))
    assert two.read_cache() is not None  # and the file now holds seed 2's data and settings
    with np.load(two.cache_file) as stored:
        assert json.loads(str(stored["meta"]))["settings"]["args"]["seed"] == 2


def test_a_cache_from_another_package_version_is_regenerated(tmp_path, monkeypatch):
    task = small_task(tmp_path)
    task.check_data()
    monkeypatch.setattr("critbatch.tasks.mnist1d._package_version", lambda: "9.9.9")
    assert task.read_cache() is None
    task.check_data()
    with np.load(task.cache_file) as stored:
        assert json.loads(str(stored["meta"]))["settings"]["mnist1d_version"] == "9.9.9"


def test_a_corrupted_cache_file_is_an_error_that_names_it(tmp_path):
    task = small_task(tmp_path)
    task.check_data()
    task.cache_file.write_bytes(task.cache_file.read_bytes()[:500])  # truncated
    with pytest.raises(TaskError, match="corrupted") as info:
        small_task(tmp_path).load(torch.device("cpu"))
    assert str(task.cache_file) in str(info.value) and "delete it" in str(info.value)


def test_a_cache_whose_arrays_fail_the_checksum_is_an_error(tmp_path):
    task = small_task(tmp_path)
    task.check_data()
    with np.load(task.cache_file) as stored:
        contents = {name: stored[name] for name in stored.files}
    contents["x"] = contents["x"].copy()
    contents["x"][0, 0] += 1.0  # readable, but not the data that was written
    with open(task.cache_file, "wb") as handle:
        np.savez(handle, **contents)
    with pytest.raises(TaskError, match="SHA-256") as info:
        small_task(tmp_path).check_data()
    assert str(task.cache_file) in str(info.value)


def _cannot_write(path) -> bool:
    try:
        (path / "probe").write_text("x")
    except OSError:
        return True
    (path / "probe").unlink()
    return False


@pytest.mark.parametrize("where", ["under_a_file", "read_only_dir"])
def test_an_unwritable_data_dir_is_an_error_that_names_it(where, tmp_path):
    if where == "under_a_file":
        (tmp_path / "afile").write_text("not a directory")
        data_dir = tmp_path / "afile" / "sub"  # cannot be created, whoever runs the test
    else:
        data_dir = tmp_path / "ro"
        data_dir.mkdir()
        data_dir.chmod(0o500)
        if not _cannot_write(data_dir):
            data_dir.chmod(0o700)
            pytest.skip("chmod does not stop this user (root) from writing; 'under_a_file' covers it")
    try:
        task = build_task("mnist1d", data_dir=str(data_dir), num_samples=SMALL)
        for check in (task.check_data, lambda: task.load(torch.device("cpu"))):
            with pytest.raises(TaskError, match="cannot write") as info:
                check()
            assert f"data_dir={str(data_dir)!r}" in str(info.value) and "writable directory" in str(info.value)
        # ... and a sweep sees it before it queues anything (RunConfig.validate(check_data=True)).
        config = RunConfig.from_dict({"task": {"name": "mnist1d", "data_dir": str(data_dir), "num_samples": SMALL}})
        with pytest.raises(ConfigError, match="cannot write"):
            config.validate(check_data=True)
    finally:
        if where == "read_only_dir":
            data_dir.chmod(0o700)


def test_check_data_generates_the_cache_for_the_sweep(tmp_path):
    config = RunConfig.from_dict({"task": {"name": "mnist1d", "data_dir": str(tmp_path / "data"),
                                           "num_samples": SMALL}})
    config.validate()
    assert not (tmp_path / "data").exists()  # building and validating the task reads and writes nothing
    config.validate(check_data=True)
    assert (tmp_path / "data" / "mnist1d" / f"mnist1d_n{SMALL}_seed42.npz").is_file()


# ------------------------------------------------------------------ options

@pytest.mark.parametrize("options, field", [
    ({"num_samples": 9}, "num_samples"), ({"num_samples": 0}, "num_samples"), ({"num_samples": 2.5e3}, "num_samples"),
    ({"num_samples": True}, "num_samples"), ({"seed": -1}, "seed"), ({"seed": 2 ** 32}, "seed"),
    ({"seed": "42"}, "seed"), ({"model": "rnn"}, "model"), ({"channels": -5}, "channels"),
    ({"channels": 0}, "channels"), ({"hidden": -1}, "hidden"), ({"hidden": 10.5}, "hidden"),
    ({"data_dir": ""}, "data_dir"),
])
def test_bad_options_name_the_option(options, field):
    with pytest.raises(TaskError, match=f"mnist1d: {field} "):
        build_task("mnist1d", **options)


def test_a_batch_larger_than_the_training_set_is_refused_before_any_data(tmp_path):
    task = {"name": "mnist1d", "data_dir": str(tmp_path / "data"), "num_samples": 100}  # 80 training examples
    with pytest.raises(ConfigError, match="batch_size=100 exceeds .* 80 training examples"):
        RunConfig.from_dict({"task": task, "batch_size": 100, "sampling": "epoch_shuffle"})
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------ models

def test_parameter_counts_by_hand():
    # CNN: conv1 1*25*5 + 25 = 150; conv2 and conv3 25*25*3 + 25 = 1,900 each; 40 points become
    # 19, 10, 5 (stride 2, padding 1), so the classifier is 125*10 + 10 = 1,260: 5,210 in all.
    cnn = 1 * 25 * 5 + 25 + 2 * (25 * 25 * 3 + 25) + 125 * 10 + 10
    # MLP: 40*100 + 100 + 100*100 + 100 + 100*10 + 10 = 15,210.
    mlp = 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    assert (cnn, mlp) == (5_210, 15_210)  # the counts the MNIST-1D repository's models print
    for model, expected in (("cnn", cnn), ("mlp", mlp)):
        net = build_task("mnist1d", model=model).make_model()
        assert sum(p.numel() for p in net.parameters()) == expected
        assert net(torch.randn(3, 40)).shape == (3, 10)
    assert sum(p.numel() for p in build_task("mnist1d", model="cnn", channels=8).make_model().parameters()) == (
        1 * 8 * 5 + 8 + 2 * (8 * 8 * 3 + 8) + 8 * 5 * 10 + 10)
    assert sum(p.numel() for p in build_task("mnist1d", model="mlp", hidden=32).make_model().parameters()) == (
        40 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10)


def test_cnn_layers_are_the_repositorys_convbase():
    net = build_task("mnist1d", model="cnn").make_model()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 25, (5,), (2,), (1,)), (25, 25, (3,), (2,), (1,)), (25, 25, (3,), (2,), (1,))]
    assert not any(isinstance(m, (torch.nn.Dropout, torch.nn.modules.batchnorm._BatchNorm)) for m in net.modules())
    # The classifier reads the features channel-major, as ConvBase's h3.view(N, -1) does.
    x = torch.randn(4, 40)
    h = x.view(-1, 1, 40)
    for conv in convs:
        h = conv(h).relu()
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][0]
    torch.testing.assert_close(net(x), linear(h.view(4, -1)))


def test_mlp_is_the_repositorys_mlpbase():
    net = build_task("mnist1d", model="mlp").make_model()
    x = torch.randn(4, 40)
    h = net.linear1(x).relu()
    h = h + net.linear2(h).relu()  # MLPBase adds the middle layer to its input
    torch.testing.assert_close(net(x), net.linear3(h))


# ------------------------------------------------------------------ accuracy

def train_like_the_repository(task: MNIST1D, model: str, seed: int = 42, steps: int = 6000):
    """The MNIST-1D repository's train_model as its quickstart runs it (notebooks/train.py,
    get_model_args with total_steps=6000): Adam lr 1e-2, no weight decay, batches of 100 taken in
    order from the 4,000 training examples (bix = step*100 % 4000), steps 0..6000, torch seed 42
    before the model is made. Returns test accuracy."""
    torch.manual_seed(seed)
    net = build_task("mnist1d", model=model).make_model()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=0)
    x, y = task.inputs, task.targets
    for step in range(steps + 1):
        start = (step * 100) % len(x)
        loss = F.cross_entropy(net(x[start:start + 100]), y[start:start + 100])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (net(task.test_inputs).argmax(1) == task.test_targets).float().mean().item()


@pytest.fixture(scope="module")
def standard_data(tmp_path_factory):
    task = build_task("mnist1d", data_dir=str(tmp_path_factory.mktemp("mnist1d")))  # 5,000 examples, seed 42
    task.load(torch.device("cpu"))
    return task


@pytest.mark.slow
def test_cnn_reaches_the_published_test_accuracy(standard_data):
    """The paper's table: CNN 94% test accuracy on MNIST-1D (the repository's quickstart run on a CPU
    printed 92.3% at step 6000; what it gives here: docs/tasks.md). Tolerance: at least 91%, and
    below 98% (far above the human 96% would mean test examples leaked into training)."""
    accuracy = train_like_the_repository(standard_data, "cnn")
    assert 0.91 <= accuracy < 0.98, accuracy


@pytest.mark.slow
def test_mlp_falls_far_short_of_the_cnn(standard_data):
    """The paper's table: MLP 68% (the quickstart's CPU run: 64.6%). Tolerance: 58% to 75%; the
    CNN-MLP gap of about 28 points is the spatial structure that MNIST-1D exists to show."""
    accuracy = train_like_the_repository(standard_data, "mlp")
    assert 0.58 <= accuracy <= 0.75, accuracy


# ------------------------------------------------------------------ critbatch.train

@pytest.mark.parametrize("model", [pytest.param("cnn", marks=pytest.mark.slow), "mlp"])
def test_training_steps_write_a_record(model, tmp_path):
    task = {"name": "mnist1d", "data_dir": str(tmp_path / "data"), "num_samples": SMALL, "model": model}
    record = train(dict(task=task, batch_size=8, budget={"max_steps": 3}, device="cpu"), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == on_disk["status"] == "budget_exhausted"
    assert on_disk["summary"]["steps"] == 3 and on_disk["config"]["task"].items() >= task.items()
    assert all(np.isfinite(on_disk["curve"]["train_loss"][1:]))
    assert os.path.isfile(tmp_path / "data" / "mnist1d" / f"mnist1d_n{SMALL}_seed42.npz")
