"""Figures: the cell graph's layout has no crossing operation edges (checked geometrically), the graphviz files,
200-dpi PNGs, integer epoch ticks, and the per-epoch figures' numbers."""
from __future__ import annotations

import itertools
import math

import pytest
from PIL import Image

from nni_darts_variants import figures
from nni_darts_variants.figures import (cell_geometry, cell_layout, draw_blocks, draw_curves, draw_genotypes,
                                        draw_skip_counts, genotype_table, skip_counts, write_cell_graph)
from nni_darts_variants.retrain.presets import get_preset, list_presets

PNG = b'\x89PNG\r\n\x1a\n'
CELLS = [(name, cell) for name in list_presets() for cell in ('normal', 'reduce')]

# Boxes of the drawn nodes (what lies inside one is hidden under it): generous half-width and half-height.
HALF_W, HALF_H = 0.5, 0.3


def _outside_boxes(line, nodes):
    return [p for p in line if not any(abs(p[0] - x) < HALF_W and abs(p[1] - y) < HALF_H for x, y in nodes)]


def _segments(points):
    return list(zip(points, points[1:]))


def _cross(s, t):
    """Whether segments ``s`` and ``t`` properly intersect (orientation test)."""
    def orient(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    (p1, p2), (q1, q2) = s, t
    d1, d2, d3, d4 = orient(q1, q2, p1), orient(q1, q2, p2), orient(p1, p2, q1), orient(p1, p2, q2)
    return d1 * d2 < 0 and d3 * d4 < 0


def _distance(p, segment):
    (ax, ay), (bx, by) = segment
    length2 = (bx - ax) ** 2 + (by - ay) ** 2
    t = 0.0 if length2 == 0 else max(0.0, min(1.0, ((p[0] - ax) * (bx - ax) + (p[1] - ay) * (by - ay)) / length2))
    return math.hypot(p[0] - ax - t * (bx - ax), p[1] - ay - t * (by - ay))


def _drawn(genotype, cell):
    pairs, concat = getattr(genotype, cell), getattr(genotype, f'{cell}_concat')
    pos, lines = cell_geometry(pairs, concat, points=80)
    nodes = list(pos.values())
    dense = [(edge, line if len(line) > 2 else [(line[0][0] + t / 79 * (line[1][0] - line[0][0]), 0.0)
                                                for t in range(80)]) for edge, line in lines]
    return [(edge, _outside_boxes(line, nodes)) for edge, line in dense], nodes


def _crossings(drawn, only_ops):
    count = 0
    for (e1, l1), (e2, l2) in itertools.combinations(drawn, 2):
        if only_ops and (e1[2] is None or e2[2] is None):
            continue
        count += sum(_cross(s, t) for s in _segments(l1) for t in _segments(l2))
    return count


@pytest.mark.parametrize('name,cell', CELLS)
def test_published_cells_have_no_crossing_or_touching_operation_edges(name, cell):
    drawn, nodes = _drawn(get_preset(name), cell)
    assert _crossings(drawn, only_ops=True) == 0
    ops = [(edge, line) for edge, line in drawn if edge[2] is not None]
    for (_, l1), (_, l2) in itertools.combinations(ops, 2):  # no two operation edges run on top of each other
        assert min(_distance(p, s) for p in l1[::4] for s in _segments(l2)) > 0.04
    for (source, target, _), line in drawn:  # no edge passes through a node it does not join
        others = [xy for node, xy in zip(_node_ids(name, cell), nodes) if node not in (source, target)]
        assert not any(abs(px - x) < HALF_W and abs(py - y) < HALF_H for px, py in line for x, y in others)


def _node_ids(name, cell):
    genotype = get_preset(name)
    pos, _ = cell_geometry(getattr(genotype, cell), getattr(genotype, f'{cell}_concat'))
    return list(pos)


@pytest.mark.parametrize('name,cell', CELLS)
def test_crossings_drawn_are_the_ones_the_layout_counts(name, cell):
    genotype = get_preset(name)
    layout = cell_layout(getattr(genotype, cell), getattr(genotype, f'{cell}_concat'))
    drawn, _ = _drawn(genotype, cell)
    assert _crossings(drawn, only_ops=False) == layout.crossings
    assert layout.op_crossings == 0


def test_darts_v2_normal_cell_needs_exactly_one_crossing():
    """Nodes 0, 1, 2 of DARTS_V2's normal cell read both inputs and feed the output: K3,3, whose crossing number
    is 1. The drawing reaches that bound, with the crossing on a grey output edge."""
    genotype = get_preset('DARTS_V2')
    readers = [k // 2 for k, (_, j) in enumerate(genotype.normal) if j in (0, 1)]
    both = [node for node in set(readers) if readers.count(node) == 2]
    assert len(both) >= 3 and set(both) <= {n - 2 for n in genotype.normal_concat}  # K3,3 is in the graph
    drawn, _ = _drawn(genotype, 'normal')
    assert _crossings(drawn, only_ops=False) == 1


def _dpi(path):
    return Image.open(path).info['dpi']


def test_cell_graph_files_through_graphviz(tmp_path):
    genotype = get_preset('DARTS_V2')
    written = write_cell_graph(genotype.normal, genotype.normal_concat, 'normal cell', tmp_path / 'cell_normal')
    assert sorted(p.name for p in written) == ['cell_normal.dot', 'cell_normal.pdf', 'cell_normal.png',
                                               'cell_normal.svg']
    assert (tmp_path / 'cell_normal.png').read_bytes()[:8] == PNG
    assert _dpi(tmp_path / 'cell_normal.png') == pytest.approx((200, 200), abs=0.5)
    source = (tmp_path / 'cell_normal.dot').read_text()
    assert source.startswith('digraph') and 'rankdir=LR' in source
    assert source.count('->') == len(genotype.normal) + len(genotype.normal_concat)
    assert (tmp_path / 'cell_normal.pdf').read_bytes()[:5] == b'%PDF-'
    svg = (tmp_path / 'cell_normal.svg').read_text()
    assert '<svg' in svg and svg.count('sep_conv_3x3') >= 5
    if figures.shutil.which('dot'):
        assert 'Generated by graphviz' in svg


def test_cell_graph_without_the_dot_binary_falls_back_to_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(figures.shutil, 'which', lambda name: None)
    genotype = get_preset('DARTS_V1')
    write_cell_graph(genotype.reduce, genotype.reduce_concat, 'reduce cell', tmp_path / 'cell')
    svg = (tmp_path / 'cell.svg').read_text()
    assert '<svg' in svg and 'graphviz' not in svg and 'Matplotlib' in svg
    assert (tmp_path / 'cell.pdf').read_bytes()[:5] == b'%PDF-'
    assert (tmp_path / 'cell.dot').read_text().startswith('digraph')  # the source needs no binary


def _history(genotypes):
    return [{'epoch': e, 'supernet_val_acc': 0.1 * (e + 1), 'train_acc': 0.2, 'train_loss': 2.0 - 0.1 * e,
             'arch_loss': 2.1, 'genotype': g} for e, g in enumerate(genotypes)]


def _pairs(ops, inputs=(0, 1, 0, 1, 0, 1, 0, 1)):
    return [[op, j] for op, j in zip(ops, inputs)]


def test_skip_counts_per_epoch():
    normal = [_pairs(['sep_conv_3x3'] * 8), _pairs(['skip_connect'] * 3 + ['sep_conv_3x3'] * 5),
              _pairs(['skip_connect'] * 8)]
    reduce = [_pairs(['max_pool_3x3'] * 7 + ['skip_connect'])] * 3
    history = _history([{'normal': n, 'reduce': r} for n, r in zip(normal, reduce)]) + [{'epoch': 3}]
    assert skip_counts(history) == {'normal': [0, 3, 8, None], 'reduce': [1, 1, 1, None]}


def test_genotype_table_rows_and_columns():
    g0 = {'normal': _pairs(['sep_conv_3x3', 'skip_connect', 'dil_conv_5x5', 'max_pool_3x3'], (0, 1, 2, 0)),
          'reduce': _pairs(['avg_pool_3x3', 'none'], (1, 0))}
    columns, rows = genotype_table(_history([g0]), 'normal')
    assert columns == ['0a', '0b', '1a', '1b']
    assert rows == [['sep3←k-2', 'skip←k-1', 'dil5←0', 'max3←k-2']]
    assert genotype_table(_history([g0]), 'reduce')[1] == [['avg3←k-1', 'none←k-2']]


def _integer_ticks(ax):
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    return ticks and all(float(t).is_integer() for t in ticks)


def test_per_epoch_figures_are_200_dpi_png_with_integer_epoch_ticks(tmp_path):
    genotype = get_preset('DARTS_V2').to_dict()
    history = _history([genotype, genotype, genotype])
    for draw, name in ((draw_curves, 'curves.png'), (draw_skip_counts, 'skip.png')):
        fig = draw(history, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == PNG
        assert _dpi(tmp_path / name) == pytest.approx((200, 200), abs=0.5)
        assert all(_integer_ticks(ax) for ax in fig.axes), name
    draw_genotypes(history, tmp_path / 'genotypes.png')
    assert _dpi(tmp_path / 'genotypes.png') == pytest.approx((200, 200), abs=0.5)


def test_blocks_figure_shows_the_most_likely_operation(tmp_path):
    probs = {f'block_{i}': {'mb3_k3': 0.1, 'mb6_k5': 0.7 if i % 2 else 0.2, 'zero': 0.2 if i % 2 else 0.7}
             for i in range(12)}
    fig = draw_blocks(probs, tmp_path / 'blocks.png')
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(12)]  # block 10 after 9
    labels = [t.get_text() for t in ax.texts]
    assert labels == ['mb6_k5' if i % 2 else 'zero' for i in range(12)]
    assert [round(p.get_height(), 6) for p in ax.patches] == [0.7] * 12
