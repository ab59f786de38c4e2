"""Figures of a search: cell graphs, architecture-weight heatmaps, and what happened per epoch.

Drawn with matplotlib's object-oriented API on the Agg canvas (no global backend is touched), PNG at :data:`DPI`
dots per inch. Cell graphs also go to graphviz (``.dot``, and ``.svg``/``.pdf`` when its ``dot`` binary exists), the
tool the DARTS authors drew their cells with. The result bundle (:mod:`nni_darts_variants.bundle`) calls these; they
know nothing about run folders.

The PNG of a cell uses a layout of its own (:func:`cell_layout`): the nodes on one line, each edge between
neighbours drawn on the line and every other edge as a half-ellipse above or below it. Two such arcs on the same
side cross exactly when their end points interleave, so choosing the order of the nodes and the side of each arc is
a small search; the one chosen has no crossing between operation edges (for every published DARTS-space cell) and
the fewest crossings of the grey edges into the output ``c_{k}``. Not all of those can vanish: when three nodes read
from both cell inputs (DARTS_V2's normal cell), the inputs and the output form the non-planar graph K3,3 with them,
so no drawing of that cell is free of crossings.
"""
from __future__ import annotations

import itertools
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ['DPI', 'draw_cell', 'cell_layout', 'cell_geometry', 'cell_digraph', 'write_cell_graph', 'draw_heatmap',
           'heatmap_figure', 'figure_to_array', 'draw_history', 'draw_curves', 'beta_labels', 'draw_betas', 'skip_counts',
           'draw_skip_counts', 'genotype_table', 'draw_genotypes', 'draw_blocks', 'short_label']

#: Resolution of every PNG.
DPI = 200
_INPUT, _NODE, _OUTPUT = '#c7e9c0', '#deebf7', '#fdd0a2'


def _short(label: str) -> str:
    """``'normal/op_3_1'`` (edge from input 1 to node 3) -> ``'c_{k-1}→1'`` in the cell picture's names;
    ``'normal/input_3'`` -> ``'→1'`` (the incoming edges of node 1); other labels unchanged."""
    tail = label.split('/')[-1]
    parts = tail.split('_')
    if len(parts) == 3 and parts[0] == 'op' and parts[1].isdigit() and parts[2].isdigit():
        source = _node_name(int(parts[2]))
        return f'{"$" + source + "$" if "_" in source else source}→{int(parts[1]) - 2}'
    if len(parts) == 2 and parts[0] == 'input' and parts[1].isdigit():
        return f'→{int(parts[1]) - 2}'
    return tail


def _node_name(j: int) -> str:
    """Cell inputs 0 and 1 are ``c_{k-2}`` and ``c_{k-1}``; node ``j >= 2`` is intermediate node ``j - 2``."""
    return {0: 'c_{k-2}', 1: 'c_{k-1}'}.get(j, str(j - 2))


def _tex(name: str) -> str:
    return f'${name}$' if '_' in name else name


def _figure(width: float, height: float, dpi: int = DPI) -> Any:
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=dpi)


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches='tight', pad_inches=0.15)  # one tight-box pass: cheaper than a layout


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def figure_to_array(fig: Any) -> Any:
    """The figure rendered as an ``H x W x 3`` uint8 array (for TensorBoard's ``add_image``)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ----- cell graphs -----
def _cell_edges(pairs: Sequence[tuple[str, int]], concat: Sequence[int]) -> list[tuple[int, int, str | None]]:
    """``(source, target, op)``: the operation edges, then the edges into the output (node ``n + 2``, op None)."""
    out = len(pairs) // 2 + 2
    return [(int(j), 2 + k // 2, str(op)) for k, (op, j) in enumerate(pairs)] + \
        [(int(node), out, None) for node in concat]


@dataclass
class CellLayout:
    """Where the nodes sit on the line (``order``, left to right) and the side of each edge (``sides[i]``: +1 above,
    -1 below, 0 on the line between neighbours), for the edges of :func:`_cell_edges` in that order."""
    order: list[int]
    sides: list[int]
    op_crossings: int
    crossings: int


def cell_layout(pairs: Sequence[tuple[str, int]], concat: Sequence[int]) -> CellLayout:
    """The node order and arc sides with the fewest operation-edge crossings, then the fewest crossings in all, then
    the shortest arcs (see the module docstring). Intermediate nodes keep their order; the two inputs may sit
    anywhere among them; the output is last."""
    edges = _cell_edges(pairs, concat)
    n = len(pairs) // 2
    best: tuple | None = None
    middle = list(range(2, 2 + n))
    for first, second in itertools.permutations(range(n + 2), 2):
        order = middle.copy()
        for slot, node in sorted(((first, 0), (second, 1))):
            order.insert(slot, node)
        order.append(n + 2)
        candidate = _best_sides(edges, {node: i for i, node in enumerate(order)})
        score = (candidate[1], candidate[2], sum(abs(a - b) for a, b in candidate[3]), order)
        if best is None or score < best[0]:
            best = (score, order, candidate)
    assert best is not None
    _, order, (sides, op_crossings, crossings, _) = best
    return CellLayout(order, sides, op_crossings, crossings)


def _best_sides(edges: Sequence[tuple[int, int, str | None]], pos: Mapping[int, int]) -> tuple:
    spans = [tuple(sorted((pos[s], pos[t]))) for s, t, _ in edges]
    arcs = [i for i, (a, b) in enumerate(spans) if b - a > 1]
    ops = [i for i in arcs if edges[i][2] is not None]
    outs = [i for i in arcs if edges[i][2] is None]

    def interleave(i: int, j: int) -> bool:
        (a, b), (c, d) = spans[i], spans[j]
        return a < c < b < d or c < a < d < b

    conflicts = {i: [j for j in arcs if j != i and interleave(i, j)] for i in arcs}
    best: tuple | None = None
    # Output edges share their end, so they never interleave each other: given the operation edges' sides, each
    # takes the side it crosses least. The first operation arc is above (a mirror image is the same drawing).
    for bits in itertools.product((1, -1), repeat=max(len(ops) - 1, 0)) if len(ops) <= 15 else [()]:
        sides = [0] * len(edges)
        for i, side in zip(ops, (1, *bits)):
            sides[i] = side
        if len(ops) > 15:  # too many for the exhaustive search: greedy sides
            for i in ops:
                above = sum(sides[j] == 1 for j in conflicts[i])
                below = sum(sides[j] == -1 for j in conflicts[i])
                sides[i] = 1 if above <= below else -1
        op_cross = sum(sides[i] == sides[j] for i in ops for j in conflicts[i] if j in ops and j > i)
        total = op_cross
        for i in outs:
            above = sum(sides[j] == 1 for j in conflicts[i] if j in ops)
            below = sum(sides[j] == -1 for j in conflicts[i] if j in ops)
            sides[i] = -1 if below < above else 1
            total += min(above, below)
        if best is None or (op_cross, total) < best[1:3]:
            best = (sides, op_cross, total, [spans[i] for i in arcs])
    if best is None:  # no arcs at all
        best = ([0] * len(edges), 0, 0, [])
    return best


#: Horizontal distance between neighbouring nodes, an arc's height per unit of its half-width, and the half-height
#: of a node's box.
_STEP, _FLAT, _BOX = 2.4, 0.5, 0.26


def cell_geometry(pairs: Sequence[tuple[str, int]], concat: Sequence[int], layout: CellLayout | None = None,
                  points: int = 48) -> tuple[dict[int, tuple[float, float]], list[tuple[tuple[int, int, str | None],
                                                                                       list[tuple[float, float]]]]]:
    """Node positions and each edge as a polyline (``points`` points per arc) of the PNG's drawing.

    Arcs that meet at a node on the same side end at different points along its box (nested ones nested, the
    others apart), so no two arcs touch, not even at a shared node.
    """
    layout = layout or cell_layout(pairs, concat)
    n = len(pairs) // 2
    pos = {node: (i * _STEP, 0.0) for i, node in enumerate(layout.order)}
    edges = _cell_edges(pairs, concat)
    ends: dict[tuple[int, int], list[tuple[tuple[int, float], int, int]]] = {}
    for index, ((source, target, _), side) in enumerate(zip(edges, layout.sides)):
        for end, other in ((source, target), (target, source)):
            if side:
                span = pos[other][0] - pos[end][0]
                # left to right along the box: arcs to the left, shortest first, then arcs to the right, longest
                # first (each arc's ends then nest exactly as the arcs do)
                key = (0, -span) if span < 0 else (1, -span)
                ends.setdefault((end, side), []).append((key, index, 0 if end == source else 1))
    attach: dict[tuple[int, int], float] = {}
    for (node, _), members in ends.items():
        members.sort()
        width = 0.8 * _radius(node, n)
        for rank, (_, index, which) in enumerate(members):
            attach[(index, which)] = pos[node][0] + (0.0 if len(members) == 1 else
                                                     -width + 2 * width * rank / (len(members) - 1))
    lines = []
    for index, (edge, side) in enumerate(zip(edges, layout.sides)):
        if side == 0:
            line = [pos[edge[0]], pos[edge[1]]]
        else:
            x1, x2 = attach[(index, 0)], attach[(index, 1)]
            centre, radius = (x1 + x2) / 2, abs(x2 - x1) / 2
            start = math.pi if x1 < x2 else 0.0  # from the source's end of the diameter to the target's
            line = [(centre + radius * math.cos(start + (-1 if x1 < x2 else 1) * math.pi * t / (points - 1)),
                     side * _FLAT * radius * math.sin(math.pi * t / (points - 1))) for t in range(points)]
        lines.append((edge, line))
    return pos, lines


def draw_cell(pairs: Sequence[tuple[str, int]], concat: Sequence[int], title: str, path: Path) -> Any:
    """A DARTS cell as a graph (PNG, or any format matplotlib writes by ``path``'s suffix): inputs ``c_{k-2}``,
    ``c_{k-1}``, nodes ``0..n-1``, output ``c_{k}``; each operation edge labelled with its operation, the edges into
    the output grey (the layout of :func:`cell_layout`)."""
    from matplotlib.patches import FancyArrowPatch
    from matplotlib.path import Path as MplPath
    layout = cell_layout(pairs, concat)
    pos, lines = cell_geometry(pairs, concat, layout)
    n = len(pairs) // 2
    height = max((abs(y) for _, line in lines for _, y in line), default=1.0)
    fig = _figure(1.2 + 1.25 * (n + 3), 1.4 + 0.55 * 2 * max(height, 1.0))
    ax = fig.add_subplot()
    for (source, target, op), line in lines:
        colour = '#444444' if op else '#b0b0b0'
        line = _trim(line, pos[source], pos[target], _radius(source, n), _radius(target, n))  # heads outside
        ax.add_patch(FancyArrowPatch(path=MplPath(line), arrowstyle='-|>', mutation_scale=11, color=colour,
                                     lw=1.1 if op else 0.9, ls='-' if op else (0, (4, 2)), zorder=1,
                                     shrinkA=0, shrinkB=0))
        if op:
            x, y = line[len(line) // 2] if len(line) > 2 else ((line[0][0] + line[1][0]) / 2, 0.0)
            ax.text(x, y, op, ha='center', va='center', fontsize=6.5, zorder=2,
                    bbox={'boxstyle': 'round,pad=0.12', 'fc': 'white', 'ec': 'none', 'alpha': 0.9})
    for node, (x, y) in pos.items():
        name = 'c_{k}' if node == n + 2 else _node_name(node)
        ax.text(x, y, _tex(name), ha='center', va='center', fontsize=10, zorder=3,
                bbox={'boxstyle': 'round,pad=0.4', 'ec': '#333333',
                      'fc': _INPUT if node < 2 else _OUTPUT if node == n + 2 else _NODE})
    ax.set_xlim(-1.0, pos[n + 2][0] + 1.0)
    ax.set_ylim(-height - 0.5, height + 0.5)
    ax.set_aspect('equal')
    ax.axis('off')
    ax.set_title(title)
    _save(fig, path)
    return fig


def _radius(node: int, n: int) -> float:
    """About half the width of a node's box in data units (the inputs and the output have longer names)."""
    return 0.45 if node < 2 or node == n + 2 else 0.2


def _trim(line: list[tuple[float, float]], start: tuple[float, float], end: tuple[float, float],
          n_start: float, n_end: float) -> list[tuple[float, float]]:
    """``line`` without its parts inside the boxes (half-widths ``n_start``, ``n_end``) of the nodes at ``start``
    and ``end``."""
    if len(line) == 2:
        (x0, _), (x1, _) = line
        sign = 1 if x1 > x0 else -1
        return [(x0 + sign * (n_start + 0.05), 0.0), (x1 - sign * (n_end + 0.05), 0.0)]

    def inside(point: tuple[float, float], centre: tuple[float, float], half: float) -> bool:
        return abs(point[0] - centre[0]) < half + 0.05 and abs(point[1]) < _BOX + 0.03
    return [p for p in line if not inside(p, start, n_start) and not inside(p, end, n_end)]


def cell_digraph(pairs: Sequence[tuple[str, int]], concat: Sequence[int], title: str) -> Any:
    """The cell as a ``graphviz.Digraph`` (left to right, as the official DARTS ``visualize.py`` lays it out)."""
    import graphviz
    n = len(pairs) // 2
    graph = graphviz.Digraph(name=title, graph_attr={'rankdir': 'LR', 'label': title, 'labelloc': 't'},
                             node_attr={'shape': 'box', 'style': 'rounded,filled', 'fontname': 'Helvetica',
                                        'fontsize': '14'},
                             edge_attr={'fontname': 'Helvetica', 'fontsize': '10'})
    names = {j: _node_name(j) for j in range(n + 2)} | {n + 2: 'c_{k}'}
    for node, name in names.items():
        graph.node(name, fillcolor=_INPUT if node < 2 else _OUTPUT if node == n + 2 else _NODE)
    for source, target, op in _cell_edges(pairs, concat):
        graph.edge(names[source], names[target], **({'label': op} if op else {'color': 'gray'}))
    return graph


def write_cell_graph(pairs: Sequence[tuple[str, int]], concat: Sequence[int], title: str, stem: Path) -> list[Path]:
    """``stem.png`` (:func:`draw_cell`), ``stem.dot`` (graphviz source), and ``stem.svg``/``stem.pdf``: rendered by
    graphviz's ``dot`` when that binary is on ``PATH``, else drawn by matplotlib in the PNG's layout."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix('.png')]
    draw_cell(pairs, concat, title, written[0])
    graph = cell_digraph(pairs, concat, title)
    stem.with_suffix('.dot').write_text(graph.source)
    written.append(stem.with_suffix('.dot'))
    for suffix in ('.svg', '.pdf'):
        if shutil.which('dot'):
            stem.with_suffix(suffix).write_bytes(graph.pipe(format=suffix[1:]))
        else:
            draw_cell(pairs, concat, title, stem.with_suffix(suffix))
        written.append(stem.with_suffix(suffix))
    return written


# ----- architecture weights -----
def heatmap_figure(probs: Mapping[str, Mapping[str, float]], title: str, dpi: int = DPI) -> Any:
    """Rows: choices (edges ``j→i`` or blocks), columns: operations, cells: softmax weight (blank: no such
    candidate)."""
    labels = list(probs)
    ops = list(dict.fromkeys(op for label in labels for op in probs[label]))
    matrix = [[probs[label].get(op, math.nan) for op in ops] for label in labels]
    fig = _figure(1.6 + 0.85 * len(ops), 1.2 + 0.32 * len(labels), dpi)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap='viridis', aspect='auto', vmin=0.0)
    ax.set_xticks(range(len(ops)), ops, rotation=40, ha='right', fontsize=8)
    ax.set_yticks(range(len(labels)), [_short(label) for label in labels], fontsize=8)
    top = max((v for row in matrix for v in row if not math.isnan(v)), default=1.0)
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            if not math.isnan(value):
                ax.text(c, r, f'{value:.2f}', ha='center', va='center', fontsize=6.5,
                        color='black' if value > 0.55 * top else 'white')  # viridis: light above the middle
    fig.colorbar(image, ax=ax, label='softmax weight')
    ax.set_title(title)
    return fig


def draw_heatmap(probs: Mapping[str, Mapping[str, float]], title: str, path: Path) -> Any:
    fig = heatmap_figure(probs, title)
    _save(fig, path)
    return fig


def _epochs(history: Sequence[Mapping[str, Any]]) -> list[int]:
    return [int(h.get('epoch', i)) for i, h in enumerate(history)]


def draw_history(history: Sequence[Mapping[str, Any]], labels: Sequence[str], title: str, path: Path,
                 ylabel: str = 'probability') -> Any:
    """One small panel per choice: the probability of each operation per epoch (one colour per operation)."""
    epochs = _epochs(history)
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
        _integer_epochs(ax)
    for index, ax in enumerate(axes.flat):
        if index >= len(labels):
            ax.axis('off')
        elif index + cols >= len(labels):  # the lowest panel of its column shows the epochs
            ax.tick_params(labelbottom=True)
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=colors[op]) for op in ops]
    height = 1.9 * rows + 0.6
    fig.subplots_adjust(hspace=0.35, wspace=0.08, top=1 - 0.55 / height, bottom=0.5 / height)
    fig.legend(handles, [_tex(_node_name(int(op))) if str(op).isdigit() else op for op in ops], loc='center left',
               bbox_to_anchor=(0.91, 0.5), fontsize=8)
    fig.supxlabel('epoch', fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    fig.suptitle(title)
    _save(fig, path)
    return fig


# ----- per-epoch figures -----
def draw_curves(history: Sequence[Mapping[str, Any]], path: Path) -> Any:
    """Supernet accuracy (architecture half) and training accuracy per epoch; training and architecture loss."""
    epochs = _epochs(history)
    fig = _figure(8.0, 3.2)
    acc, loss = fig.subplots(1, 2)
    for ax, keys, ylabel in ((acc, (('supernet_val_acc', 'supernet, architecture half'),
                                    ('train_acc', 'training batches')), 'accuracy'),
                             (loss, (('train_loss', 'weight step (training half)'),
                                     ('arch_loss', 'architecture step')), 'cross-entropy loss')):
        for key, name in keys:
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [math.nan if v is None else v for v in values], marker='o', ms=3, lw=1.3,
                        label=name)
        ax.set_xlabel('epoch')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
        if ax.lines:
            ax.legend(fontsize=8)
    acc.set_ylim(0.0, 1.0)
    fig.suptitle('supernet training per epoch')
    fig.subplots_adjust(wspace=0.3)
    _save(fig, path)
    return fig


def beta_labels(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Labels of the per-node input weights (PC-DARTS' edge-normalization ``softmax(beta)``) in ``history``."""
    last = history[-1].get('probs', {}) if history else {}
    return [label for label in last if label.split('/')[-1].startswith('input_')]


def draw_betas(history: Sequence[Mapping[str, Any]], labels: Sequence[str], title: str, path: Path) -> Any:
    """PC-DARTS' edge normalization: ``softmax(beta)`` over each node's incoming edges per epoch (one panel per
    node, one line per input)."""
    return draw_history(history, labels, title, path, ylabel='edge weight softmax(beta)')


def skip_counts(history: Sequence[Mapping[str, Any]], op: str = 'skip_connect') -> dict[str, list[int | None]]:
    """``{cell type: number of ``op`` edges in the derived cell, per epoch}`` (``None`` where no genotype)."""
    from .genotype import CELL_TYPES
    return {cell: [None if not h.get('genotype') else sum(p[0] == op for p in h['genotype'][cell]) for h in history]
            for cell in CELL_TYPES}


def draw_skip_counts(history: Sequence[Mapping[str, Any]], path: Path) -> Any:
    """The number of ``skip_connect`` in the derived cells per epoch: DARTS' collapse diagnostic (a normal cell that
    fills with skips, Zela et al. 2020, Chen & Hsieh 2020)."""
    epochs = _epochs(history)
    counts = skip_counts(history)
    edges = max((len(h['genotype']['normal']) for h in history if h.get('genotype')), default=8)
    fig = _figure(5.0, 3.0)
    ax = fig.add_subplot()
    for (cell, values), marker in zip(counts.items(), 'os'):
        ax.plot(epochs, [math.nan if v is None else v for v in values], marker=marker, ms=4, lw=1.3,
                label=f'{cell} cell')
    ax.set_ylim(-0.3, edges + 0.3)
    from matplotlib.ticker import MaxNLocator
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _integer_epochs(ax)
    ax.set_xlabel('epoch')
    ax.set_ylabel(f'skip_connect edges (of {edges})')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title('skip connections in the derived cell per epoch')
    _save(fig, path)
    return fig


_ABBREVIATIONS = {'sep_conv_': 'sep', 'dil_conv_': 'dil', 'max_pool_': 'max', 'avg_pool_': 'avg',
                  'skip_connect': 'skip', 'conv_7x1_1x7': 'c7x1', 'none': 'none'}


def _abbreviate(op: str) -> str:
    for long, short in _ABBREVIATIONS.items():
        if op.startswith(long):
            return short + op[len(long):].split('x')[0] if op != long else short
    return op


def genotype_table(history: Sequence[Mapping[str, Any]], cell: str) -> tuple[list[str], list[list[str]]]:
    """Column names (``'0: a'``, ``'0: b'``, ... the two inputs of each node) and one row per epoch of ``cell``'s
    derived edges, each ``'op ← input'`` with operations abbreviated (``sep3`` for ``sep_conv_3x3``)."""
    rows = [h['genotype'][cell] for h in history if h.get('genotype')]
    width = max((len(r) for r in rows), default=0)
    columns = [f'{k // 2}{"ab"[k % 2]}' for k in range(width)]
    return columns, [[f'{_abbreviate(op)}←{_node_name(int(j)).replace("c_{k-", "k-").rstrip("}")}'
                      for op, j in row] for row in rows]


def draw_genotypes(history: Sequence[Mapping[str, Any]], path: Path) -> Any:
    """The derived cells per epoch as two tables (normal, reduction): a row per epoch, a column per edge (node
    ``i``'s inputs ``ia`` and ``ib``), a cell's colour per operation; a change from the epoch above is bold."""
    from .genotype import CELL_TYPES
    epochs = [e for e, h in zip(_epochs(history), history) if h.get('genotype')]
    tables = {cell: genotype_table(history, cell) for cell in CELL_TYPES}
    width = max(len(columns) for columns, _ in tables.values())
    fig = _figure(1.2 + 1.05 * width, 0.5 + 2 * (0.45 + 0.2 * len(epochs)))
    axes = fig.subplots(2, 1)
    names = sorted({text.split('←')[0] for _, rows in tables.values() for row in rows for text in row})
    colours = {name: f'C{i % 10}' for i, name in enumerate(names)}
    from matplotlib.colors import to_rgba
    for ax, (cell, (columns, rows)) in zip(axes, tables.items()):
        ax.axis('off')
        ax.set_title(f'{cell} cell per epoch', fontsize=9)
        if not rows:
            continue
        table = ax.table(cellText=rows, colLabels=columns, rowLabels=[f'epoch {e}' for e in epochs],
                         cellLoc='center', loc='center')
        table.auto_set_font_size(False)
        table.set_fontsize(7)
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                box = table[r + 1, c]
                box.set_facecolor(to_rgba(colours[text.split('←')[0]], 0.25))
                if r and rows[r - 1][c] != text:
                    box.get_text().set_fontweight('bold')
    fig.suptitle('derived genotype per epoch')
    _save(fig, path)
    return fig


def draw_blocks(probs: Mapping[str, Mapping[str, float]], path: Path, title: str = 'chosen blocks') -> Any:
    """The chosen operation of each block of a chain space (ProxylessNAS' ``block_i``): a bar per block, its
    height the chosen operation's probability, labelled with the operation; one colour per operation."""
    labels = sorted(probs, key=lambda label: [int(t) if t.isdigit() else t for t in label.replace('/', '_')
                                              .split('_')])
    chosen = [max(probs[label].items(), key=lambda kv: kv[1]) for label in labels]
    names = list(dict.fromkeys(op for label in labels for op in probs[label]))
    colours = {name: f'C{i % 10}' for i, name in enumerate(names)}
    fig = _figure(1.5 + 0.42 * len(labels), 3.4)
    ax = fig.add_subplot()
    ax.bar(range(len(labels)), [p for _, p in chosen], color=[colours[op] for op, _ in chosen])
    for i, (op, p) in enumerate(chosen):
        ax.text(i, p + 0.02, op, rotation=90, ha='center', va='bottom', fontsize=7)
    ax.set_xticks(range(len(labels)), [label.split('_')[-1] for label in labels], fontsize=7)
    ax.set_xlabel('block')
    ax.set_ylabel('probability of the chosen operation')
    ax.set_ylim(0, 1.35)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=colours[n], label=n) for n in names], fontsize=7, ncol=min(len(names), 4),
              loc='upper right')
    ax.set_title(title)
    _save(fig, path)
    return fig


short_label = _short
