"""``DartsCell``: the DARTS cell written with NNI's model-space primitives.

Every edge ``(node, j)`` is an NNI :class:`~nni.nas.nn.pytorch.LayerChoice` labelled ``'{cell}/op_{node}_{j}'`` and
every intermediate node an :class:`~nni.nas.nn.pytorch.InputChoice` labelled ``'{cell}/input_{node}'`` that picks two
of its incoming edges and sums them. Cells of one type share labels, hence one set of architecture parameters.

Nodes are numbered as in the DARTS genotypes: 0 and 1 are the two cell inputs, 2 .. ``num_nodes + 1`` the
intermediate nodes; the cell output is the channel concatenation of the intermediate nodes.

Because the primitives are NNI's own, ``model_space.freeze(sample)`` gives the discrete cell (only the two chosen
edges of each node are built) and NNI's built-in DARTS, GumbelDARTS and Proxyless strategies can search it (with
their own per-node input weights). The strategies of this package replace each edge's ``LayerChoice`` with their
mixed edge and each node's ``InputChoice`` with a node that sums all incoming edges (as DARTS does), and derive the
two inputs of each node from the edge weights by the DARTS rule (``VariantLightningModule.export``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch
import torch.nn as nn
from nni.mutable import label_scope
from nni.nas.nn.pytorch import InputChoice, LayerChoice, MutableModule
from nni.nas.nn.pytorch.base import recursive_freeze
from nni.nas.nn.pytorch.choice import ChosenInputs

from .ops import PRIMITIVES, FactorizedReduce, ReLUConvBN, build_op

__all__ = ['DartsCell', 'EdgeSpec', 'OperationSpec', 'edge_label', 'input_label', 'resolve_operations']

#: Either one operation list for every edge, or a mapping from edge label (``'normal/op_2_0'``) to that edge's list.
OperationSpec = Union[Sequence[str], Mapping[str, Sequence[str]]]


@dataclass(frozen=True)
class EdgeSpec:
    """How the candidates of one cell edge were built; attached to its LayerChoice as ``darts_edge``.

    Variants that rebuild the operations of an edge (PC-DARTS at ``channels // K``, MergeNAS's merged kernel) read it
    in their ``MixedEdge.from_layer_choice``.
    """
    cell: str
    node: int
    input: int
    channels: int
    stride: int
    affine: bool
    pool_bn: bool


def edge_label(cell: str, node: int, j: int) -> str:
    """Label of the operation choice on the edge from node ``j`` to node ``node``."""
    return f'{cell}/op_{node}_{j}'


def input_label(cell: str, node: int) -> str:
    """Label of the input choice of intermediate node ``node``."""
    return f'{cell}/input_{node}'


def resolve_operations(operations: OperationSpec | None) -> Callable[[str], list[str]]:
    """Turn an :data:`OperationSpec` into a function ``edge label -> operation names``.

    A mapping may cover only some edges; the others get the full DARTS list.
    """
    if operations is None:
        operations = PRIMITIVES
    if isinstance(operations, Mapping):
        per_edge = {str(k): list(v) for k, v in operations.items()}
        for label, names in per_edge.items():
            _check_names(names, label)
        return lambda label: list(per_edge.get(label, PRIMITIVES))
    names = list(operations)
    _check_names(names, 'operations')
    return lambda label: list(names)


def _check_names(names: list[str], where: str) -> None:
    if not names:
        raise ValueError(f'{where}: the operation list is empty; give at least one of {", ".join(PRIMITIVES)}')
    unknown = [n for n in names if n not in PRIMITIVES]
    if unknown:
        raise ValueError(f'{where}: unknown operation(s) {unknown}; valid operations: {", ".join(PRIMITIVES)}')
    if len(set(names)) != len(names):
        raise ValueError(f'{where}: duplicate operations in {names}')


class DartsCell(MutableModule):
    """A DARTS cell (normal or reduction) over NNI choices.

    Parameters
    ----------
    label
        Label prefix shared by all cells of this type, e.g. ``'normal'`` or ``'reduce'``.
    num_nodes
        Number of intermediate nodes (4 in DARTS).
    c_prev_prev, c_prev
        Channels of the two cell inputs.
    channels
        Channels of every node inside the cell (the output has ``num_nodes * channels``).
    reduction
        Whether the edges from the cell inputs have stride 2.
    reduction_prev
        Whether the previous cell halved the resolution (then input 0 is reduced with ``FactorizedReduce``).
    operations
        An :data:`OperationSpec`.
    affine
        Affine batch norm inside the cell (``False`` in the DARTS search network).
    pool_bn
        Batch norm after each pooling (``True`` in the DARTS search network).
    """

    def __init__(self, label: str, num_nodes: int, c_prev_prev: int, c_prev: int, channels: int,
                 reduction: bool, reduction_prev: bool, operations: OperationSpec | None = None,
                 affine: bool = False, pool_bn: bool = True):
        super().__init__()
        self.label = label
        self.reduction = reduction
        self.num_nodes = num_nodes
        self.channels = channels
        ops_for = resolve_operations(operations)
        if reduction_prev:
            self.preprocess0: nn.Module = FactorizedReduce(c_prev_prev, channels, affine=affine)
        else:
            self.preprocess0 = ReLUConvBN(c_prev_prev, channels, 1, 1, 0, affine=affine)
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0, affine=affine)
        self.edges = nn.ModuleDict()
        self.inputs = nn.ModuleDict()
        with label_scope(label):  # NNI labels are hierarchical: 'normal' / 'input_2' -> 'normal/input_2'
            for node in self.node_indices:
                choice = InputChoice(node, 2, reduction='sum', label=f'input_{node}')
                self.inputs[str(node)] = choice
                # A frozen model builds only the chosen edges.
                sources = choice.chosen if isinstance(choice, ChosenInputs) else range(node)
                for j in sources:
                    stride = 2 if reduction and j < 2 else 1
                    names = ops_for(edge_label(label, node, j))
                    candidates = {name: build_op(name, channels, stride, affine, pool_bn) for name in names}
                    choice_op = LayerChoice(candidates, label=f'op_{node}_{j}')
                    if isinstance(choice_op, LayerChoice):
                        choice_op.darts_edge = EdgeSpec(label, node, j, channels, stride, affine, pool_bn)
                    self.edges[f'{node}_{j}'] = choice_op

    @property
    def node_indices(self) -> range:
        """Indices of the intermediate nodes (2 .. num_nodes + 1)."""
        return range(2, 2 + self.num_nodes)

    def edge(self, node: int, j: int) -> nn.Module | None:
        """The module on edge ``(node, j)``, or ``None`` where a frozen cell did not build it."""
        key = f'{node}_{j}'
        return self.edges[key] if key in self.edges else None

    def iter_edges(self) -> Iterator[tuple[int, int, nn.Module]]:
        """``(node, j, module)`` of every built edge, node by node and input by input (a frozen cell skips the
        edges it did not build)."""
        for node in self.node_indices:
            for j in range(node):
                edge = self.edge(node, j)
                if edge is not None:
                    yield node, j, edge

    def freeze(self, sample: dict[str, Any]) -> nn.Module:
        """The discrete cell of ``sample``: chosen operations, and only the two chosen edges of each node."""
        frozen, replaced = recursive_freeze(self, sample, include_root=False)
        if not replaced:
            frozen = copy.deepcopy(self)
        for node, j, _ in list(frozen.iter_edges()):
            if j not in set(frozen.inputs[str(node)].chosen):
                del frozen.edges[f'{node}_{j}']
        return frozen

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in self.node_indices:
            edge_outputs = []
            for j in range(node):
                op = self.edge(node, j)
                edge_outputs.append(op(states[j]) if op is not None else None)
            states.append(self.inputs[str(node)](edge_outputs))
        return torch.cat(states[2:], dim=1)
