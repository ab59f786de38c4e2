"""Speed options of a search that leave its results alone or are off by default: ``train.threads`` and
``train.compile``.

* ``train.threads``: intra-op CPU threads (``torch.set_num_threads``). Two torch processes that each use every core
  oversubscribe them (a quick-start epoch took 14 s alone and 290 s beside one other torch job on 2 cores): give each
  of ``k`` concurrent CPU jobs ``cores // k``. ``None`` leaves torch's default.
* ``train.compile``: ``torch.compile`` of the supernet's forward (``nn.Module.compile``, in place, so module names,
  checkpoints and NNI's supermodule traversal are unchanged). Compilation costs the first steps; it is off by
  default (measure it with ``nni-darts bench --compile``: ``first_step_seconds`` against ``step_seconds``).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ['CompileSupernet', 'apply_threads', 'check_threads', 'compile_supernet']

_logger = logging.getLogger(__name__)


def check_threads(threads: Any, path: str = 'train.threads') -> int | None:
    """``threads`` if ``None`` or a positive integer; else a ``ValueError`` naming ``path``."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f'{path} must be a positive number of threads or null (torch default), got {threads!r}')
    if threads > (os.cpu_count() or threads):
        _logger.warning('%s=%d is more than the %d cores: the threads will oversubscribe them', path, threads,
                        os.cpu_count())
    return threads


def apply_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (``None``: leave them)."""
    if check_threads(threads) is not None:
        torch.set_num_threads(threads)
        _logger.info('torch intra-op threads: %d', threads)


def compile_supernet(pl_module: Any) -> Any:
    """Compile the forward of the supernet inside a one-shot Lightning module (or of ``pl_module`` itself)."""
    target = getattr(getattr(pl_module, 'training_module', None), 'model', None) or pl_module
    target.compile()
    return target


class CompileSupernet(pl.Callback):
    """``train.compile``: compile the supernet's forward when the fit starts."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        compile_supernet(pl_module)
