"""Handwritten digits that ship with scikit-learn (1797 images of 8x8): the offline default.

Real data that trains to low error in seconds on a 2-core CPU, so the whole pipeline (sweep,
records, tradeoff fit) runs anywhere without a download.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from critbatch.tasks import ClassificationTask, TaskError, register_task


@register_task("digits")
class Digits(ClassificationTask):
    train_size = 1797

    def __init__(self, hidden: int = 128, depth: int = 1, dropout: float = 0.0):
        if hidden < 1 or depth < 0:
            raise TaskError(f"digits: hidden must be >= 1 and depth >= 0, got hidden={hidden}, depth={depth}")
        if not 0.0 <= dropout < 1.0:
            raise TaskError(f"digits: dropout must lie in [0, 1), got {dropout}")
        self.hidden, self.depth, self.dropout = hidden, depth, dropout

    def load(self, device):
        table = load_digits_table()
        # Pixel values are 0..16; centre and scale them so plain SGD is well conditioned.
        x = torch.tensor(table[:, :-1], dtype=torch.float32) / 16.0
        x = (x - x.mean(0)) / (x.std(0) + 0.1)
        self.inputs = x.to(device)
        self.targets = torch.tensor(table[:, -1], dtype=torch.long, device=device)

    def make_model(self) -> nn.Module:
        layers, width = [], 64
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU()]
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
            width = self.hidden
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers)


def load_digits_table() -> np.ndarray:
    """scikit-learn's digits file (1797 rows: 64 pixel values, then the label), read as
    sklearn.datasets.load_digits reads it, without importing scikit-learn: that import costs
    about 1.7 s in every process that trains digits."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise TaskError(f"digits: scikit-learn's digits.csv.gz not found ({path}); pip install scikit-learn")
    with gzip.open(path, "rt") as file:
        return np.loadtxt(file, delimiter=",", dtype=np.float64)
