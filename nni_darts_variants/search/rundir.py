"""The run folder: where it is, refusing to overwrite a finished run, its files (written by global rank 0 only,
atomically), and the provenance saved with the config."""
from __future__ import annotations

import json
import logging
import os
import platform
import socket
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_write_json, atomic_write_text
from ..config import ConfigError
from ..distributed import is_global_zero

__all__ = ['default_run_dir', 'run_dir_of', 'prepare_run_dir', 'check_run_dir', 'write_json', 'write_config', 'provenance', 'RunLock']

_logger = logging.getLogger(__name__)


def default_run_dir(cfg: dict[str, Any]) -> Path:
    return Path('runs') / f'{cfg["strategy"]["name"]}-{cfg["space"]["name"]}-{cfg["data"]["name"]}-seed{cfg["seed"]}'


def run_dir_of(cfg: dict[str, Any], output: str | Path | None = None) -> Path:
    """The run folder of a resolved config: ``output``, else ``output.dir``, else :func:`default_run_dir`."""
    return Path(output or cfg['output']['dir'] or default_run_dir(cfg))


def check_run_dir(cfg: dict[str, Any], output: str | Path | None = None, overwrite: bool = False) -> Path:
    """The run folder, refused when it holds a finished run unless ``overwrite`` (nothing is created)."""
    run_dir = run_dir_of(cfg, output)
    overwrite = overwrite or cfg['output']['overwrite']
    if (run_dir / 'result.json').exists() and not overwrite:
        raise ConfigError(f'{run_dir} already holds a finished run; choose another --output, or pass --overwrite '
                          'to replace it')
    return run_dir


def prepare_run_dir(cfg: dict[str, Any], output: str | Path | None = None, overwrite: bool = False) -> Path:
    """Create the run folder; refuse one that holds a finished run unless ``overwrite``."""
    run_dir = check_run_dir(cfg, output, overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically, on global rank 0 only (the run folder is rank 0's on several devices)."""
    if is_global_zero():
        atomic_write_json(path, data)


def write_config(run_dir: Path, cfg: dict[str, Any]) -> None:
    """``config.json`` (config and provenance) and ``config.yaml`` (what ``--resume`` reads back)."""
    import yaml
    write_json(run_dir / 'config.json', {'config': cfg, 'provenance': provenance()})
    if is_global_zero():
        atomic_write_text(run_dir / 'config.yaml', yaml.safe_dump(cfg, sort_keys=False))


def provenance() -> dict[str, str]:
    import nni
    import pytorch_lightning
    import torch
    return {'nni_darts_variants': __version__, 'nni': nni.__version__, 'torch': torch.__version__,
            'pytorch_lightning': pytorch_lightning.__version__, 'python': platform.python_version()}


class RunLock:
    """One writer per run folder: ``run_dir/.lock`` holds the writer's pid and host while a search runs.

    A lock whose process is gone (same host, pid not alive: ``kill -9``, a crash) is stale and taken over with a
    warning; a live one makes :meth:`acquire` raise a one-line :class:`ConfigError`. Only global rank 0 locks (the
    other DDP ranks write nothing).
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / '.lock'
        self.held = False

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's live process
            return True
        return True

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get('pid'), int) else None
        except (OSError, ValueError):
            return None

    def _create(self, me: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'w') as f:
            json.dump(me, f)
        return True

    def acquire(self) -> None:
        if not is_global_zero():
            return
        me = {'pid': os.getpid(), 'host': socket.gethostname()}
        for _ in range(2):
            if self._create(me):
                self.held = True
                return
            holder = self._holder()
            if holder is not None and holder.get('host') != me['host']:
                raise ConfigError(f'{self.path.parent} is locked by process {holder["pid"]} on host '
                                  f'{holder.get("host")}; if no search runs there any more, delete {self.path}')
            if holder is not None and self._alive(holder['pid']):
                raise ConfigError(f'{self.path.parent} is being written by the live process {holder["pid"]}; wait '
                                  'for it to end (or stop it), or choose another --output')
            _logger.warning('taking over the stale lock %s (%s)', self.path,
                            f'process {holder["pid"]} is gone' if holder else 'unreadable')
            self.path.unlink(missing_ok=True)
        raise ConfigError(f'could not lock {self.path.parent}: another process keeps taking {self.path}')

    def release(self) -> None:
        if self.held and self._holder() == {'pid': os.getpid(), 'host': socket.gethostname()}:
            self.path.unlink(missing_ok=True)
        self.held = False
