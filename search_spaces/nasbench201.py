"""The NAS-Bench-201 search network (Dong & Yang, ICLR 2020) as an NNI model space.

The network of the official search code (AutoDL-Projects, ``TinyNetworkDarts`` and ``NAS201SearchCell``): a 3x3
convolution and BN stem at ``C`` channels; three stages of ``N`` cells at ``C``, ``2C`` and ``4C`` channels separated
by stride-2 ResNet basic blocks; a final BN and ReLU, global average pooling and a linear classifier.

A cell has 4 nodes; node 0 is the cell input and node ``t`` (1..3) sums one edge from every earlier node, so a cell
has 6 edges and its output is node 3. Every edge is an NNI :class:`~nni.nas.nn.pytorch.LayerChoice` over
``none, skip_connect, nor_conv_1x1, nor_conv_3x3, avg_pool_3x3`` labelled ``'nb201/op_{t}_{j}'`` (the edge from node
``j`` into node ``t``, as :func:`~search_spaces.cell.edge_label` writes DARTS edges). All cells share the labels, hence
one set of choices: a sample is one benchmark cell, whose string
``|op(1,0)~0|+|op(2,0)~0|op(2,1)~1|+|op(3,0)~0|op(3,1)~1|op(3,2)~2|`` :mod:`nni_darts_variants.nasbench201` writes
and reads.

Each edge carries an :class:`~search_spaces.cell.EdgeSpec` (``darts_edge``), so the variants that rebuild an edge's
operations (PC-DARTS at ``C/K`` channels, MergeNAS's merged kernel) act on these edges as on DARTS cell edges. The
nodes have no ``InputChoice`` (every edge is kept), so PC-DARTS's edge normalization has nothing to weight here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from nni.mutable import label_scope
from nni.nas.nn.pytorch import LayerChoice, ModelSpace, MutableModule
from torch import nn

from .cell import EdgeSpec, edge_label
from .ops import ReLUConvBN, build_op

__all__ = [
    'NB201_CELL',
    'NB201_EDGES',
    'NB201_OPERATIONS',
    'NasBench201Cell',
    'NasBench201Space',
    'ResNetBasicBlock',
    'nb201_label',
]

#: The candidates of every edge, in the benchmark's order.
NB201_OPERATIONS: tuple[str, ...] = ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')
#: Label prefix of the shared cell choices.
NB201_CELL = 'nb201'
#: The 6 edges ``(t, j)`` (from node ``j`` into node ``t``) in the order of the benchmark string.
NB201_EDGES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))


def nb201_label(node: int, j: int) -> str:
    """Label of the choice on the edge from node ``j`` into node ``node``: ``'nb201/op_{node}_{j}'``."""
    return edge_label(NB201_CELL, node, j)


def disable_running_stats(module: nn.Module) -> nn.Module:
    """Turn every BN of ``module`` into one without running statistics (batch statistics also in eval mode)."""
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    return module


def _operations_for(operations: Sequence[str] | Mapping[str, Sequence[str]] | None, label: str) -> list[str]:
    if operations is None:
        names = list(NB201_OPERATIONS)
    elif isinstance(operations, Mapping):
        names = list(operations.get(label, NB201_OPERATIONS))
    else:
        names = list(operations)
    unknown = [n for n in names if n not in NB201_OPERATIONS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f'{label}: operations must be distinct names from {", ".join(NB201_OPERATIONS)}, got '
                         f'{names}')
    return names


class ResNetBasicBlock(nn.Module):
    """The stride-2 block between stages: ReLU-Conv3x3-BN twice, plus a residual (2x2 average pool and 1x1 conv)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, 2, 1)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1, 1)
        self.downsample = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NasBench201Cell(MutableModule):
    """A NAS-Bench-201 cell: node ``t`` is the sum of one edge from each node ``j < t``; the output is node 3.

    Parameters
    ----------
    channels
        Channels of the cell's input, nodes and output.
    operations
        Candidates: one list for every edge, or ``{label: list}`` per edge (P-DARTS's pruned edges); default all 5.
    affine, track_running_stats
        BN options of the candidates (official search scripts: ``affine=False``, ``track_running_stats`` 0 or 1).
    """

    num_nodes = 4

    def __init__(self, channels: int, operations: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
                 affine: bool = False, track_running_stats: bool = False):
        super().__init__()
        self.channels = channels
        self.edges = nn.ModuleDict()
        with label_scope(NB201_CELL):
            for node, j in NB201_EDGES:
                label = nb201_label(node, j)
                candidates = {}
                for name in _operations_for(operations, label):
                    op = build_op(name, channels, 1, affine, pool_bn=False)
                    candidates[name] = op if track_running_stats else disable_running_stats(op)
                choice = LayerChoice(candidates, label=f'op_{node}_{j}')
                if isinstance(choice, LayerChoice):
                    choice.darts_edge = EdgeSpec(NB201_CELL, node, j, channels, 1, affine, False)
                self.edges[f'{node}_{j}'] = choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for node in range(1, self.num_nodes):
            nodes.append(sum(self.edges[f'{node}_{j}'](nodes[j]) for j in range(node)))
        return nodes[-1]


class NasBench201Space(ModelSpace):
    """The NAS-Bench-201 search network: stem, 3 stages of ``num_cells`` cells, ResNet blocks between, classifier.

    Parameters
    ----------
    width
        C: channels of the first stage (16 in the benchmark); the stages have C, 2C, 4C.
    num_cells
        N: cells per stage (5 in the benchmark; 1 gives a small CPU network). The choices are shared by all cells.
    num_classes, in_channels
        Classes of the classifier (10 for CIFAR-10) and channels of the input images (3).
    affine, track_running_stats
        BN options inside the cells and the ResNet blocks (official search: ``affine=False``; the scripts' ``BN``
        argument sets ``track_running_stats``, 0 in the documented runs). The stem and the final BN are affine and
        track statistics, as in the official network.
    operations
        The candidates: one list for every edge, or ``{'nb201/op_t_j': list}`` per edge (P-DARTS's pruning).
    """

    def __init__(self, width: int = 16, num_cells: int = 5, num_classes: int = 10, in_channels: int = 3,
                 affine: bool = False, track_running_stats: bool = False,
                 operations: Sequence[str] | Mapping[str, Sequence[str]] | None = None):
        super().__init__()
        if width < 1 or num_cells < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(f'width, num_cells, num_classes and in_channels must be positive, got {width}, '
                             f'{num_cells}, {num_classes}, {in_channels}')
        self.width, self.num_cells = width, num_cells
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        layers: list[nn.Module] = []
        channels = width
        for stage in range(3):
            if stage:
                layers.append(ResNetBasicBlock(channels, 2 * channels))
                channels *= 2
            layers += [NasBench201Cell(channels, operations, affine, track_running_stats) for _ in range(num_cells)]
        self.cells = nn.ModuleList(layers)
        self.lastact = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.cells:
            x = layer(x)
        return self.classifier(self.global_pooling(self.lastact(x)).flatten(1))
