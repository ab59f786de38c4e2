"""``nni-darts export RUN_DIR --format ...`` and ``nni-darts bundle RUN_DIR``: a search result as files.

Formats: ``genotype`` (the DARTS genotype JSON), ``nni`` (NNI's sample dict, what ``model_space.freeze`` takes),
``nb201`` (the NAS-Bench-201 architecture string), ``onnx`` (:func:`torch.onnx.export`) and ``torchscript``
(:func:`torch.jit.trace`) of the frozen network. The frozen network of a DARTS genotype is the retrain network
(:class:`~nni_darts_variants.retrain.EvalNetwork`, shaped by a retrain recipe, by default the DARTS CIFAR-10 one or the
ImageNet one for an ImageNet search; no auxiliary head); of any other space it is ``space.freeze(sample)``, rebuilt
from the run's config for the search data's input channels, image size and classes. Every check runs before the
file is written; a failure is a one-line ``ValueError``.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_text
from .show import RunFolder, load_run

__all__ = ['FORMATS', 'export_run', 'export_text', 'frozen_network', 'redraw_bundle']

#: Format -> default file name (under ``RUN_DIR/export/``).
FORMATS = {'genotype': 'genotype.json', 'nni': 'sample.json', 'nb201': 'nb201.txt', 'onnx': 'model.onnx',
           'torchscript': 'model.pt'}


def _require_result(run: RunFolder) -> dict[str, Any]:
    if run.sample is None:
        raise ValueError(f'{run.path} has no sample.json (the search has not finished); export a finished run')
    return run.sample


def _genotype(run: RunFolder) -> Any:
    """The run's DARTS genotype (``genotype.json``, or a DartsSpace sample); ``None`` for other spaces."""
    from .genotype import Genotype
    if run.genotype is not None:
        return Genotype.from_dict(run.genotype)
    sample = _require_result(run)
    if any(str(key).startswith('normal/input_') for key in sample):
        return Genotype.from_sample(sample)
    return None


def export_text(run: RunFolder, fmt: str) -> str:
    """The text of the ``genotype``, ``nni`` or ``nb201`` export of ``run``."""
    sample = _require_result(run)
    if fmt == 'nni':
        return json.dumps(sample, indent=2) + '\n'
    if fmt == 'genotype':
        genotype = _genotype(run)
        if genotype is None:
            raise ValueError(f'{run.path} is a search in space {run.space!r}, which has no DARTS genotype; use '
                             '--format nni (its NNI sample), onnx or torchscript')
        return json.dumps(genotype.to_dict(), indent=2) + '\n'
    from .nasbench201 import is_nb201_sample, sample_to_arch
    if not is_nb201_sample(sample):
        raise ValueError(f'--format nb201 needs a NAS-Bench-201 run; {run.path} searched space {run.space!r}, whose '
                         'sample is no NAS-Bench-201 cell; use --format nni')
    return sample_to_arch(sample) + '\n'


def _data_info(run: RunFolder) -> dict[str, int]:
    """Input channels, image size and classes of the run's search data: from the bundle, else by loading the data
    as the search did (nothing is written)."""
    info = (run.bundle or {}).get('data')
    if info and all(key in info for key in ('in_channels', 'image_size', 'num_classes')):
        return {key: int(info[key]) for key in ('in_channels', 'image_size', 'num_classes')}
    from .search import resolve_config
    from .search.runner import _build_data
    data = _build_data(resolve_config(run.config))
    return {'in_channels': data.in_channels, 'image_size': data.image_size, 'num_classes': data.num_classes}


def frozen_network(run: RunFolder, recipe: str | Path | None = None) -> tuple[Any, tuple[int, ...]]:
    """``(network in eval mode, input shape of batch 1)`` of a finished run (see the module docstring)."""
    genotype = _genotype(run)
    if genotype is not None:
        from .retrain import resolve_config as retrain_config
        from .retrain.network import EvalNetwork
        imagenet = run.config.get('data', {}).get('name') == 'imagenet'
        overrides = ['model.network=imagenet', 'model.channels=48', 'model.layers=14'] if imagenet and not recipe \
            else []
        model = retrain_config(recipe, overrides)['model']
        size = 224 if model['network'] == 'imagenet' else 32
        classes = model['num_classes'] or (1000 if model['network'] == 'imagenet' else 10)
        network = EvalNetwork(genotype, channels=model['channels'], layers=model['layers'], num_classes=classes,
                              auxiliary=False, network=model['network'])
        return network.eval(), (1, 3, size, size)
    if recipe is not None:
        raise ValueError(f'--recipe shapes the DARTS retrain network only; {run.path} searched space {run.space!r} '
                         '(exported as searched); remove --recipe')
    from .retrain.network import frozen_space_network
    info = _data_info(run)
    network = frozen_space_network(run.config['space'], run.sample, num_classes=info['num_classes'],
                                   in_channels=info['in_channels'], dataset_hint=run.config['data']['name'])
    return network.eval(), (1, info['in_channels'], info['image_size'], info['image_size'])


def _network_bytes(network: Any, shape: tuple[int, ...], fmt: str) -> bytes:
    """The ONNX or TorchScript file of ``network`` traced at ``shape`` (batch size left dynamic in ONNX)."""
    import io

    import torch
    example, buffer = torch.zeros(*shape), io.BytesIO()
    # Batch norm without running statistics (the NAS-Bench-201 search cell) exports only at a fixed batch size.
    batch_stats = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
                      for m in network.modules())
    dynamic = None if batch_stats else {'input': {0: 'batch'}, 'logits': {0: 'batch'}}
    try:
        with torch.no_grad():
            if fmt == 'onnx':
                torch.onnx.export(network, (example,), buffer, input_names=['input'], output_names=['logits'],
                                  dynamic_axes=dynamic, dynamo=False)
            else:
                torch.jit.save(torch.jit.trace(network, example), buffer)
    except Exception as err:  # the exporters raise many kinds; the message is what the user needs
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f'could not export the network as {fmt} ({type(err).__name__}: {message}); try '
                         '--format torchscript or nni') from None
    return buffer.getvalue()


def export_run(run_dir: str | Path, fmt: str, output: str | Path | None = None,
               recipe: str | Path | None = None) -> Path | str:
    """Export a finished run; returns the file written, or, for a text format without ``output``, the text."""
    if fmt not in FORMATS:
        raise ValueError(f'unknown export format {fmt!r}; valid formats: {", ".join(FORMATS)}')
    run = load_run(run_dir)
    if fmt in ('genotype', 'nni', 'nb201'):
        text = export_text(run, fmt)
        if output is None:
            return text
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        return path
    _require_result(run)
    network, shape = frozen_network(run, recipe)
    data = _network_bytes(network, shape, fmt)  # built in memory: a failure writes nothing
    path = Path(output) if output is not None else run.path / 'export' / FORMATS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def redraw_bundle(run_dir: str | Path) -> dict[str, Any]:
    """Write ``RUN_DIR/bundle/`` again from the run folder's files, through :func:`~nni_darts_variants.bundle.
    write_bundle` (as the search did at its end); returns the bundle's summary."""
    from .bundle import retrain_command, write_bundle
    from .search.runner import _space_factory
    run = load_run(run_dir)
    sample = _require_result(run)
    for name in ('alphas.json', 'alpha_history.json'):
        if not (run.path / name).is_file():
            raise ValueError(f'{run.path} has no {name}; the bundle is drawn from a finished search\'s files')
    genotype = _genotype(run)
    info = _data_info(run)
    space_factory = _space_factory(run.config, SimpleNamespace(**info))  # as the search built its space
    command = retrain_command(run.path, run.config['strategy']['name'], run.config['data']['name'], genotype)
    return write_bundle(run.path, genotype=genotype, sample=sample, alpha_history=run.path / 'alpha_history.json',
                        final_alphas=json.loads((run.path / 'alphas.json').read_text()), space_factory=space_factory,
                        data_info=info, retrain_command=command)
