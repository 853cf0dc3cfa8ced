"""CIFAR-10: 50,000 32x32 colour training images, with ResNet-32 (the paper trains it with momentum 0.9).

torchvision reads the pickled batches DATA_DIR/cifar-10-batches-py/data_batch_1..5 and checks the
md5 sums of those, of test_batch (which must exist too) and of batches.meta.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from critbatch.tasks import TaskError, register_task
from critbatch.tasks.models import CifarResNet, ImageDatasetTask


@register_task("cifar10")
class CIFAR10(ImageDatasetTask):
    dataset = "cifar10"
    full_train_size = 50_000
    input_shape = (3, 32, 32)
    flip = True

    def __init__(self, data_dir: str = "data", train_examples: int | None = None, depth: int = 32,
                 augment: bool = False):
        super().__init__(data_dir, train_examples, augment)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise TaskError(f"{self.name}: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth!r}")
        self.depth = depth

    def data_files(self):
        from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10  # imported here: building a task stays cheap

        folder = self.root / TorchvisionCIFAR10.base_folder
        names = [name for name, _ in TorchvisionCIFAR10.train_list + TorchvisionCIFAR10.test_list]
        return [folder / name for name in names] + [folder / TorchvisionCIFAR10.meta["filename"]]

    def read_train_set(self):
        from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

        data = TorchvisionCIFAR10(root=str(self.root), train=True, download=False)
        images = torch.from_numpy(np.ascontiguousarray(data.data)).permute(0, 3, 1, 2)  # NHWC -> NCHW
        return images, torch.as_tensor(data.targets, dtype=torch.long)

    def download(self):
        from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

        TorchvisionCIFAR10(root=str(self.root), train=True, download=True)

    def make_network(self) -> nn.Module:
        return CifarResNet(depth=self.depth)
