"""The offline default's data: the digits task reads scikit-learn's file itself (importing
scikit-learn costs every training process about 1.7 s), and must read exactly what
sklearn.datasets.load_digits returns."""
from __future__ import annotations

import numpy as np
import torch

from critbatch.tasks import build_task


def test_digits_are_scikit_learns_digits_pixel_for_pixel():
    from sklearn.datasets import load_digits

    reference = load_digits()
    task = build_task("digits")
    task.load(torch.device("cpu"))
    assert task.dataset_size == len(reference.target) == 1797
    assert torch.equal(task.targets, torch.as_tensor(reference.target, dtype=torch.long))
    # the task's inputs are the pixels (0..16) centred and scaled per pixel: undo that from the reference
    pixels = torch.tensor(reference.data, dtype=torch.float32) / 16.0
    expected = (pixels - pixels.mean(0)) / (pixels.std(0) + 0.1)
    assert torch.allclose(task.inputs, expected, atol=1e-6)
    assert np.bincount(task.targets.numpy()).min() >= 170  # every class present (174 to 183 each)
