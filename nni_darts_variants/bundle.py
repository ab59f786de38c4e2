"""The result bundle of a search: pictures, architecture weights, size and the command that retrains the result.

:func:`write_bundle` writes ``RUN_DIR/bundle/`` next to the files the runner already left in ``RUN_DIR``
(``genotype.json``, ``sample.json``, ``alphas.json``, ``alpha_history.json``), which the bundle references instead of
copying. Figures are drawn with matplotlib's object-oriented API on the Agg canvas (no global backend is touched);
a figure or size count that fails is logged and listed under ``errors`` in ``summary.json``, never raised.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from .genotype import CELL_TYPES, Genotype
from .counting import count_parameters

__all__ = ['write_bundle', 'count_parameters', 'count_multiply_adds', 'network_stats', 'op_choices',
           'final_probabilities', 'draw_cell', 'draw_heatmap', 'draw_history', 'retrain_command', 'BUNDLE_DIR']

_logger = logging.getLogger(__name__)

#: Folder of the bundle inside the run folder.
BUNDLE_DIR = 'bundle'
#: Published recipes the retrain command may point at (relative to the repository root).
RECIPE_DIR = Path(__file__).resolve().parents[1] / 'experiments' / 'retrain'


# ----- size of the derived network -----
@torch.no_grad()
def count_multiply_adds(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-adds of every ``Conv2d`` and ``Linear`` in one eval-mode forward of a zero input (bias excluded).

    This is what NAS papers (DARTS, PC-DARTS, ProxylessNAS) report as "FLOPs". Convolution: ``output elements x
    in_channels / groups x kernel area``; linear: ``output elements x in_features``.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def linear_hook(module: nn.Linear, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = [m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(*input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def network_stats(model: nn.Module, input_shape: Sequence[int], description: str) -> dict[str, Any]:
    return {'description': description, 'params': count_parameters(model),
            'flops': count_multiply_adds(model, input_shape), 'input_shape': list(input_shape)}


# ----- architecture weights -----
def op_choices(space: Any) -> dict[str, list[str]]:
    """``{label: candidate names}`` of the operation choices of a model space (choices over names, not inputs)."""
    from nni.mutable import Categorical
    return {label: [str(v) for v in m.values] for label, m in space.simplify().items()
            if type(m) is Categorical and all(isinstance(v, str) for v in m.values)}


def final_probabilities(final_alphas: Mapping[str, Any], choices: Mapping[str, list[str]],
                        history: Sequence[Mapping[str, Any]] = ()) -> dict[str, dict[str, float]]:
    """Softmax of each choice's final alpha; a choice whose alpha does not fit its candidates falls back to the
    probabilities of the last epoch in ``history``."""
    last = history[-1].get('probs', {}) if history else {}
    probs: dict[str, dict[str, float]] = {}
    for label, names in choices.items():
        values = final_alphas.get(label)
        if values and isinstance(values[0], list):
            values = values[0]
        if values is not None and len(values) == len(names):
            probs[label] = dict(zip(names, torch.softmax(torch.tensor(values, dtype=torch.float64), 0).tolist()))
        elif label in last:
            probs[label] = {str(k): float(v) for k, v in last[label].items()}
    return probs


def _group(label: str) -> str:
    return label.split('/')[0] if '/' in label else 'choices'


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


# ----- figures -----
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


# ----- the bundle -----
def retrain_command(run_dir: str | Path, strategy: str, dataset: str, genotype: Genotype | None) -> str | None:
    """``nni-darts retrain RUN_DIR experiments/retrain/<strategy>-<cifar10|imagenet>.yml`` (the DARTS recipe when
    the strategy has none); ``None`` without a genotype (``nni-darts retrain`` rebuilds DARTS cells only)."""
    if genotype is None:
        return None
    target = 'imagenet' if dataset == 'imagenet' else 'cifar10'
    recipe = next((f'{name}-{target}.yml' for name in (strategy, 'darts')
                   if (RECIPE_DIR / f'{name}-{target}.yml').exists()), f'darts-{target}.yml')
    return f'nni-darts retrain {run_dir} experiments/retrain/{recipe}'


def _figures(out: Path, genotype: Genotype | None, probs: dict[str, dict[str, float]],
             history: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    jobs: list[tuple[str, Callable[[Path], None]]] = []
    if genotype is not None:
        for cell in CELL_TYPES:
            jobs.append((f'cell_{cell}.png', lambda p, c=cell: draw_cell(
                getattr(genotype, c), getattr(genotype, f'{c}_concat'), f'{c} cell', p)))
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for label, p in probs.items():
        groups.setdefault(_group(label), {})[label] = p
    for group, members in groups.items():
        jobs.append((f'weights_{group}.png', lambda p, g=group, m=members: draw_heatmap(
            m, f'final architecture weights: {g}', p)))
        if history:
            jobs.append((f'history_{group}.png', lambda p, g=group, m=members: draw_history(
                history, list(m), f'architecture weights per epoch: {g}', p)))
    written, errors = _run_guarded({name: lambda d=draw, n=name: d(out / n) for name, draw in jobs})
    return list(written), errors


def _stats(space: Any, sample: Mapping[str, Any], genotype: Genotype | None,
           data_info: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    size = int(data_info['image_size'])
    jobs = {'search_network': lambda: network_stats(
        space.freeze(dict(sample)), (1, int(data_info['in_channels']), size, size),
        'the search space frozen to the sample (search-time width and depth)')}
    if genotype is not None:
        from .retrain.network import EvalNetwork
        jobs['retrain_network'] = lambda: network_stats(
            EvalNetwork(genotype, auxiliary=False), (1, 3, 32, 32),
            'DARTS CIFAR-10 evaluation network of the genotype (20 cells, C=36, no auxiliary head)')
    return _run_guarded(jobs)


def _run_guarded(jobs: Mapping[str, Callable[[], Any]]) -> tuple[dict[str, Any], list[str]]:
    """Run each job; a failure is logged and listed, never raised (it must not lose a finished search)."""
    results, errors = {}, []
    for name, job in jobs.items():
        try:
            results[name] = job()
        except Exception as err:
            _logger.warning('bundle: could not make %s (%s: %s)', name, type(err).__name__, err, exc_info=True)
            errors.append(f'{name}: {type(err).__name__}: {err}')
    return results, errors


def _readme(summary: Mapping[str, Any]) -> str:
    lines = ['# Search result bundle', '', 'Files (paths relative to this folder):', '']
    lines += [f'- `{path}`: {what}' for path, what in summary['files'].items()]
    lines += ['', 'Network size (FLOPs = multiply-adds of Conv2d and Linear layers, batch 1):', '']
    for name, s in summary['networks'].items():
        lines.append(f'- {name}: {s["params"]:,} parameters, {s["flops"] / 1e6:,.1f} M FLOPs at input '
                     f'{"x".join(map(str, s["input_shape"]))} ({s["description"]})')
    command = summary['retrain_command']
    lines += ['', 'Retrain from scratch:', '', f'    {command}' if command else
              '    (no DARTS genotype: `nni-darts retrain` does not apply; train `space.freeze(sample)` instead)']
    if summary['errors']:
        lines += ['', 'What could not be made:', ''] + [f'- {e}' for e in summary['errors']]
    return '\n'.join(lines) + '\n'


def _describe_figure(name: str) -> str:
    kind, _, rest = name[:-4].partition('_')
    return {'cell': f'the searched {rest} cell as a graph, edges labelled with their operation',
            'weights': f'heatmap of the final architecture weights (softmax per choice) of {rest}',
            'history': f'architecture weights of {rest} per epoch'}[kind]


def write_bundle(run_dir: str | Path, *, genotype: Genotype | None, sample: Mapping[str, Any],
                 alpha_history: Sequence[Mapping[str, Any]] | str | Path, final_alphas: Mapping[str, Any],
                 space_factory: Callable[[], Any], data_info: Mapping[str, Any],
                 retrain_command: str | None) -> dict[str, Any]:
    """Write ``run_dir/bundle/``: cell graphs, weight heatmaps and histories, ``summary.json`` and ``README.md``.

    Parameters
    ----------
    run_dir
        The run folder; ``genotype.json`` and ``sample.json`` there are referenced (written into the bundle only
        when the run folder lacks them).
    genotype
        The searched genotype, or ``None`` for spaces without DARTS cells (no cell pictures then).
    sample
        NNI sample dict of the architecture; ``space_factory().freeze(sample)`` gives the derived network.
    alpha_history
        The per-epoch list the runner writes (``alpha_history.json``, or its path): dicts with ``'epoch'`` and
        ``'probs'`` ``{label: {op: prob}}``.
    final_alphas
        ``{label: alpha values}`` at the end of the search (``alphas.json``).
    space_factory
        Builds a fresh model space like the searched one.
    data_info
        ``in_channels``, ``image_size`` and ``num_classes`` of the search data.
    retrain_command
        The command that retrains the result (``None`` when none applies).

    Returns the summary (also written as ``summary.json``).
    """
    run_dir = Path(run_dir)
    out = run_dir / BUNDLE_DIR
    out.mkdir(parents=True, exist_ok=True)
    history = json.loads(Path(alpha_history).read_text()) if isinstance(alpha_history, (str, Path)) \
        else list(alpha_history)
    files = {}
    for name, data in (('genotype.json', genotype.to_dict() if genotype is not None else None),
                       ('sample.json', dict(sample))):
        if data is None:
            continue
        if (run_dir / name).exists():
            name = f'../{name}'
        else:
            (out / name).write_text(json.dumps(data, indent=1) + '\n')
        files[name] = f'the searched architecture ({Path(name).stem})'
    space = space_factory()
    probs = final_probabilities(final_alphas, op_choices(space), history)
    figures, errors = _figures(out, genotype, probs, history)
    networks, stats_errors = _stats(space, sample, genotype, data_info)
    files.update({name: _describe_figure(name) for name in figures})
    files.update({'summary.json': 'sizes, final weights, retrain command, data', 'README.md': 'this list'})
    summary = {'files': files, 'genotype': genotype.to_dict() if genotype is not None else None,
               'sample': dict(sample), 'networks': networks,
               'flops_counting': 'multiply-adds of Conv2d and Linear layers, batch 1, eval mode',
               'retrain_command': retrain_command, 'data': dict(data_info), 'epochs': len(history),
               'final_probs': probs, 'errors': errors + stats_errors}
    (out / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
    (out / 'README.md').write_text(_readme(summary))
    return summary
