"""The DARTS CNN search network (Liu et al., ICLR 2019) as an NNI model space."""
from __future__ import annotations

import torch
import torch.nn as nn
from nni.nas.nn.pytorch import ModelSpace

from .cell import DartsCell, OperationSpec

__all__ = ['DartsSpace', 'DATASET_PRESETS', 'reduction_indices']

#: Input channels, classes and stem of each named dataset.
DATASET_PRESETS: dict[str, dict] = {
    'cifar10': {'in_channels': 3, 'num_classes': 10, 'stem': 'cifar'},
    'cifar100': {'in_channels': 3, 'num_classes': 100, 'stem': 'cifar'},
    'imagenet': {'in_channels': 3, 'num_classes': 1000, 'stem': 'imagenet'},
    'digits': {'in_channels': 1, 'num_classes': 10, 'stem': 'cifar'},
}


def reduction_indices(num_cells: int) -> tuple[int, int]:
    """Cells that halve the resolution and double the width: ``num_cells // 3`` and ``2 * num_cells // 3``."""
    return num_cells // 3, 2 * num_cells // 3


class DartsSpace(ModelSpace):
    """The DARTS search network: a stem, ``num_cells`` cells (two of them reduction cells), pooling and a classifier.

    Faithful to the official search network: all eight operations including ``none``, non-affine batch norm inside
    cells, pools followed by batch norm, ``num_nodes`` intermediate nodes per cell, the cell output the concatenation
    of its nodes, one set of architecture choices shared by all normal cells (labels ``normal/...``) and one by all
    reduction cells (``reduce/...``), reductions at ``num_cells // 3`` and ``2 * num_cells // 3``.

    Parameters
    ----------
    width
        Initial channels C (16 in the DARTS search).
    num_cells
        Number of cells (8 in the DARTS search).
    num_nodes
        Intermediate nodes per cell (4).
    dataset
        ``'cifar10'`` / ``'cifar100'`` (3x3 stem conv to 3C), ``'imagenet'`` (PC-DARTS's three stride-2 stem convs,
        input 224 reaches the cells at 28), or ``'digits'`` (1 input channel, 10 classes). ``in_channels`` and
        ``num_classes`` override the preset.
    operations
        The candidate operations: one list for every edge, or a mapping from edge label (``'normal/op_2_0'``) to that
        edge's list (P-DARTS restricts each edge to its own subset this way).
    stem_multiplier
        Stem output channels are ``stem_multiplier * width`` (3).
    final_bn_relu
        Batch norm and ReLU on the last cell's output before the pooling (``lastact`` of the official GDAS search
        network); off by default, as the DARTS search network.
    """

    def __init__(self, width: int = 16, num_cells: int = 8, num_nodes: int = 4, dataset: str = 'cifar10',
                 operations: OperationSpec | None = None, in_channels: int | None = None,
                 num_classes: int | None = None, stem_multiplier: int = 3, final_bn_relu: bool = False):
        super().__init__()
        if dataset not in DATASET_PRESETS:
            raise ValueError(f'unknown dataset {dataset!r} for DartsSpace; valid: {", ".join(DATASET_PRESETS)}')
        if width < 1 or num_cells < 1 or num_nodes < 1:
            raise ValueError(f'width, num_cells and num_nodes must be positive, got {width}, {num_cells}, {num_nodes}')
        if width % 2:
            raise ValueError(f'width must be even (FactorizedReduce splits channels in two), got {width}')
        preset = DATASET_PRESETS[dataset]
        in_channels = in_channels or preset['in_channels']
        num_classes = num_classes or preset['num_classes']
        self.dataset = dataset
        self.num_cells = num_cells
        self.num_nodes = num_nodes
        self.width = width
        c_stem = stem_multiplier * width
        if preset['stem'] == 'imagenet':
            self.stem0: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, c_stem // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_stem // 2), nn.ReLU(inplace=True),
                nn.Conv2d(c_stem // 2, c_stem, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_stem))
            self.stem1: nn.Module | None = nn.Sequential(
                nn.ReLU(inplace=True), nn.Conv2d(c_stem, c_stem, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_stem))
            reduction_prev = True
        else:
            self.stem0 = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, padding=1, bias=False), nn.BatchNorm2d(c_stem))
            self.stem1 = None
            reduction_prev = False
        c_pp, c_p, c = c_stem, c_stem, width
        reductions = reduction_indices(num_cells)
        self.cells = nn.ModuleList()
        for i in range(num_cells):
            reduction = i in reductions
            if reduction:
                c *= 2
            cell = DartsCell('reduce' if reduction else 'normal', num_nodes, c_pp, c_p, c, reduction,
                             reduction_prev, operations)
            self.cells.append(cell)
            reduction_prev = reduction
            c_pp, c_p = c_p, num_nodes * c
        self.final_act: nn.Module = (nn.Sequential(nn.BatchNorm2d(c_p), nn.ReLU(inplace=True)) if final_bn_relu
                                     else nn.Identity())
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.stem0(x)
        s1 = self.stem1(s0) if self.stem1 is not None else s0
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(self.global_pooling(self.final_act(s1)).flatten(1))
