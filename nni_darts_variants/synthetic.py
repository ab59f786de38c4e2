"""Synthetic learnable images: the one builder behind the search's ``data.name=synthetic``, the retrain's
``data.source=synthetic`` and the tests' tiny data."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

__all__ = ['learnable_images']


def learnable_images(n: int = 32, channels: int = 1, size: int = 8, num_classes: int = 10, seed: int = 0
                     ) -> TensorDataset:
    """Synthetic images whose class sets the mean of one quadrant, so that a tiny network can learn them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.randn(n, channels, size, size, generator=g) * 0.5
    half = size // 2
    for c in range(num_classes):
        rows, cols = divmod(c % 4, 2)
        x[y == c, :, rows * half:(rows + 1) * half, cols * half:(cols + 1) * half] += 1.0 + c / num_classes
    return TensorDataset(x, y)
