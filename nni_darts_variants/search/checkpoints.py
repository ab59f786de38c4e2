"""Checkpoints that are whole or absent, the previous one kept, and a resume that says which one it uses and why.

:class:`AtomicCheckpointIO` is a Lightning ``CheckpointIO`` plugin: the checkpoint is serialized in memory, written
to a temporary file in ``checkpoints/``, flushed and fsynced, and renamed over ``last.ckpt`` after the old
``last.ckpt`` was renamed to ``previous.ckpt`` (:func:`~nni_darts_variants.atomic.atomic_write_bytes`). Loading uses
``torch.load(weights_only=True)``: a checkpoint holds tensors, numbers and strings only, so a file from elsewhere
cannot run code when it is loaded.

:func:`choose_checkpoint` picks what ``--resume`` loads: ``last.ckpt`` if it loads, else ``previous.ckpt`` (with one
warning naming the file and the reason), else a :class:`~nni_darts_variants.config.ConfigError` naming both.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ..atomic import atomic_write_bytes
from ..config import ConfigError

__all__ = ['LAST', 'PREVIOUS', 'AtomicCheckpointIO', 'CheckpointWriteError', 'load_checkpoint', 'choose_checkpoint',
           'newest_loadable']

_logger = logging.getLogger(__name__)

LAST, PREVIOUS = 'last.ckpt', 'previous.ckpt'
#: Keys every Lightning checkpoint of a search has.
REQUIRED_KEYS = ('state_dict', 'loops', 'optimizer_states', 'epoch')


def load_checkpoint(path: str | Path, map_location: Any = 'cpu') -> dict[str, Any]:
    """Load a search checkpoint without executing code (``weights_only=True``); ``ValueError`` if it is not one."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    missing = [key for key in REQUIRED_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f'not a search checkpoint (no {", ".join(missing)})')
    return checkpoint


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota); the earlier ones are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with atomic, fsynced writes and ``previous.ckpt`` kept (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            atomic_write_bytes(path, buffer.getvalue(),
                               keep_previous=path.with_name(PREVIOUS) if path.name == LAST else None)
        except OSError as err:
            kept = [p.name for p in (path, path.with_name(PREVIOUS)) if p.exists()]
            raise CheckpointWriteError(f'could not write the checkpoint {path} ({err.strerror or err}); '
                                       f'{" and ".join(kept) or "no earlier checkpoint"} kept intact; free space, then '
                                       f'resume with: nni-darts search --resume {path.parent.parent}') from err

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location or 'cpu')


def _why(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f'{type(err).__name__}: {text[0]}' if text else type(err).__name__


def newest_loadable(candidates: Sequence[Path], load: Callable[[Path], Any], folder: Path,
                    fix: str) -> tuple[Path, Any] | None:
    """The first of ``candidates`` (newest first) that ``load`` reads, and what it read: one warning names each file
    skipped and why; if none loads, a :class:`~nni_darts_variants.config.ConfigError` naming them all and ``fix``;
    ``None`` when there are no candidates."""
    failures = []
    for path in candidates:
        try:
            loaded = load(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a reason to fall back
            failures.append(f'{path} ({_why(err)})')
            continue
        if failures:
            _logger.warning('cannot load %s; resuming from %s', '; '.join(failures), path.name)
        return path, loaded
    if failures:
        raise ConfigError(f'no checkpoint in {folder} can be loaded: {"; ".join(failures)}; {fix}')
    return None


def choose_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint in ``checkpoint_dir`` that loads; ``None`` if there is none at all."""
    candidates = [checkpoint_dir / name for name in (LAST, PREVIOUS) if (checkpoint_dir / name).exists()]
    found = newest_loadable(candidates, load_checkpoint, checkpoint_dir, 'start the search again with --overwrite')
    return found[0] if found else None
