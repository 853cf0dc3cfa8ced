"""Small datasets written in the real on-disk formats, in the layout torchvision reads, so tests
run the same reading code a user's downloaded data goes through.

Each writer returns the training images as uint8 N,C,H,W and the labels 0..9 that a task should
produce, and the md5 sums of the files it wrote where torchvision checks them (see `integrity`).
"""
from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np


def _idx(path: Path, array: np.ndarray) -> None:
    """idx format: big-endian magic 0x0000 08 <ndim> (08 = unsigned byte), the dimensions as
    big-endian int32, then the raw bytes (2051 for 3-d images, 2049 for 1-d labels)."""
    assert array.dtype == np.uint8
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, n_train: int, n_test: int = 3, folder: str = "MNIST", seed: int = 0):
    """ROOT/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed: torchvision's
    MNIST._check_exists only tests that these exist (no md5 on the raw files)."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        _idx(raw / f"{split}-images-idx3-ubyte", images)
        _idx(raw / f"{split}-labels-idx1-ubyte", labels)
        out[split] = (images[:, None], labels.astype(np.int64))
    return out["train"]


def write_svhn(root: Path, n_train: int, seed: int = 0):
    """ROOT/train_32x32.mat as in the real file: X is 32x32x3xN uint8, y is Nx1 with labels 1..10,
    10 standing for the digit 0. Returns the images as N,3,32,32, the labels as 0..9, and the md5."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    digits = rng.integers(0, 10, n_train)
    digits[:2] = 0  # make sure the 10 -> 0 mapping is exercised
    path = Path(root) / "train_32x32.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    X = np.ascontiguousarray(images.transpose(2, 3, 1, 0))  # N,C,H,W -> H,W,C,N
    y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
    savemat(path, {"X": X, "y": y})
    return images, digits.astype(np.int64), md5(path)


def write_cifar10(root: Path, n_per_batch: int, seed: int = 0):
    """ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}: pickled dicts whose
    'data' rows are 3072 bytes (1024 red, then green, then blue, each row-major), 'labels' a list.
    Returns the training images N,3,32,32 (batches 1..5 in order), labels, and {file: md5}."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        batch_labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        entry = {"batch_label": name, "data": data, "labels": batch_labels,
                 "filenames": [f"{name}_{i}.png" for i in range(n_per_batch)]}
        (folder / name).write_bytes(pickle.dumps(entry))
        if name != "test_batch":
            images.append(data.reshape(-1, 3, 32, 32))
            labels += batch_labels
    meta = {"num_cases_per_batch": n_per_batch, "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    sums = {f.name: md5(f) for f in folder.iterdir()}
    return np.concatenate(images), np.array(labels, dtype=np.int64), sums


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def accept_fake_svhn(monkeypatch, file_md5: str) -> None:
    """torchvision checks train_32x32.mat against the real file's md5, which a small fake cannot
    match: swap in the fake's md5, so torchvision's own integrity check still runs (and would
    still catch a truncated or missing file)."""
    from torchvision.datasets import SVHN

    url, filename, _ = SVHN.split_list["train"]
    monkeypatch.setattr(SVHN, "split_list", {**SVHN.split_list, "train": [url, filename, file_md5]})


def accept_fake_cifar10(monkeypatch, sums: dict[str, str]) -> None:
    """As accept_fake_svhn, for the md5 sums CIFAR10 checks: every batch and batches.meta."""
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "train_list", [[name, sums[name]] for name, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[name, sums[name]] for name, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": sums[CIFAR10.meta["filename"]]})
