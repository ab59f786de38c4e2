"""Speed options of a search that leave its results alone or are off by default: ``train.threads`` and
``train.compile``.

* ``train.threads``: intra-op CPU threads (``torch.set_num_threads``). Two torch processes that each use every core
  oversubscribe them (a quick-start epoch took 14 s alone and 290 s beside one other torch job on 2 cores): give each
  of ``k`` concurrent CPU jobs ``cores // k``. ``null`` (the default, also spelled ``auto``) does that by itself for
  the trials of a local nnictl experiment that run on CPU: it asks the experiment's manager (NNI's REST API, at the
  address of the trial's command channel ``NNI_TRIAL_COMMAND_CHANNEL``) for ``trialConcurrency`` and takes
  ``cores // trialConcurrency`` when that is above 1; anywhere else it leaves torch's default.
* ``train.compile``: ``torch.compile`` of the supernet's forward (``nn.Module.compile``, in place, so module names,
  checkpoints and NNI's supermodule traversal are unchanged). Compilation costs the first steps; it is off by
  default (measure it with ``nni-darts bench --compile``: ``first_step_seconds`` against ``step_seconds``).
"""
from __future__ import annotations

import json
import logging
import os
import urllib.request
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ['CompileSupernet', 'apply_threads', 'check_threads', 'compile_supernet', 'cpu_cores', 'nni_trial_concurrency',
           'resolve_threads']

_logger = logging.getLogger(__name__)


def check_threads(threads: Any, path: str = 'train.threads') -> int | str | None:
    """``threads`` if ``None``, ``'auto'`` or a positive integer; else a ``ValueError`` naming ``path``."""
    if threads is None or threads == 'auto':
        return threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{path} must be a positive number of threads, or null / 'auto' (cores divided among the "
                         f'concurrent trials of an nnictl experiment, else the torch default), got {threads!r}')
    if threads > cpu_cores():
        _logger.warning('%s=%d is more than the %d cores: the threads will oversubscribe them', path, threads,
                        cpu_cores())
    return threads


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def nni_trial_concurrency(timeout: float = 5.0) -> int | None:
    """``trialConcurrency`` of the local NNI experiment this process is a trial of, asked from its manager.

    The manager's REST API shares its address (and URL prefix) with the trial's command channel,
    ``http://localhost:PORT[/PREFIX]/env/ENV/TRIAL``; ``GET .../api/v1/nni/experiment`` returns the experiment's
    profile, whose ``params`` is the experiment config as it is now (``nnictl update concurrency`` included).
    ``None`` outside a local trial, or (with a warning) when the manager does not answer.
    """
    channel = os.environ.get('NNI_TRIAL_COMMAND_CHANNEL', '')
    if os.environ.get('NNI_PLATFORM') != 'local' or not channel.startswith('http') or '/env/' not in channel:
        return None
    url = channel.rsplit('/env/', 1)[0] + '/api/v1/nni/experiment'
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            concurrency = json.load(response)['params']['trialConcurrency']
        return int(concurrency)
    except (OSError, ValueError, KeyError, TypeError) as err:
        _logger.warning('could not read trialConcurrency from the NNI manager at %s (%s): leaving torch\'s threads; '
                        'set train.threads to fix them', url, err)
        return None


def _on_cpu(accelerator: str) -> bool:
    return accelerator == 'cpu' or (accelerator == 'auto' and not torch.cuda.is_available())


def resolve_threads(threads: int | str | None, accelerator: str = 'auto') -> int | None:
    """The intra-op threads to set: ``threads`` if a number; for ``None``/``'auto'`` on CPU inside a local nnictl
    trial with ``trialConcurrency`` k > 1, ``max(1, cores // k)``; else ``None`` (torch's default)."""
    if check_threads(threads) not in (None, 'auto'):
        return threads
    if not _on_cpu(accelerator):
        return None
    concurrency = nni_trial_concurrency()
    if concurrency is None or concurrency <= 1:
        return None
    return max(1, cpu_cores() // concurrency)


def apply_threads(threads: int | str | None, accelerator: str = 'auto') -> int | None:
    """Set torch's intra-op threads to :func:`resolve_threads` (``None``: leave them); return what was set."""
    resolved = resolve_threads(threads, accelerator)
    if resolved is not None:
        torch.set_num_threads(resolved)
        _logger.info('torch intra-op threads: %d%s', resolved, '' if threads not in (None, 'auto') else
                     f' ({cpu_cores()} cores divided among the concurrent trials)')
    return resolved


def compile_supernet(pl_module: Any) -> Any:
    """Compile the forward of the supernet inside a one-shot Lightning module (or of ``pl_module`` itself)."""
    target = getattr(getattr(pl_module, 'training_module', None), 'model', None) or pl_module
    target.compile()
    return target


class CompileSupernet(pl.Callback):
    """``train.compile``: compile the supernet's forward when the fit starts."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        compile_supernet(pl_module)
