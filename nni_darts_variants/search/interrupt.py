"""SIGTERM and Ctrl-C (SIGINT): finish the current step, write a checkpoint, stop with a line saying how to resume.

``nnictl stop``, cluster schedulers (SLURM's time limit, Kubernetes) and Ctrl-C send one of these signals. While a
search trains, :class:`GracefulStop` turns the first one into a flag; at the end of the step in progress it saves
``checkpoints/last.ckpt`` (through the trainer, so atomically and with ``previous.ckpt`` kept) and raises
:class:`SearchInterrupted`. A signal that comes after an epoch's last step stops at the start of the next epoch,
on the checkpoint the epoch end wrote, instead of waiting for one more step: ``nnictl stop`` gives a trial 5 s
before SIGKILL (NNI 3.0's trial keeper sends SIGINT, the legacy local training service SIGTERM). The command line exits with ``128 + signal``: 130 for SIGINT, 143 for SIGTERM. A second
signal acts at once (the handlers are put back after the first).
"""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from .checkpoints import LAST

__all__ = ['SearchInterrupted', 'GracefulStop']

_logger = logging.getLogger(__name__)


class SearchInterrupted(Exception):
    """A search stopped by a signal after writing a checkpoint; ``exit_code`` is ``128 + signum``."""

    def __init__(self, signum: int, run_dir: Path, checkpoint: Path | None):
        self.signum, self.run_dir, self.checkpoint = signum, run_dir, checkpoint
        name = signal.Signals(signum).name
        saved = f'checkpoint written to {checkpoint}' if checkpoint else 'no step had finished, nothing to keep'
        super().__init__(f'stopped by {name}; {saved}; resume with: nni-darts search --resume {run_dir}')

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop(pl.Callback):
    """Turns SIGTERM/SIGINT into a stop after the step in progress (module docstring).

    :meth:`install` the handlers before the trainer starts (Lightning's own SIGTERM handler, registered when the fit
    starts, calls the handler it finds, so this one still runs) and :meth:`restore` them after.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.signum: int | None = None
        self._epoch_ended = False  # an epoch end (and its checkpoint) happened in this fit
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        _logger.warning('%s received: finishing the current step, then writing a checkpoint',
                        signal.Signals(signum).name)
        self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.signum is None:
            return
        checkpoint = self.run_dir / 'checkpoints' / LAST
        trainer.save_checkpoint(checkpoint)
        raise SearchInterrupted(self.signum, self.run_dir, checkpoint)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_ended = True  # the checkpoint callback, which Lightning runs after this one, saves the epoch

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.signum is not None and self._epoch_ended:  # the epoch end's last.ckpt is the exact resume point
            raise SearchInterrupted(self.signum, self.run_dir, self.run_dir / 'checkpoints' / LAST)
