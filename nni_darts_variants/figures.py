"""Figures of a search: cell graphs, architecture-weight heatmaps and their histories per epoch.

Drawn with matplotlib's object-oriented API on the Agg canvas (no global backend is touched). The result bundle
(:mod:`nni_darts_variants.bundle`) calls these; they know nothing about run folders.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ['draw_cell', 'draw_heatmap', 'draw_history', 'short_label']


def _short(label: str) -> str:
    """``'normal/op_3_1'`` (edge from input 1 to node 3) -> ``'c_{k-1}→1'`` in the cell picture's names; other
    labels unchanged."""
    tail = label.split('/')[-1]
    parts = tail.split('_')
    if len(parts) == 3 and parts[0] == 'op' and parts[1].isdigit() and parts[2].isdigit():
        source = _node_name(int(parts[2]))
        return f'{"$" + source + "$" if "_" in source else source}→{int(parts[1]) - 2}'
    return tail


def _node_name(j: int) -> str:
    """Cell inputs 0 and 1 are ``c_{k-2}`` and ``c_{k-1}``; node ``j >= 2`` is intermediate node ``j - 2``."""
    return {0: 'c_{k-2}', 1: 'c_{k-1}'}.get(j, str(j - 2))


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=110)


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, bbox_inches='tight', pad_inches=0.15)  # one tight-box pass: much cheaper than a layout engine


def draw_cell(pairs: Sequence[tuple[str, int]], concat: Sequence[int], title: str, path: Path) -> None:
    """A DARTS cell as a graph: inputs ``c_{k-2}``, ``c_{k-1}``, nodes ``0..n-1``, output ``c_{k}``; each edge is
    labelled with its operation (the layout of the official ``visualize.py``, drawn with matplotlib).

    Intermediate nodes sit on one line with the output at its end; input edges come from above and below, edges
    between intermediate nodes arc above the line and the output edges arc below it, so no edge crosses a node.
    """
    n = len(pairs) // 2
    step = 2.4
    pos = {0: (0.0, 2.4), 1: (0.0, -2.4), n + 2: (step * (n + 1), 0.0)}
    pos.update({2 + i: (step * (i + 1), 0.0) for i in range(n)})
    fig = _figure(2.0 + 1.9 * n, 4.6)
    ax = fig.add_subplot()
    colors = {0: '#c7e9c0', 1: '#c7e9c0', n + 2: '#fdd0a2'}
    for k, (op, j) in enumerate(pairs):
        _edge(ax, pos[j], pos[2 + k // 2], op, bow=-_bow(j, 2 + k // 2) if j >= 2 else 0.0)
    for node in concat:
        _edge(ax, pos[node], pos[n + 2], None, bow=_bow(node, n + 2))
    for node, (x, y) in pos.items():
        name = 'c_{k}' if node == n + 2 else _node_name(node)
        ax.text(x, y, f'${name}$' if '_' in name else name, ha='center', va='center', fontsize=11, zorder=3,
                bbox={'boxstyle': 'round,pad=0.45', 'fc': colors.get(node, '#deebf7'), 'ec': '#333333'})
    ax.set_xlim(-0.8, pos[n + 2][0] + 0.8)
    ax.set_ylim(-2.9, 2.9)
    ax.set_aspect('equal')
    ax.axis('off')
    ax.set_title(title)
    _save(fig, path)


def _bow(start: int, end: int) -> float:
    """How far an edge between nodes on the line bends away from it (0 for neighbours)."""
    return 0.0 if end - start < 2 else 0.45 + 0.3 * (end - start - 2)


def _edge(ax: Any, start: tuple[float, float], end: tuple[float, float], op: str | None, bow: float) -> None:
    """An arrow bending ``bow`` below the straight line (negative: above), labelled ``op`` at its middle."""
    (x1, y1), (x2, y2) = start, end
    rad = 2 * bow / math.hypot(x2 - x1, y2 - y1)  # matplotlib's arc3 midpoint sits rad * length / 2 off the line
    ax.annotate('', xy=end, xytext=start, zorder=1,
                arrowprops={'arrowstyle': '-|>', 'color': '#555555' if op else '#aaaaaa', 'lw': 1.2,
                            'shrinkA': 14, 'shrinkB': 14, 'connectionstyle': f'arc3,rad={rad}'})
    if op:
        x, y = (x1 + x2) / 2 + rad * (y2 - y1) / 2, (y1 + y2) / 2 - rad * (x2 - x1) / 2
        angle = math.degrees(math.atan2(y2 - y1, x2 - x1))  # the curve at its middle runs parallel to the chord
        ax.text(x, y, op, ha='center', va='center', fontsize=8, zorder=2, rotation=angle, rotation_mode='anchor',
                bbox={'boxstyle': 'round,pad=0.15', 'fc': 'white', 'ec': 'none', 'alpha': 0.85})


def draw_heatmap(probs: Mapping[str, Mapping[str, float]], title: str, path: Path) -> None:
    """Rows: choices (edges ``j→i`` or blocks), columns: operations, cells: softmax weight (blank: no such
    candidate)."""
    labels = list(probs)
    ops = list(dict.fromkeys(op for label in labels for op in probs[label]))
    matrix = [[probs[label].get(op, math.nan) for op in ops] for label in labels]
    fig = _figure(1.6 + 0.85 * len(ops), 1.2 + 0.32 * len(labels))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap='viridis', aspect='auto', vmin=0.0)
    ax.set_xticks(range(len(ops)), ops, rotation=40, ha='right', fontsize=8)
    ax.set_yticks(range(len(labels)), [_short(label) for label in labels], fontsize=8)
    top = max(v for row in matrix for v in row if not math.isnan(v))
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            if not math.isnan(value):
                ax.text(c, r, f'{value:.2f}', ha='center', va='center', fontsize=6.5,
                        color='black' if value > 0.55 * top else 'white')  # viridis: light above the middle
    fig.colorbar(image, ax=ax, label='softmax weight')
    ax.set_title(title)
    _save(fig, path)


def draw_history(history: Sequence[Mapping[str, Any]], labels: Sequence[str], title: str, path: Path) -> None:
    """One small panel per choice: the probability of each operation per epoch (one colour per operation)."""
    epochs = [h.get('epoch', i) for i, h in enumerate(history)]
    ops = list(dict.fromkeys(op for h in history for label in labels for op in h.get('probs', {}).get(label, {})))
    colors = {op: f'C{i % 10}' for i, op in enumerate(ops)}
    cols = min(len(labels), 4 if len(labels) <= 16 else 6)
    rows = math.ceil(len(labels) / cols)
    fig = _figure(2.6 * cols + 1.8, 1.9 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax, label in zip(axes.flat, labels):
        for op in ops:
            series = [h.get('probs', {}).get(label, {}).get(op) for h in history]
            if any(v is not None for v in series):
                ax.plot(epochs, [math.nan if v is None else v for v in series], color=colors[op],
                        marker='o' if len(epochs) < 3 else None, ms=3, lw=1.2, label=op)
        ax.set_title(_short(label), fontsize=8)
        ax.tick_params(labelsize=7)
    for index, ax in enumerate(axes.flat):
        if index >= len(labels):
            ax.axis('off')
        elif index + cols >= len(labels):  # the lowest panel of its column shows the epochs
            ax.tick_params(labelbottom=True)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colors[op]) for op in ops]
    fig.subplots_adjust(hspace=0.35, wspace=0.08)
    fig.legend(handles, ops, loc='center left', bbox_to_anchor=(0.91, 0.5), fontsize=8)
    fig.supxlabel('epoch', fontsize=9)
    fig.supylabel('probability', fontsize=9)
    fig.suptitle(title)
    _save(fig, path)


short_label = _short
