"""Run a search from a configuration: data, space, strategy, NNI experiment, and the run folder it leaves.

The run folder holds the resolved config (``config.yaml``), the genotype (``genotype.json``), NNI's sample dict
(``sample.json``), the final architecture parameters and their history per epoch (``alphas.json``,
``alpha_history.json``), the Lightning CSV metrics (``metrics/``), the result bundle (``bundle/``: cell pictures,
weight heatmaps and histories, size and FLOPs, the retrain command; see :mod:`nni_darts_variants.bundle`), and
``result.json`` once the search finished.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import nni
import pytorch_lightning as pl
import torch
import torch.nn as nn
from nni.nas.evaluator.pytorch import Lightning, Trainer
from nni.nas.evaluator.pytorch.lightning import ClassificationModule

from . import __version__
from .config import ConfigError, apply_overrides, check_schema, load_yaml, merge
from .data import SearchData, build_search_data
from .distributed import DistributedArchSync, is_global_zero, lightning_strategy
from .registry import build_space, check_strategy_arguments, create_strategy

__all__ = ['SEARCH_SCHEMA', 'resolve_config', 'run_search', 'SearchResult', 'SearchClassification',
           'search_evaluator', 'arch_state', 'evaluate_sample', 'DivergenceError']

_logger = logging.getLogger(__name__)

#: Every key a search config may have, with its default.
SEARCH_SCHEMA: dict[str, Any] = {
    'seed': 2,
    'strategy': {'name': 'darts', 'args': {}},
    'space': {'name': 'darts', 'args': {}},
    'data': {'name': 'digits', 'root': None, 'download': False, 'batch_size': 64, 'train_portion': 0.5,
             'num_workers': 0, 'image_size': None, 'limit': None, 'subset': None, 'weight_fraction': 0.1,
             'arch_fraction': 0.025},
    'train': {'max_epochs': 50, 'learning_rate': 0.025, 'learning_rate_min': 0.001, 'momentum': 0.9,
              'weight_decay': 3e-4, 'nesterov': False, 'accelerator': 'auto', 'devices': 1, 'precision': '32-true',
              'progress_bar': True, 'eval_batches': 50, 'strategy': 'auto', 'channels_last': False},
    'evaluate': {'epochs': 0, 'learning_rate': 0.05},
    'output': {'dir': None, 'overwrite': False, 'bundle': True},
}
OPEN_SECTIONS = ('strategy.args', 'space.args')


def resolve_config(config: dict[str, Any] | str | Path | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Load (if a path), apply overrides, fill defaults and check every key, strategy and space argument."""
    raw = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    raw = apply_overrides(raw, overrides)
    cfg = check_schema(raw, SEARCH_SCHEMA, open_sections=OPEN_SECTIONS)
    try:
        check_strategy_arguments(cfg['strategy']['name'], cfg['strategy']['args'])
    except TypeError as err:
        raise ConfigError(f'strategy.args: {err}') from None
    if cfg['train']['max_epochs'] < 1:
        raise ConfigError(f'train.max_epochs must be >= 1, got {cfg["train"]["max_epochs"]}')
    for key in ('learning_rate', 'learning_rate_min', 'momentum', 'weight_decay'):
        if cfg['train'][key] < 0:
            raise ConfigError(f'train.{key} must be >= 0, got {cfg["train"][key]}')
    try:
        lightning_strategy(cfg['train']['strategy'])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg['train']['learning_rate'] == 0:
        raise ConfigError('train.learning_rate must be positive, got 0')
    return cfg


@nni.trace
class SearchClassification(ClassificationModule):
    """NNI's classification module with the DARTS weight recipe: SGD with momentum, cosine to ``learning_rate_min``.

    Results are reported by the search runner, not by this module (so an ``nnictl`` trial reports once).
    """

    def __init__(self, *, learning_rate: float = 0.025, learning_rate_min: float = 0.001, momentum: float = 0.9,
                 weight_decay: float = 3e-4, nesterov: bool = False, num_classes: int = 10, max_epochs: int = 50):
        super().__init__(criterion=nn.CrossEntropyLoss, learning_rate=learning_rate, weight_decay=weight_decay,
                         optimizer=torch.optim.SGD, num_classes=num_classes)
        self.momentum = momentum
        self.nesterov = nesterov
        self.learning_rate_min = learning_rate_min
        self.max_epochs = max_epochs

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate, momentum=self.momentum,
                                    weight_decay=self.hparams.weight_decay, nesterov=self.nesterov)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.max_epochs,
                                                               eta_min=self.learning_rate_min)
        return [optimizer], [{'scheduler': scheduler, 'interval': 'epoch'}]

    def on_validation_epoch_end(self) -> None:
        """Reporting belongs to the runner."""

    def _final_report(self) -> None:
        """Reporting belongs to the runner."""


def arch_state(oneshot_module: Any) -> dict[str, list]:
    """``{label: values}`` of every architecture parameter (shared parameters once)."""
    state: dict[str, list] = {}
    for module in oneshot_module.supernet_modules():
        label = getattr(module, 'label', None)
        params = list(module.arch_parameters()) if hasattr(module, 'arch_parameters') else []
        if label is None or label in state or not params:
            continue
        values = [p.detach().cpu().tolist() for p in params]
        state[label] = values[0] if len(values) == 1 else values
    return state


def _write_json(path: Path, data: Any) -> None:
    if not is_global_zero():  # the run folder is global rank 0's (several devices)
        return
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(json.dumps(data, indent=1) + '\n')
    os.replace(tmp, path)


class SearchMonitor(pl.Callback):
    """Per epoch: supernet accuracy on (part of) the architecture half, alphas and their probabilities.

    Writes ``alpha_history.json`` after every epoch, and calls each ``listeners(epoch, metrics)`` (the ``nnictl``
    trial reporter is one).
    """

    def __init__(self, run_dir: Path, val_loader: Any, eval_batches: int | None,
                 listeners: list[Callable[[int, dict], None]] | None = None):
        self.run_dir = run_dir
        self.val_loader = val_loader
        self.eval_batches = eval_batches
        self.listeners = listeners or []
        self.history: list[dict[str, Any]] = []
        self.epoch_times: list[float] = []
        self._start = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # After a resume, drop what was recorded for epochs the checkpoint does not cover.
        self.history = [h for h in self.history if h['epoch'] < trainer.current_epoch]
        self.epoch_times = [h['epoch_seconds'] for h in self.history]

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._start = time.perf_counter()

    @torch.no_grad()
    def supernet_accuracy(self, pl_module: Any) -> float:
        model = pl_module.training_module
        was_training = model.training
        model.eval()
        correct = total = 0
        for i, (x, y) in enumerate(self.val_loader):
            if self.eval_batches and i >= self.eval_batches:
                break
            pl_module.resample()
            x, y = x.to(pl_module.device), y.to(pl_module.device)
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
        model.train(was_training)
        return correct / max(total, 1)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        seconds = time.perf_counter() - self._start
        self.epoch_times.append(seconds)
        acc = self.supernet_accuracy(pl_module)
        pl_module.log('supernet_val_acc', acc)
        metrics = {'epoch': trainer.current_epoch, 'supernet_val_acc': acc, 'epoch_seconds': seconds}
        for key in ('train_loss', 'train_acc', 'arch_loss'):
            if key in trainer.callback_metrics:
                metrics[key] = float(trainer.callback_metrics[key])
        genotype = pl_module.export_genotype() if hasattr(pl_module, 'export_genotype') else None
        self.history.append({**metrics, 'alphas': arch_state(pl_module),
                             'probs': pl_module.export_probs(),
                             'genotype': genotype.to_dict() if genotype is not None else None})
        _write_json(self.run_dir / 'alpha_history.json', self.history)
        _logger.info('epoch %d: supernet accuracy %.4f (%.1f s)', trainer.current_epoch, acc, seconds)
        for listener in self.listeners:
            listener(trainer.current_epoch, {**metrics, 'genotype': genotype})


class ChannelsLast(pl.Callback):
    """Keep the supernet (and each input batch) in the channels-last memory layout (``train.channels_last``)."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        pl_module.to(memory_format=torch.channels_last)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        pl_module.to(memory_format=torch.channels_last)  # a new P-DARTS stage network arrives in NCHW

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        for part in batch.values() if isinstance(batch, dict) else [batch]:
            if isinstance(part, (list, tuple)) and part and torch.is_tensor(part[0]) and part[0].dim() == 4:
                part[0].data = part[0].contiguous(memory_format=torch.channels_last)


class DivergenceError(RuntimeError):
    """The search loss or an architecture parameter became NaN or infinite."""


class DivergenceGuard(pl.Callback):
    """Stop the search when the loss or an architecture parameter is not finite, naming the epoch and step.

    Checkpoints are written at the end of each good epoch, so the last one never holds the bad values.
    """

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = checkpoint_dir

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs['loss'] if isinstance(outputs, dict) else outputs
        bad = None
        if loss is not None and not torch.isfinite(torch.as_tensor(loss)).all():
            bad = f'the loss became {float(loss)}'
        else:
            for module in pl_module.supernet_modules():
                if any(not torch.isfinite(p).all() for p in getattr(module, 'arch_parameters', lambda: [])()):
                    bad = f'architecture parameters of {getattr(module, "label", module)} became non-finite'
                    break
        if bad is not None:
            last = self.checkpoint_dir / 'last.ckpt'
            keep = f'the last good checkpoint is {last}' if last.exists() else 'no epoch had finished yet'
            raise DivergenceError(f'search diverged at epoch {trainer.current_epoch}, step {batch_idx}: {bad}; {keep}; '
                                  'lower train.learning_rate or the strategy\'s arc_learning_rate and resume or rerun')


class RandomState(pl.Callback):
    """Save and restore the random state (torch, and the loaders' shuffling generators) in checkpoints, so that a
    resumed search continues exactly as an uninterrupted one."""

    def __init__(self, loaders: list):
        self.generators = [g for g in (getattr(loader, 'generator', None) for loader in loaders) if g is not None]

    def state_dict(self) -> dict[str, Any]:
        return {'torch': torch.get_rng_state(), 'loaders': [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state['torch'])
        for g, s in zip(self.generators, state['loaders']):
            g.set_state(s)


def _schedule_epochs(strategy: Any, max_epochs: int) -> int:
    hook = getattr(strategy, 'schedule_epochs', None)
    return hook(max_epochs) if callable(hook) else max_epochs


def search_evaluator(cfg: dict[str, Any], data: SearchData, run_dir: Path, callbacks: list,
                     ckpt_path: str | None = None, schedule_epochs: int | None = None) -> Lightning:
    """NNI ``Lightning`` evaluator with :class:`SearchClassification`, a Lightning CSV logger and per-epoch
    checkpoints (``checkpoints/last.ckpt``) in the run folder."""
    train = cfg['train']
    module = SearchClassification(learning_rate=train['learning_rate'], learning_rate_min=train['learning_rate_min'],
                                  momentum=train['momentum'], weight_decay=train['weight_decay'],
                                  nesterov=train['nesterov'], num_classes=data.num_classes,
                                  max_epochs=schedule_epochs or train['max_epochs'])
    trainer = Trainer(max_epochs=train['max_epochs'], accelerator=train['accelerator'], devices=train['devices'],
                      precision=train['precision'], enable_progress_bar=train['progress_bar'],
                      strategy=lightning_strategy(train['strategy'], train['devices'], train['accelerator']),
                      enable_model_summary=False, callbacks=callbacks,
                      logger=pl.loggers.CSVLogger(str(run_dir), name='metrics'),  # version_N per session
                      num_sanity_val_steps=0, log_every_n_steps=1)
    return Lightning(module, trainer, train_dataloaders=data.train, val_dataloaders=data.val,
                     fit_kwargs={'ckpt_path': ckpt_path} if ckpt_path else None)


@dataclass
class SearchResult:
    """What a search produced."""
    run_dir: Path
    genotype: Any
    sample: dict[str, Any]
    metrics: dict[str, Any]


def default_run_dir(cfg: dict[str, Any]) -> Path:
    return Path('runs') / f'{cfg["strategy"]["name"]}-{cfg["space"]["name"]}-{cfg["data"]["name"]}-seed{cfg["seed"]}'


def prepare_run_dir(cfg: dict[str, Any], output: str | Path | None = None, overwrite: bool = False) -> Path:
    """Create the run folder; refuse one that holds a finished run unless ``overwrite``."""
    run_dir = Path(output or cfg['output']['dir'] or default_run_dir(cfg))
    overwrite = overwrite or cfg['output']['overwrite']
    if (run_dir / 'result.json').exists() and not overwrite:
        raise ConfigError(f'{run_dir} already holds a finished run; choose another --output, or pass --overwrite '
                          'to replace it')
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _provenance() -> dict[str, str]:
    import pytorch_lightning
    return {'nni_darts_variants': __version__, 'nni': nni.__version__, 'torch': torch.__version__,
            'pytorch_lightning': pytorch_lightning.__version__, 'python': platform.python_version()}


def evaluate_sample(space_factory: Callable[[], Any], sample: dict[str, Any], data: SearchData, epochs: int,
                    learning_rate: float, accelerator: str = 'auto', seed: int = 0) -> dict[str, float]:
    """Train the discrete network of ``sample`` from scratch on both search halves, test on the held-out set."""
    from torch.utils.data import ConcatDataset, DataLoader
    pl.seed_everything(seed, verbose=False)
    model = space_factory().freeze(sample)
    module = SearchClassification(learning_rate=learning_rate, learning_rate_min=0.0, weight_decay=3e-4,
                                  num_classes=data.num_classes, max_epochs=epochs)
    module.set_model(model)
    both = ConcatDataset([data.train.dataset, data.val.dataset])
    loader = DataLoader(both, batch_size=data.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, train_dataloaders=loader)
    if data.test is None:
        return {}
    result = trainer.test(module, dataloaders=data.test, verbose=False)[0]
    params = sum(p.numel() for p in model.parameters())
    return {'test_acc': float(result['test_acc']), 'test_loss': float(result['test_loss']), 'params': params}


def _write_result_bundle(run_dir: Path, cfg: dict[str, Any], genotype: Any, sample: dict[str, Any],
                         history: list[dict[str, Any]], final_alphas: dict[str, Any], space_factory: Callable[[], Any],
                         data: SearchData) -> None:
    """``run_dir/bundle/`` (see :mod:`nni_darts_variants.bundle`); a failure is a warning, never a lost search."""
    from .bundle import retrain_command, write_bundle
    try:
        write_bundle(run_dir, genotype=genotype, sample=sample, alpha_history=history, final_alphas=final_alphas,
                     space_factory=space_factory,
                     data_info={'in_channels': data.in_channels, 'image_size': data.image_size,
                                'num_classes': data.num_classes},
                     retrain_command=retrain_command(run_dir, cfg['strategy']['name'], cfg['data']['name'], genotype))
    except Exception as err:  # the search itself is finished and saved
        _logger.warning('could not write the result bundle in %s (%s: %s)', run_dir / 'bundle', type(err).__name__,
                        err, exc_info=True)


def run_search(config: dict[str, Any] | str | Path | None = None, overrides: list[str] = (),
               output: str | Path | None = None, overwrite: bool = False,
               listeners: list[Callable[[int, dict], None]] | None = None, resume: str | Path | None = None,
               callbacks: list | None = None) -> SearchResult:
    """Run one search from a config (a mapping or a YAML path) and write its run folder.

    ``resume`` is the folder of an interrupted run: its saved config is used (``overrides`` still apply) and the
    search continues from its last checkpoint, with the same random state.
    """
    from nni.nas.experiment import NasExperiment
    ckpt_path = None
    if resume is not None:
        resume = Path(resume)
        if (resume / 'result.json').exists():
            raise ConfigError(f'{resume} holds a finished run; nothing to resume (use --overwrite to rerun it)')
        if not (resume / 'config.yaml').exists():
            raise ConfigError(f'{resume} is not a run folder (no config.yaml); give the folder of an interrupted run')
        config = config if config is not None else resume / 'config.yaml'
        last = resume / 'checkpoints' / 'last.ckpt'
        ckpt_path = str(last) if last.exists() else None
        if ckpt_path is None:
            _logger.warning('%s has no checkpoint yet; starting the search from the beginning', resume)
        output = resume
    cfg = resolve_config(config, list(overrides))
    run_dir = prepare_run_dir(cfg, output, overwrite)
    if is_global_zero():
        (run_dir / 'result.json').unlink(missing_ok=True)
    _write_json(run_dir / 'config.json', {'config': cfg, 'provenance': _provenance()})
    import yaml
    if is_global_zero():
        (run_dir / 'config.yaml').write_text(yaml.safe_dump(cfg, sort_keys=False))

    pl.seed_everything(cfg['seed'], verbose=False)
    d = cfg['data']
    data = build_search_data(d['name'], root=d['root'], download=d['download'], batch_size=d['batch_size'],
                             train_portion=d['train_portion'], num_workers=d['num_workers'],
                             image_size=d['image_size'], limit=d['limit'], seed=cfg['seed'], subset=d['subset'],
                             weight_fraction=d['weight_fraction'], arch_fraction=d['arch_fraction'])
    _logger.info('data %s', data.description)

    def space_factory() -> Any:
        return build_space(cfg['space']['name'], in_channels=data.in_channels, num_classes=data.num_classes,
                           dataset_hint=d['name'], **cfg['space']['args'])

    space = space_factory()
    strategy = create_strategy(cfg['strategy']['name'], **cfg['strategy']['args'])
    monitor = SearchMonitor(run_dir, data.val, cfg['train']['eval_batches'], listeners)
    if ckpt_path is not None and (run_dir / 'alpha_history.json').exists():
        monitor.history = json.loads((run_dir / 'alpha_history.json').read_text())
    checkpoint_dir = run_dir / 'checkpoints'
    checkpointing = pl.callbacks.ModelCheckpoint(dirpath=str(checkpoint_dir), save_last=True, save_top_k=1,
                                                 every_n_epochs=1, save_on_train_epoch_end=True)
    guard = DivergenceGuard(checkpoint_dir)
    evaluator = search_evaluator(cfg, data, run_dir,
                                 [monitor, guard, RandomState([data.train, data.val]), DistributedArchSync(),
                                  checkpointing, *([ChannelsLast()] if cfg['train']['channels_last'] else []),
                                  *(callbacks or [])], ckpt_path=ckpt_path,
                                 schedule_epochs=_schedule_epochs(strategy, cfg['train']['max_epochs']))
    experiment = NasExperiment(space, evaluator, strategy)
    experiment.config.experiment_working_directory = str((run_dir / 'nni').resolve())
    start = time.perf_counter()
    experiment.run()
    search_seconds = time.perf_counter() - start
    sample = experiment.export_top_models(formatter='dict')[0]
    genotype = strategy.export_genotype() if hasattr(strategy, 'export_genotype') else None
    if not is_global_zero():  # another DDP rank: the same architecture (checked each epoch); rank 0 writes files
        return SearchResult(run_dir, genotype, sample, {'search_seconds': round(search_seconds, 2)})

    _write_json(run_dir / 'sample.json', sample)
    if genotype is not None:
        genotype.save(run_dir / 'genotype.json')
    _write_json(run_dir / 'alphas.json', arch_state(strategy.oneshot_module))
    if cfg['output']['bundle']:
        _write_result_bundle(run_dir, cfg, genotype, sample, monitor.history, arch_state(strategy.oneshot_module),
                             space_factory, data)
    metrics: dict[str, Any] = {'search_seconds': round(search_seconds, 2),
                               'epoch_seconds': [round(t, 2) for t in monitor.epoch_times],
                               'supernet_val_acc': monitor.history[-1]['supernet_val_acc'] if monitor.history else None}
    if cfg['evaluate']['epochs'] > 0:
        metrics['evaluate'] = evaluate_sample(space_factory, sample, data, cfg['evaluate']['epochs'],
                                              cfg['evaluate']['learning_rate'], cfg['train']['accelerator'],
                                              cfg['seed'])
    result = SearchResult(run_dir, genotype, sample, metrics)
    _write_json(run_dir / 'result.json', {'metrics': metrics, 'genotype': genotype.to_dict() if genotype else None,
                                          'sample': sample})
    return result
