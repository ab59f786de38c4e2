"""The run folder: where it is, refusing to overwrite a finished run, its files (written by global rank 0 only,
atomically), and the provenance saved with the config."""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_write_json, atomic_write_text
from ..config import ConfigError
from ..distributed import is_global_zero

__all__ = ['default_run_dir', 'run_dir_of', 'prepare_run_dir', 'write_json', 'write_config', 'provenance']


def default_run_dir(cfg: dict[str, Any]) -> Path:
    return Path('runs') / f'{cfg["strategy"]["name"]}-{cfg["space"]["name"]}-{cfg["data"]["name"]}-seed{cfg["seed"]}'


def run_dir_of(cfg: dict[str, Any], output: str | Path | None = None) -> Path:
    """The run folder of a resolved config: ``output``, else ``output.dir``, else :func:`default_run_dir`."""
    return Path(output or cfg['output']['dir'] or default_run_dir(cfg))


def prepare_run_dir(cfg: dict[str, Any], output: str | Path | None = None, overwrite: bool = False) -> Path:
    """Create the run folder; refuse one that holds a finished run unless ``overwrite``."""
    run_dir = run_dir_of(cfg, output)
    overwrite = overwrite or cfg['output']['overwrite']
    if (run_dir / 'result.json').exists() and not overwrite:
        raise ConfigError(f'{run_dir} already holds a finished run; choose another --output, or pass --overwrite '
                          'to replace it')
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
