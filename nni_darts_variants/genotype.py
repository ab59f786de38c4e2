"""Genotypes: the discrete DARTS cell, its derivation rule, and conversion to and from NNI samples.

A genotype lists, for each cell type, two ``(operation, input)`` pairs per intermediate node (the format of the
official DARTS code), plus the nodes concatenated into the cell output. It converts losslessly to NNI's sample dict
for :class:`~search_spaces.DartsSpace` (``'normal/op_{node}_{j}'`` and ``'normal/input_{node}'`` labels), so the
same architecture can be rebuilt with ``model_space.freeze(sample)`` or retrained from the genotype.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from search_spaces.cell import edge_label, input_label

__all__ = ['Genotype', 'darts_rule', 'EdgeWeights', 'CELL_TYPES']

CELL_TYPES = ('normal', 'reduce')

#: ``{(node, j): {op_name: weight}}`` for the edges of one cell type.
EdgeWeights = Mapping[tuple[int, int], Mapping[str, float]]


def darts_rule(weights: EdgeWeights, exclude: Sequence[str] = ('none',), per_node: int = 2
               ) -> dict[int, list[tuple[str, int]]]:
    """The DARTS derivation rule (Liu et al. 2019, official ``genotype()``).

    For every intermediate node, each incoming edge is scored by its strongest operation that is not excluded
    (``none`` never wins); the ``per_node`` best edges are kept (distinct inputs, ties to the lower input index), and
    each kept edge takes that strongest operation. ``weights`` are whatever the variant ranks by: softmax
    probabilities that include ``none`` in their denominator for DARTS, raw logits for DropNAS, and so on.

    Returns ``{node: [(op, j), ...]}`` with the stronger edge first.
    """
    by_node: dict[int, list[tuple[int, str, float]]] = {}
    for (node, j), ops in weights.items():
        allowed = {op: float(w) for op, w in ops.items() if op not in exclude}
        if not allowed:
            continue
        best = max(allowed, key=lambda op: allowed[op])  # first maximum in candidate order
        by_node.setdefault(node, []).append((j, best, allowed[best]))
    result = {}
    for node in sorted(by_node):
        edges = sorted(by_node[node], key=lambda e: (-e[2], e[0]))
        if len(edges) < per_node:
            raise ValueError(f'node {node} has {len(edges)} usable incoming edge(s); {per_node} are needed')
        result[node] = [(op, j) for j, op, _ in edges[:per_node]]
    return result


@dataclass
class Genotype:
    """A searched DARTS architecture: ``normal`` and ``reduce`` are lists of ``(op, input)`` pairs, two per node."""

    normal: list[tuple[str, int]]
    reduce: list[tuple[str, int]]
    normal_concat: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    reduce_concat: list[int] = field(default_factory=lambda: [2, 3, 4, 5])

    def __post_init__(self) -> None:
        for cell in CELL_TYPES:
            pairs = [(str(op), int(j)) for op, j in getattr(self, cell)]
            if len(pairs) % 2 or not pairs:
                raise ValueError(f'genotype.{cell} must hold two (op, input) pairs per node, got {len(pairs)} pairs')
            for k, (op, j) in enumerate(pairs):
                if not 0 <= j < 2 + k // 2:
                    raise ValueError(f'genotype.{cell}: pair {k} ({op!r}, {j}) reads from node {j}, which does not '
                                     f'exist before node {2 + k // 2}')
            setattr(self, cell, pairs)
            setattr(self, f'{cell}_concat', [int(c) for c in getattr(self, f'{cell}_concat')])

    @property
    def num_nodes(self) -> int:
        return len(self.normal) // 2

    # ----- NNI samples -----
    @classmethod
    def from_sample(cls, sample: Mapping[str, Any], num_nodes: int | None = None) -> 'Genotype':
        """Read the genotype of a :class:`~search_spaces.DartsSpace` sample (inputs in ``input`` order)."""
        if num_nodes is None:
            num_nodes = sum(1 for k in sample if k.startswith('normal/input_'))
        cells: dict[str, list[tuple[str, int]]] = {}
        for cell in CELL_TYPES:
            pairs = []
            for node in range(2, 2 + num_nodes):
                key = input_label(cell, node)
                if key not in sample:
                    raise ValueError(f'sample has no {key!r}; is it a sample of DartsSpace?')
                for j in sample[key]:
                    pairs.append((str(sample[edge_label(cell, node, int(j))]), int(j)))
            cells[cell] = pairs
        concat = list(range(2, 2 + num_nodes))
        return cls(cells['normal'], cells['reduce'], concat, list(concat))

    @classmethod
    def from_nodes(cls, nodes: Mapping[str, Mapping[int, Sequence[tuple[str, int]]]]) -> 'Genotype':
        """Build from ``{'normal': {node: [(op, j), ...]}, 'reduce': {...}}`` as :func:`darts_rule` returns."""
        cells = {cell: [pair for node in sorted(nodes[cell]) for pair in nodes[cell][node]] for cell in CELL_TYPES}
        concat = sorted(nodes['normal'])
        return cls(cells['normal'], cells['reduce'], concat, sorted(nodes['reduce']))

    def to_sample(self, search_space: Any | None = None) -> dict[str, Any]:
        """NNI sample for a :class:`~search_spaces.DartsSpace` with the same number of nodes.

        Edges the genotype does not use still need a value in a full sample; given ``search_space`` they get their
        first candidate, otherwise they are left out (``freeze`` builds only the chosen edges either way).
        """
        sample: dict[str, Any] = {}
        mutables = search_space.simplify() if search_space is not None else {}
        for cell in CELL_TYPES:
            pairs = getattr(self, cell)
            for k in range(0, len(pairs), 2):
                node = 2 + k // 2
                chosen = [pairs[k][1], pairs[k + 1][1]]
                if chosen[0] == chosen[1]:
                    raise ValueError(f'genotype.{cell} node {node} uses input {chosen[0]} twice; DartsSpace needs two '
                                     'distinct inputs per node')
                sample[input_label(cell, node)] = sorted(chosen)
                for op, j in pairs[k:k + 2]:
                    sample[edge_label(cell, node, j)] = op
                for j in range(node):
                    label = edge_label(cell, node, j)
                    if label not in sample and label in mutables:
                        sample[label] = mutables[label].values[0]
        return sample

    # ----- JSON -----
    def to_dict(self) -> dict[str, Any]:
        return {k: [list(p) for p in v] if k in CELL_TYPES else list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> 'Genotype':
        missing = [k for k in CELL_TYPES if k not in data]
        if missing:
            raise ValueError(f'a genotype needs the keys {list(CELL_TYPES)}; missing {missing}')
        kwargs = {k: data[k] for k in ('normal', 'reduce', 'normal_concat', 'reduce_concat') if k in data}
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        from .atomic import atomic_write_json
        atomic_write_json(path, self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> 'Genotype':
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __str__(self) -> str:
        def fmt(pairs: list[tuple[str, int]]) -> str:
            return ', '.join(f'{op}<-{j}' for op, j in pairs)
        return f'normal: [{fmt(self.normal)}]  reduce: [{fmt(self.reduce)}]'
