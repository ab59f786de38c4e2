"""The search runner: :func:`run_search` in named steps (where to resume from, resolve the config, prepare the run
folder, build the data, the space and the strategy, train through NNI, write the results)."""
from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..config import ConfigError
from ..data import SearchData, build_search_data
from ..distributed import DistributedArchSync, is_global_zero
from ..nasbench201 import export_nb201
from ..registry import build_space, create_strategy
from ..speed import CompileSupernet, apply_threads
from .callbacks import ChannelsLast, DivergenceGuard, RandomState, SearchMonitor, arch_state
from .config import first_line, resolve_config
from .evaluator import evaluate_sample, search_evaluator
from .checkpoints import LAST, AtomicCheckpointIO, choose_checkpoint
from .interrupt import GracefulStop, SearchInterrupted
from .rundir import RunLock, check_run_dir, prepare_run_dir, run_dir_of, write_config, write_json

__all__ = ['SearchResult', 'run_search', 'check_search']

_logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What a search produced."""
    run_dir: Path
    genotype: Any
    sample: dict[str, Any]
    metrics: dict[str, Any]


@dataclass
class _Resume:
    """Where an interrupted run continues: its config and checkpoint (``None``: from the beginning)."""
    run_dir: Path
    config: Path
    ckpt_path: str | None


def _resume_point(resume: str | Path) -> _Resume:
    resume = Path(resume)
    if (resume / 'result.json').exists():
        raise ConfigError(f'{resume} holds a finished run; nothing to resume (use --overwrite to rerun it)')
    if not (resume / 'config.yaml').exists():
        raise ConfigError(f'{resume} is not a run folder (no config.yaml); give the folder of an interrupted run')
    checkpoint = choose_checkpoint(resume / 'checkpoints')
    if checkpoint is None:
        _logger.warning('%s has no checkpoint yet; starting the search from the beginning', resume)
    return _Resume(resume, resume / 'config.yaml', str(checkpoint) if checkpoint else None)


def _build_data(cfg: dict[str, Any]) -> SearchData:
    d = cfg['data']
    data = build_search_data(d['name'], root=d['root'], download=d['download'], batch_size=d['batch_size'],
                             train_portion=d['train_portion'], num_workers=d['num_workers'],
                             image_size=d['image_size'], limit=d['limit'], seed=cfg['seed'], subset=d['subset'],
                             weight_fraction=d['weight_fraction'], arch_fraction=d['arch_fraction'],
                             in_memory=d['in_memory'])
    return data


def _space_factory(cfg: dict[str, Any], data: SearchData) -> Callable[[], Any]:
    """A fresh space per call (NNI mutates a space in place)."""
    def space_factory() -> Any:
        return build_space(cfg['space']['name'], in_channels=data.in_channels, num_classes=data.num_classes,
                           dataset_hint=cfg['data']['name'], **cfg['space']['args'])
    return space_factory


def _schedule_epochs(strategy: Any, max_epochs: int) -> int:
    from ..strategies.base import DartsVariant  # a strategy registered from outside may be a plain NNI one
    return strategy.schedule_epochs(max_epochs) if isinstance(strategy, DartsVariant) else max_epochs


def _search_callbacks(cfg: dict[str, Any], data: SearchData, run_dir: Path, monitor: SearchMonitor,
                      stop: GracefulStop, extra: list | None) -> list:
    checkpoint_dir = run_dir / 'checkpoints'
    # Only last.ckpt (and previous.ckpt, kept by AtomicCheckpointIO), written at the end of every epoch.
    checkpointing = pl.callbacks.ModelCheckpoint(dirpath=str(checkpoint_dir), filename=LAST[:-len('.ckpt')],
                                                 enable_version_counter=False, save_top_k=1, every_n_epochs=1,
                                                 save_on_train_epoch_end=True)
    return [monitor, DivergenceGuard(checkpoint_dir), RandomState([data.train, data.val]), DistributedArchSync(),
            stop, checkpointing, *([ChannelsLast()] if cfg['train']['channels_last'] else []),
            *([CompileSupernet()] if cfg['train']['compile'] else []), *(extra or [])]


def _train(cfg: dict[str, Any], data: SearchData, run_dir: Path, space: Any, strategy: Any, callbacks: list,
           ckpt_path: str | None) -> tuple[dict[str, Any], float]:
    """Run the NNI experiment (the supernet training); the exported sample and the seconds it took."""
    from nni.nas.experiment import NasExperiment
    evaluator = search_evaluator(cfg, data, run_dir, callbacks, ckpt_path=ckpt_path,
                                 schedule_epochs=_schedule_epochs(strategy, cfg['train']['max_epochs']),
                                 plugins=[AtomicCheckpointIO()])
    experiment = NasExperiment(space, evaluator, strategy)
    experiment.config.experiment_working_directory = str((run_dir / 'nni').resolve())
    start = time.perf_counter()
    experiment.run()
    seconds = time.perf_counter() - start
    return experiment.export_top_models(formatter='dict')[0], seconds


def _write_result_bundle(run_dir: Path, cfg: dict[str, Any], genotype: Any, sample: dict[str, Any],
                         history: list[dict[str, Any]], final_alphas: dict[str, Any], space_factory: Callable[[], Any],
                         data: SearchData) -> None:
    """``run_dir/bundle/`` (see :mod:`nni_darts_variants.bundle`); a failure is a warning, never a lost search."""
    from ..bundle import retrain_command, write_bundle
    try:
        write_bundle(run_dir, genotype=genotype, sample=sample, alpha_history=history, final_alphas=final_alphas,
                     space_factory=space_factory,
                     data_info={'in_channels': data.in_channels, 'image_size': data.image_size,
                                'num_classes': data.num_classes},
                     retrain_command=retrain_command(run_dir, cfg['strategy']['name'], cfg['data']['name'], genotype))
    except Exception as err:  # the search itself is finished and saved
        _logger.warning('could not write the result bundle in %s (%s: %s)', run_dir / 'bundle', type(err).__name__,
                        err, exc_info=True)


def _write_results(cfg: dict[str, Any], run_dir: Path, strategy: Any, genotype: Any, sample: dict[str, Any],
                   monitor: SearchMonitor, space_factory: Callable[[], Any], data: SearchData,
                   search_seconds: float) -> dict[str, Any]:
    """The run folder's result files (rank 0); ``result.json`` last, as the mark of a finished run."""
    write_json(run_dir / 'sample.json', sample)
    if genotype is not None:
        genotype.save(run_dir / 'genotype.json')
    final_alphas = arch_state(strategy.oneshot_module)
    write_json(run_dir / 'alphas.json', final_alphas)
    if cfg['output']['bundle']:
        _write_result_bundle(run_dir, cfg, genotype, sample, monitor.history, final_alphas, space_factory, data)
    metrics: dict[str, Any] = {'search_seconds': round(search_seconds, 2),
                               'epoch_seconds': [round(t, 2) for t in monitor.epoch_times],
                               'supernet_val_acc': monitor.history[-1]['supernet_val_acc'] if monitor.history else None}
    if cfg['evaluate']['epochs'] > 0:
        metrics['evaluate'] = evaluate_sample(space_factory, sample, data, cfg['evaluate']['epochs'],
                                              cfg['evaluate']['learning_rate'], cfg['train']['accelerator'],
                                              cfg['seed'])
    nb201 = export_nb201(sample, run_dir)  # a NAS-Bench-201 cell: nb201.json, its string and table accuracy
    if nb201 is not None:
        metrics['nb201'] = nb201
    write_json(run_dir / 'result.json', {'metrics': metrics, 'genotype': genotype.to_dict() if genotype else None,
                                         'sample': sample})
    return metrics


def run_search(config: dict[str, Any] | str | Path | None = None, overrides: list[str] = (),
               output: str | Path | None = None, overwrite: bool = False,
               listeners: list[Callable[[int, dict], None]] | None = None, resume: str | Path | None = None,
               callbacks: list | None = None) -> SearchResult:
    """Run one search from a config (a mapping or a YAML path) and write its run folder.

    ``resume`` is the folder of an interrupted run: its saved config is used (``overrides`` still apply) and the
    search continues from its last checkpoint, with the same random state.
    """
    cfg, run_dir, data, space_factory, space, strategy, ckpt_path = _prepare(config, overrides, output, resume)
    existed = set(run_dir.iterdir()) if run_dir.is_dir() else None
    run_dir = prepare_run_dir(cfg, run_dir, overwrite)  # the resumed folder when resuming, not the config's
    lock = RunLock(run_dir)
    try:
        lock.acquire()
        return _search(cfg, run_dir, data, space_factory, space, strategy, listeners, callbacks, ckpt_path)
    except Exception:
        if ckpt_path is None and lock.held:
            _undo_failed_start(run_dir, existed)
        raise
    finally:
        lock.release()


def _prepare(config: Any, overrides: list[str], output: str | Path | None, resume: str | Path | None) -> tuple:
    """Everything that can fail on bad input, before the run folder is touched: the config, the data, the space, the
    strategy and the supernet; ``(cfg, run_dir, data, space_factory, space, strategy, ckpt_path)``."""
    ckpt_path = None
    if resume is not None:
        point = _resume_point(resume)
        config, output, ckpt_path = (config if config is not None else point.config), point.run_dir, point.ckpt_path
    cfg = resolve_config(config, list(overrides))
    run_dir = run_dir_of(cfg, output)
    apply_threads(cfg['train']['threads'], cfg['train']['accelerator'])
    pl.seed_everything(cfg['seed'], verbose=False)
    data = _build_data(cfg)
    space_factory = _space_factory(cfg, data)
    space = space_factory()
    strategy = create_strategy(cfg['strategy']['name'], **cfg['strategy']['args'])
    _check_supernet(cfg, space_factory)
    _logger.info('data %s', data.description)  # once every check passed: a bad input's error stays the only line
    return cfg, run_dir, data, space_factory, space, strategy, ckpt_path


def check_search(config: dict[str, Any] | str | Path | None = None, overrides: list[str] = (),
                 output: str | Path | None = None, overwrite: bool = False, resume: str | Path | None = None) -> Path:
    """What :func:`run_search` checks and builds before it writes (``--dry-run``), writing nothing; returns the run
    folder it would write. A finished run there without ``overwrite`` is the same error as the search's."""
    cfg, run_dir, *_ = _prepare(config, overrides, output, resume)
    return run_dir if resume is not None else check_run_dir(cfg, run_dir, overwrite)


def _check_supernet(cfg: dict[str, Any], space_factory: Callable[[], Any]) -> None:
    """Build the supernet once on a throwaway space and strategy, so that a space/strategy mismatch (e.g. a PC-DARTS
    width that K does not divide) fails before the run folder exists; the random state is left as it was."""
    import torch
    with torch.random.fork_rng(devices=[]):
        try:
            create_strategy(cfg['strategy']['name'], **cfg['strategy']['args']).mutate_model(space_factory())
        except (TypeError, ValueError) as err:
            raise ConfigError(f'strategy {cfg["strategy"]["name"]!r} on space {cfg["space"]["name"]!r}: '
                              f'{first_line(err)}') from None


def _undo_failed_start(run_dir: Path, existed: set[Path] | None) -> None:
    """A start that failed before its first checkpoint leaves the folder as it found it (or no folder)."""
    if (run_dir / 'checkpoints' / LAST).exists():
        return
    if existed is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for entry in set(run_dir.iterdir()) - existed - {run_dir / '.lock'}:
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _search(cfg: dict[str, Any], run_dir: Path, data: SearchData, space_factory: Callable[[], Any], space: Any,
            strategy: Any, listeners: list | None, callbacks: list | None, ckpt_path: str | None) -> SearchResult:
    if is_global_zero():
        (run_dir / 'result.json').unlink(missing_ok=True)
        for leftover in [*run_dir.glob('.*.tmp'), *run_dir.glob('checkpoints/.*.tmp')]:  # a killed writer's
            leftover.unlink(missing_ok=True)
    write_config(run_dir, cfg)
    monitor = SearchMonitor(run_dir, data.val, cfg['train']['eval_batches'], listeners)
    if ckpt_path is not None and (run_dir / 'alpha_history.json').exists():
        monitor.history = json.loads((run_dir / 'alpha_history.json').read_text())
    stop = GracefulStop(run_dir)
    stop.install()
    try:
        sample, search_seconds = _train(cfg, data, run_dir, space, strategy,
                                        _search_callbacks(cfg, data, run_dir, monitor, stop, callbacks), ckpt_path)
    except SIGTERMException:  # Lightning's own SIGTERM stop (at an epoch end, after that epoch's checkpoint)
        last = run_dir / 'checkpoints' / LAST
        raise SearchInterrupted(signal.SIGTERM, run_dir, last if last.exists() else None) from None
    finally:
        stop.restore()
    from ..strategies.base import DartsVariant  # a strategy registered from outside may be a plain NNI one
    genotype = strategy.export_genotype() if isinstance(strategy, DartsVariant) else None
    if not is_global_zero():  # another DDP rank: the same architecture (checked each epoch); rank 0 writes files
        return SearchResult(run_dir, genotype, sample, {'search_seconds': round(search_seconds, 2)})
    metrics = _write_results(cfg, run_dir, strategy, genotype, sample, monitor, space_factory, data, search_seconds)
    return SearchResult(run_dir, genotype, sample, metrics)
