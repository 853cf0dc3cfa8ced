"""MNIST and Fashion-MNIST (60,000 28x28 grey training images) with the paper's simple CNN.

torchvision reads the uncompressed idx files DATA_DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte
(DATA_DIR/FashionMNIST/raw/... for Fashion-MNIST); it needs the test files to exist too.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from critbatch.tasks import register_task
from critbatch.tasks.models import ImageDatasetTask, SimpleCNN, checked_dropout


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

    def read_train_set(self):
        data = self._dataset_class()(root=str(self.root), train=True, download=False)
        return data.data.unsqueeze(1), torch.as_tensor(data.targets, dtype=torch.long)

    def download(self):
        self._dataset_class()(root=str(self.root), train=True, download=True)

    def make_network(self) -> nn.Module:
        return SimpleCNN(in_channels=1, image_size=28, dropout=self.dropout)


@register_task("mnist")
class MNIST(_MNISTLike):
    dataset = "mnist"
    torchvision_class = "MNIST"


@register_task("fashion_mnist")
class FashionMNIST(_MNISTLike):
    dataset = "fashion_mnist"
    torchvision_class = "FashionMNIST"
    flip = True  # a mirrored shirt is still a shirt
