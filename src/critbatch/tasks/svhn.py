"""SVHN: 73,257 32x32 colour training images of house-number digits, with the paper's simple CNN.

torchvision reads DATA_DIR/train_32x32.mat (scipy.io; X is 32x32x3xN uint8, y holds 1..10 with 10
for the digit 0, which torchvision maps to 0) and checks its md5 sum. The "extra" split is not used.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from critbatch.tasks import register_task
from critbatch.tasks.models import ImageDatasetTask, SimpleCNN, checked_dropout


@register_task("svhn")
class SVHN(ImageDatasetTask):
    dataset = "svhn"
    full_train_size = 73_257
    input_shape = (3, 32, 32)
    flip = False  # a mirrored digit is not a digit

    def __init__(self, data_dir: str = "data", train_examples: int | None = None, dropout: float = 0.4,
                 augment: bool = False):
        super().__init__(data_dir, train_examples, augment)
        self.dropout = checked_dropout(self.name, dropout)

    def data_files(self):
        from torchvision.datasets import SVHN as TorchvisionSVHN  # imported here: building a task stays cheap

        return [self.root / TorchvisionSVHN.split_list["train"][1]]

    def read_train_set(self):
        from torchvision.datasets import SVHN as TorchvisionSVHN

        data = TorchvisionSVHN(root=str(self.root), split="train", download=False)
        return torch.from_numpy(np.ascontiguousarray(data.data)), torch.as_tensor(data.labels, dtype=torch.long)

    def download(self):
        from torchvision.datasets import SVHN as TorchvisionSVHN

        TorchvisionSVHN(root=str(self.root), split="train", download=True)

    def make_network(self) -> nn.Module:
        return SimpleCNN(in_channels=3, image_size=32, dropout=self.dropout)
