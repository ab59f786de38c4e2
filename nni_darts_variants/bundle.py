"""The result bundle of a search: pictures, architecture weights, size and the command that retrains the result.

:func:`write_bundle` writes ``RUN_DIR/bundle/`` next to the files the runner already left in ``RUN_DIR``
(``genotype.json``, ``sample.json``, ``alphas.json``, ``alpha_history.json``), which the bundle references instead of
copying. Figures come from :mod:`nni_darts_variants.figures`; its JSON files are written atomically (never half-written);
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
from .atomic import atomic_write_json, atomic_write_text
from .config import recipe_names
from .counting import count_parameters
from .figures import draw_cell, draw_heatmap, draw_history

__all__ = ['write_bundle', 'count_parameters', 'count_multiply_adds', 'network_stats', 'op_choices',
           'final_probabilities', 'draw_cell', 'draw_heatmap', 'draw_history', 'retrain_command', 'BUNDLE_DIR',
           'RETRAIN_RECIPES']

_logger = logging.getLogger(__name__)

#: Folder of the bundle inside the run folder.
BUNDLE_DIR = 'bundle'
#: The shipped retrain recipes (``retrain/<name>.yml``, package data) that the retrain command may name; the command
#: says ``experiments/retrain/<name>.yml``, which runs in a checkout and, as a recipe name, wherever it is installed.
RETRAIN_RECIPES = frozenset(Path(name).stem for name in recipe_names('retrain'))


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


# ----- the bundle -----
def retrain_command(run_dir: str | Path, strategy: str, dataset: str, genotype: Genotype | None) -> str | None:
    """``nni-darts retrain RUN_DIR experiments/retrain/<strategy>-<cifar10|imagenet>.yml`` (the DARTS recipe when
    the strategy has none); ``None`` without a genotype (``nni-darts retrain`` rebuilds DARTS cells only)."""
    if genotype is None:
        return None
    target = 'imagenet' if dataset == 'imagenet' else 'cifar10'
    recipe = next((f'{name}-{target}.yml' for name in (strategy, 'darts')
                   if f'{name}-{target}' in RETRAIN_RECIPES), f'darts-{target}.yml')
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
            atomic_write_json(out / name, data)
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
    atomic_write_json(out / 'summary.json', summary)
    atomic_write_text(out / 'README.md', _readme(summary))
    return summary
