"""The ignite handlers of a retrain run: metrics, per-epoch seeding and drop-path, evaluation and the CSV log, the
LR step, checkpoints and resume, the session stop, the progress bar and TensorBoard.

Files written into the run folder (rank 0): ``metrics.csv`` (one row per epoch), ``checkpoints/checkpoint_<epoch>.pt``
(model, optimizer, LR scheduler, trainer state, grad scaler; the last ``n_saved`` kept, each written atomically by
ignite's ``DiskSaver``) and ``summary.json``. A resume loads the newest checkpoint that loads with
``torch.load(weights_only=True)`` (a file from elsewhere cannot run code), says which it skipped and why, and stops
with one line naming them all when none loads.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ConfigError

__all__ = ['RunRecord', 'attach_handlers', 'resume_from_checkpoint', 'last_checkpoint', 'checkpoints_newest_first',
           'load_retrain_checkpoint', 'evaluate', 'unwrap',
           'CHECKPOINT_DIR', 'METRICS_FILE', 'SUMMARY_FILE', 'CSV_FIELDS']

_logger = logging.getLogger(__name__)

CHECKPOINT_DIR, METRICS_FILE, SUMMARY_FILE = 'checkpoints', 'metrics.csv', 'summary.json'
CSV_FIELDS = ('epoch', 'lr', 'drop_path_prob', 'train_loss', 'train_top1', 'test_loss', 'test_top1', 'test_top5',
              'epoch_s')


def checkpoints_newest_first(run_dir: str | Path) -> list[Path]:
    """The epoch checkpoints in ``run_dir/checkpoints``, the latest epoch first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    files = [(int(p.stem.rsplit('_', 1)[-1]), p) for p in folder.glob('checkpoint_*.pt')
             if p.stem.rsplit('_', 1)[-1].isdigit()] if folder.is_dir() else []
    return [path for _, path in sorted(files, reverse=True)]


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of the latest epoch in ``run_dir/checkpoints`` (None when there is none)."""
    files = checkpoints_newest_first(run_dir)
    return files[0] if files else None


def load_retrain_checkpoint(path: Path) -> dict[str, Any]:
    """A retrain checkpoint, loaded without executing code (``weights_only=True``: tensors, numbers, strings and
    containers only); ``ValueError`` if it holds none of the objects a retrain saves."""
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict) or 'model' not in checkpoint or 'trainer' not in checkpoint:
        raise ValueError('not a retrain checkpoint (no model and trainer state)')
    return checkpoint


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a (Distributed)DataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class RunRecord:
    """What rank 0 writes: the metrics CSV (one row per epoch) and the summary."""

    def __init__(self, run_dir: Path, name: str, params: int, params_aux: int, device: str):
        self.run_dir, self.name, self.params, self.params_aux, self.device = run_dir, name, params, params_aux, device
        self.csv = run_dir / METRICS_FILE
        self.last_eval: dict[str, Any] = {}
        self.best_top1 = 0.
        self.train_loss: float | None = None
        self.started = time.time()

    def append(self, row: dict[str, Any]) -> None:
        import ignite.distributed as idist
        if row.get('test_top1') not in (None, ''):
            self.last_eval = {k: row[k] for k in ('epoch', 'test_top1', 'test_top5', 'test_loss')}
            self.best_top1 = max(self.best_top1, row['test_top1'])
        self.train_loss = row.get('train_loss') or self.train_loss
        if idist.get_rank() != 0:
            return
        new = not self.csv.is_file()
        with self.csv.open('a', newline='') as handle:
            writer = csv.DictWriter(handle, CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, '') for k in CSV_FIELDS})

    def truncate(self, epoch: int) -> None:
        """Keep the CSV rows up to ``epoch`` (a killed session may have logged an epoch it did not checkpoint)."""
        import ignite.distributed as idist
        if not self.csv.is_file():
            return
        with self.csv.open(newline='') as handle:
            rows = [row for row in csv.DictReader(handle) if int(row['epoch']) <= epoch]
        idist.barrier()
        if idist.get_rank() == 0:
            self.csv.unlink()
        for row in rows:
            self.append({key: int(value) if key == 'epoch' else (float(value) if value else '')
                         for key, value in row.items()})

    def write_summary(self, trainer: Any, epochs: int) -> None:
        """Write ``summary.json``: the last evaluation, the best top-1, parameter counts, progress."""
        last = self.last_eval
        summary = {
            'run_dir': str(self.run_dir), 'genotype': self.name, 'epochs': epochs,
            'epochs_completed': trainer.state.epoch, 'completed': trainer.state.epoch >= epochs,
            'top1': last.get('test_top1'), 'top5': last.get('test_top5'), 'test_loss': last.get('test_loss'),
            'evaluated_epoch': last.get('epoch'), 'best_top1': self.best_top1, 'train_loss': self.train_loss,
            'params': self.params, 'params_m': round(self.params / 1e6, 3), 'params_with_auxiliary': self.params_aux,
            'device': self.device, 'session_wall_s': round(time.time() - self.started, 1),
        }
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + '\n')
        _logger.info('retrain %s: epoch %d/%d, top-1 %s %%, top-5 %s %%', self.name, trainer.state.epoch, epochs,
                     summary['top1'], summary['top5'])


def evaluate(evaluator: Any, test_loader: Any, trainer: Any, run: RunRecord, row: dict | None = None) -> None:
    """Run the evaluator on the test set and log ``row`` with its loss, top-1 and top-5 (percent)."""
    metrics = evaluator.run(test_loader).metrics
    row = dict(row or {'epoch': trainer.state.epoch})
    row.update(test_loss=metrics['loss'], test_top1=100. * metrics['top1'], test_top5=100. * metrics['top5'])
    run.append(row)


def attach_handlers(trainer: Any, evaluator: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, train_loader: Any, test_loader: Any, to_save: dict[str, Any],
                    config: dict[str, Any], run: RunRecord) -> None:
    """Metrics, per-epoch seeding and drop-path, evaluation + CSV, LR step, checkpoint, session stop, display."""
    import ignite.distributed as idist
    from ignite.engine import Events
    from ignite.handlers import Checkpoint, DiskSaver, TerminateOnNan
    from ignite.metrics import Accuracy, Average, RunningAverage
    from ignite.utils import manual_seed

    train_cfg, runtime = config['train'], config['runtime']
    epochs, seed, drop_path = train_cfg['epochs'], train_cfg['seed'], config['model']['drop_path_prob']
    RunningAverage(output_transform=lambda out: out['loss']).attach(trainer, 'loss')
    Average(output_transform=lambda out: out['loss']).attach(trainer, 'train_loss')
    Accuracy(output_transform=lambda out: (out['y_pred'], out['y'])).attach(trainer, 'train_top1')
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TerminateOnNan(output_transform=lambda out: out['loss']))

    @trainer.on(Events.EPOCH_STARTED)
    def start_epoch(engine: Any) -> None:
        epoch = engine.state.epoch - 1
        train_loader.sampler.set_epoch(epoch)
        manual_seed(seed + 10_000 * idist.get_rank() + epoch)
        unwrap(model).drop_path_prob = drop_path * epoch / epochs
        engine.state.epoch_started_at = time.time()

    @trainer.on(Events.EPOCH_COMPLETED)
    def evaluate_and_log(engine: Any) -> None:
        metrics, epoch = engine.state.metrics, engine.state.epoch
        row = {'epoch': epoch, 'lr': optimizer.param_groups[0]['lr'], 'drop_path_prob': unwrap(model).drop_path_prob,
               'train_loss': metrics['train_loss'], 'train_top1': 100. * metrics['train_top1'],
               'epoch_s': round(time.time() - engine.state.epoch_started_at, 2)}
        if epoch % runtime['eval_every'] == 0 or epoch == engine.state.max_epochs:
            evaluate(evaluator, test_loader, engine, run, row)
        else:
            run.append(row)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: scheduler.step())
    saver = DiskSaver(str(run.run_dir / CHECKPOINT_DIR), require_empty=False, create_dir=True)
    checkpoint = Checkpoint(to_save, saver, n_saved=runtime['n_saved'],
                            global_step_transform=lambda engine, _: engine.state.epoch)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)

    @trainer.on(Events.STARTED)
    def remember_start(engine: Any) -> None:
        engine.state.session_start_epoch = engine.state.epoch

    @trainer.on(Events.EPOCH_COMPLETED)
    def stop_session(engine: Any) -> None:
        limit = train_cfg['stop_after_epochs']
        if limit and engine.state.epoch - engine.state.session_start_epoch >= limit:
            _logger.info('stopping after %d epoch(s) of this session (train.stop_after_epochs)', limit)
            engine.terminate()

    if idist.get_rank() == 0:
        _attach_display(trainer, evaluator, optimizer, run, runtime)


def _attach_display(trainer: Any, evaluator: Any, optimizer: Any, run: RunRecord, runtime: dict[str, Any]) -> None:
    from ignite.engine import Events
    from ignite.handlers import ProgressBar, global_step_from_engine
    if runtime['progress_bar']:
        ProgressBar(persist=False).attach(trainer, metric_names=['loss'])
        ProgressBar(persist=False, desc='test').attach(evaluator)
    if runtime['logger'] in ('tensorboard', 'both'):
        try:
            from ignite.handlers import TensorboardLogger
            tb_logger = TensorboardLogger(log_dir=str(run.run_dir / 'tensorboard'))
        except (ImportError, ModuleNotFoundError) as err:
            raise ConfigError(f'runtime.logger={runtime["logger"]} needs tensorboard ({err}); install it or use '
                              'runtime.logger=csv') from None
        tb_logger.attach_output_handler(trainer, event_name=Events.ITERATION_COMPLETED(every=50), tag='train',
                                        output_transform=lambda out: {'loss': out['loss']})
        tb_logger.attach_output_handler(evaluator, event_name=Events.COMPLETED, tag='test', metric_names='all',
                                        global_step_transform=global_step_from_engine(trainer))
        tb_logger.attach_opt_params_handler(trainer, event_name=Events.EPOCH_STARTED, optimizer=optimizer)
        trainer.add_event_handler(Events.COMPLETED, lambda _: tb_logger.close())


def resume_from_checkpoint(to_save: dict[str, Any], trainer: Any, run: RunRecord) -> int:
    """Load the last checkpoint into ``to_save``; returns the epoch it ends (0 when there is none)."""
    from ignite.handlers import Checkpoint

    from ..search.checkpoints import newest_loadable
    folder = run.run_dir / CHECKPOINT_DIR
    found = newest_loadable(checkpoints_newest_first(run.run_dir), load_retrain_checkpoint, folder,
                            f'retrain again into a new folder (or remove {folder})')
    if found is None:
        _logger.warning('resume: no checkpoint in %s; starting from scratch', folder)
        return 0
    path, checkpoint = found
    Checkpoint.load_objects(to_load=to_save, checkpoint=checkpoint)
    epoch = trainer.state.epoch
    run.truncate(epoch)
    _logger.info('resumed from %s (epoch %d)', path, epoch)
    return epoch
