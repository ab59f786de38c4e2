"""The search's Lightning callbacks: the per-epoch monitor, channels-last, the divergence guard and the random state
kept in checkpoints; and :func:`arch_state`, the architecture parameters as plain lists."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from ..distributed import world_size
from .rundir import write_json

__all__ = ['arch_state', 'SearchMonitor', 'tensorboard_epoch', 'ChannelsLast', 'DivergenceError', 'DivergenceGuard', 'RandomState']

_logger = logging.getLogger(__name__)


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


class SearchMonitor(pl.Callback):
    """Per epoch: supernet accuracy on (part of) the architecture half, alphas and their probabilities.

    Writes ``alpha_history.json`` after every epoch, the heatmaps and genotype to TensorBoard when the trainer has
    a TensorBoard logger (:func:`tensorboard_epoch`), and calls each ``listeners(epoch, metrics)`` (the ``nnictl``
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
        write_json(self.run_dir / 'alpha_history.json', self.history)
        tensorboard_epoch(trainer, self.history[-1])
        _logger.info('epoch %d: supernet accuracy %.4f (%.1f s)', trainer.current_epoch, acc, seconds)
        for listener in self.listeners:
            listener(trainer.current_epoch, {**metrics, 'genotype': genotype})


def tensorboard_epoch(trainer: Any, entry: dict[str, Any]) -> None:
    """Into each TensorBoard logger of ``trainer`` (``train.logger: tensorboard``): one epoch's weight heatmaps as
    images (``alphas/<cell or group>``) and the derived genotype as text (``genotype``), at step = epoch. The
    scalars reach it through Lightning's ``log``."""
    writers = [logger.experiment for logger in trainer.loggers if isinstance(logger, pl.loggers.TensorBoardLogger)]
    if not writers or not trainer.is_global_zero:
        return
    from ..figures import figure_to_array, heatmap_figure
    epoch = int(entry['epoch'])
    groups: dict[str, dict[str, Any]] = {}
    for label, probs in entry.get('probs', {}).items():
        groups.setdefault(label.split('/')[0] if '/' in label else 'choices', {})[label] = probs
    images = {group: figure_to_array(heatmap_figure(members, f'architecture weights, epoch {epoch}: {group}', dpi=90))
              for group, members in groups.items()}
    genotype = entry.get('genotype')
    if genotype is not None:
        from ..genotype import Genotype
        text = str(Genotype.from_dict(genotype))
    else:  # no DARTS cells: the most likely candidate of each choice
        text = ', '.join(f'{label}: {max(p, key=p.get)}' for label, p in entry.get('probs', {}).items() if p)
    for writer in writers:
        for group, image in images.items():
            writer.add_image(f'alphas/{group}', image, epoch, dataformats='HWC')
        writer.add_text('genotype', f'epoch {epoch}: `{text}`', epoch)
        writer.flush()


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

    Checkpoints are written at the end of each good epoch, so the last one never holds the bad values. On several
    processes the ranks agree on the verdict after every step (one all-reduce of a flag), so all of them stop.
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
        if world_size() > 1:  # one rank's NaN stops every rank now, not after the collective timeout
            flag = torch.tensor([0.0 if bad is None else 1.0], device=pl_module.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if bad is None and flag.item() > 0:
                bad = 'another rank diverged'
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
