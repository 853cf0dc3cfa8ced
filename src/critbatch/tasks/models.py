"""What the image tasks (mnist, fashion_mnist, svhn, cifar10) share: the paper's models, on-device
augmentation, and `ImageDatasetTask`, which reads a torchvision dataset once into one tensor.

Models (McCandlish et al. 2018, App. A):
- `SimpleCNN`: conv 5x5x32 - pool - conv 5x5x64 - pool - FC 1024 - dropout - 10 logits (MNIST, SVHN).
- `CifarResNet`: the CIFAR ResNet of He et al. 2016 (depth 6n+2; ResNet-32 has n=5) with option-A
  shortcuts (stride-2 subsampling and zero-padded channels, no parameters): 464,154 parameters.

Data: torchvision reads the files (download=False); the uint8 images go to the device once, become
float32 normalised per channel with the training set's exact mean and std, and every batch is
`inputs.index_select(0, idx)`. Augmentation (off by default: the paper's goals are training-set
metrics) is the model's first layer and acts only in train mode, so the training loop needs no hook.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from critbatch.tasks import ClassificationTask, DataMissingError, TaskError


# ---------------------------------------------------------------- models

def checked_dropout(task: str, dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise TaskError(f"{task}: dropout must lie in [0, 1), got {dropout!r}")
    return float(dropout)


class SimpleCNN(nn.Module):
    """The paper's MNIST/SVHN model; "same" 5x5 convolutions, so 28x28 -> 7x7x64 and 32x32 -> 8x8x64."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, dropout: float = 0.4, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 1024), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(1024, classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut; when the block halves the resolution and
    doubles the channels, the shortcut subsamples and pads the new channels with zeros (option A)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def shortcut(self, x):
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels:
            low = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, low, self.extra_channels - low))
        return x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: a 3x3x16 conv, three stages of n blocks with 16, 32, 64
    channels (the 2nd and 3rd start with stride 2), global average pooling, a linear layer."""

    def __init__(self, depth: int = 32, classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise TaskError(f"ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, width = [], 16
        for stage, out_width in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(width, out_width, stride=2 if stage > 0 and i == 0 else 1))
                width = out_width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class RandomCropFlip(nn.Module):
    """Random crops from a zero-padded image (and random horizontal flips), drawn per example on the
    batch's device from torch's global generator; identity in eval mode. No parameters."""

    def __init__(self, padding: int = 4, flip: bool = False):
        super().__init__()
        self.padding, self.flip = padding, flip

    def forward(self, x):
        if not self.training or self.padding == 0 and not self.flip:
            return x
        n, c, h, w = x.shape
        if self.padding:
            p = self.padding
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(2 * p + 1, (n, 1), device=x.device)
            dx = torch.randint(2 * p + 1, (n, 1), device=x.device)
            rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # n, 1, h, 1
            cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # n, 1, 1, w
            x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                       torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
        if self.flip:
            flipped = torch.rand(n, 1, 1, 1, device=x.device) < 0.5
            x = torch.where(flipped, x.flip(3), x)
        return x

    def extra_repr(self):
        return f"padding={self.padding}, flip={self.flip}"


# ---------------------------------------------------------------- data

class ImageDatasetTask(ClassificationTask):
    """A 10-class image dataset read through torchvision, held on the training device.

    Subclasses set the class attributes and implement `data_files` (what torchvision reads),
    `read_train_set` (uint8 images N,C,H,W and int64 labels, through torchvision) and
    `make_network`; `download` fetches the files with torchvision's download=True.
    """

    dataset: str = ""           # the name scripts/download_data.py takes (= the task's name)
    full_train_size: int = 0    # training examples in the real dataset
    input_shape: tuple[int, int, int] = (1, 28, 28)
    flip: bool = False          # whether a horizontal flip keeps the label (not for digits)
    crop_padding: int = 4

    def __init__(self, data_dir: str = "data", train_examples: int | None = None, augment: bool = False):
        if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir):
            raise TaskError(f"{self.name}: data_dir must be a directory name, got {data_dir!r}")
        if train_examples is not None and (isinstance(train_examples, bool) or not isinstance(train_examples, int)
                                           or train_examples < 1):
            raise TaskError(f"{self.name}: train_examples must be an integer >= 1 or null (all), "
                            f"got {train_examples!r}")
        if not isinstance(augment, bool):
            raise TaskError(f"{self.name}: augment must be true or false, got {augment!r}")
        self.data_dir, self.train_examples, self.augment = str(data_dir), train_examples, augment
        self.train_size = min(self.full_train_size, train_examples or self.full_train_size)
        self.mean: torch.Tensor | None = None  # per channel, in units of pixel/255, set by load()
        self.std: torch.Tensor | None = None

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.data_dir))

    def data_files(self) -> list[Path]:
        raise NotImplementedError

    def read_train_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def download(self) -> None:
        raise NotImplementedError

    def make_network(self) -> nn.Module:
        raise NotImplementedError

    def download_command(self) -> str:
        return f"python scripts/download_data.py --data-dir {shlex.quote(self.data_dir)} --datasets {self.dataset}"

    def _missing(self, what: str) -> DataMissingError:
        return DataMissingError(
            f"{self.name}: {what} under data_dir={self.data_dir!r} ({self.root.resolve()}). Download it with\n"
            f"    {self.download_command()}\n"
            "on a machine with internet access (e.g. a login node), and set task.data_dir (paths.data_dir) "
            "to that directory.")

    def check_data(self) -> None:
        # Existence only (cheap enough for every point of a grid); torchvision checks the md5 sums
        # of SVHN and CIFAR-10 when load() reads them.
        files = self.data_files()
        missing = [f for f in files if not f.is_file()]
        if len(missing) == len(files):
            raise self._missing(f"no {self.dataset} data found")
        if missing:
            names = ", ".join(str(f.relative_to(self.root)) for f in missing)
            raise self._missing(f"the {self.dataset} data is incomplete (missing {names})")

    def load(self, device) -> None:
        self.check_data()
        try:
            images, labels = self.read_train_set()
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted" (md5 mismatch)
            raise self._missing(f"torchvision could not read {self.dataset} ({exc})") from exc
        if images.dtype != torch.uint8 or images.shape[1:] != self.input_shape or len(labels) != len(images):
            raise TaskError(f"{self.name}: expected uint8 images of shape N x {self.input_shape} with N labels, got "
                            f"{tuple(images.shape)} {images.dtype} and {len(labels)} labels")
        if len(images) < self.train_size:
            raise TaskError(f"{self.name}: the data in {self.root} has {len(images)} training examples, fewer than "
                            f"the {self.train_size} expected; re-download it or set task.train_examples")
        if labels.min() < 0 or labels.max() > 9:
            raise TaskError(f"{self.name}: labels must lie in 0..9, got {int(labels.min())}..{int(labels.max())}")
        images, labels = images[:self.train_size], labels[:self.train_size]
        self.mean, self.std = channel_stats(images)
        # Move the uint8 images (4x smaller than float) and convert on the device.
        x = images.to(device).float().div_(255)
        x.sub_(self.mean.to(device).view(1, -1, 1, 1)).div_(self.std.to(device).view(1, -1, 1, 1))
        self.inputs = x.contiguous()
        self.targets = labels.to(device=device, dtype=torch.long)

    def make_model(self) -> nn.Module:
        network = self.make_network()
        if not self.augment:
            return network
        return nn.Sequential(RandomCropFlip(self.crop_padding, self.flip), network)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-channel mean and std (population) of uint8 images N,C,H,W, in units of pixel/255,
    from a 256-bin histogram per channel: cheap, and free of float32 round-off on 10^8 pixels."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(mean)
        stds.append(var.clamp_min(1e-12).sqrt())
    return torch.stack(means).float(), torch.stack(stds).float()
