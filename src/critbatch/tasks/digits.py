"""Handwritten digits that ship with scikit-learn (1797 images of 8x8): the offline default.

Real data that trains to low error in seconds on a 2-core CPU, so the whole pipeline (sweep,
records, tradeoff fit) runs anywhere without a download.
"""
from __future__ import annotations

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
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16; centre and scale them so plain SGD is well conditioned.
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        x = (x - x.mean(0)) / (x.std(0) + 0.1)
        self.inputs = x.to(device)
        self.targets = torch.tensor(digits.target, dtype=torch.long, device=device)

    def make_model(self) -> nn.Module:
        layers, width = [], 64
        for _ in range(self.depth):
            layers += [nn.Linear(width, self.hidden), nn.ReLU()]
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
            width = self.hidden
        layers.append(nn.Linear(width, 10))
        return nn.Sequential(*layers)
