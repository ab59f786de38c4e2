"""The search config: every key with its default (:data:`SEARCH_SCHEMA`), and :func:`resolve_config`, which checks
all of it before anything is built or written."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, apply_overrides, check_schema, load_yaml
from ..distributed import lightning_strategy
from ..registry import check_strategy_arguments, get_space, get_strategy
from ..speed import check_threads
from ..strategies.base import DartsVariant

__all__ = ['SEARCH_SCHEMA', 'OPEN_SECTIONS', 'LOGGERS', 'resolve_config', 'first_line']

#: Every key a search config may have, with its default.
SEARCH_SCHEMA: dict[str, Any] = {
    'seed': 2,
    'strategy': {'name': 'darts', 'args': {}},
    'space': {'name': 'darts', 'args': {}},
    'data': {'name': 'digits', 'root': None, 'download': False, 'batch_size': 64, 'train_portion': 0.5,
             'num_workers': 0, 'image_size': None, 'limit': None, 'subset': None, 'weight_fraction': 0.1,
             'arch_fraction': 0.025, 'in_memory': True},
    'train': {'max_epochs': 50, 'learning_rate': 0.025, 'learning_rate_min': 0.001, 'momentum': 0.9,
              'weight_decay': 3e-4, 'nesterov': False, 'accelerator': 'auto', 'devices': 1, 'precision': '32-true',
              'progress_bar': True, 'eval_batches': 50, 'strategy': 'auto', 'channels_last': False, 'num_nodes': 1,
              'threads': None, 'compile': False, 'lr_warmup_epochs': 0, 'logger': 'csv'},
    'evaluate': {'epochs': 0, 'learning_rate': 0.05},
    'output': {'dir': None, 'overwrite': False, 'bundle': True},
}
OPEN_SECTIONS = ('strategy.args', 'space.args')
#: Values of ``train.logger``: ``csv`` (the default, needs nothing extra) or ``tensorboard`` (CSV as well).
LOGGERS = ('csv', 'tensorboard')


def resolve_config(config: dict[str, Any] | str | Path | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """Load (if a path), apply overrides, fill defaults and check every key, strategy and space argument."""
    raw = load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})
    raw = apply_overrides(raw, overrides)
    cfg = check_schema(raw, SEARCH_SCHEMA, open_sections=OPEN_SECTIONS)
    if cfg['train']['max_epochs'] < 1:
        raise ConfigError(f'train.max_epochs must be >= 1, got {cfg["train"]["max_epochs"]}')
    if cfg['train']['num_nodes'] < 1:
        raise ConfigError(f'train.num_nodes must be >= 1, got {cfg["train"]["num_nodes"]}')
    if cfg['train']['logger'] not in LOGGERS:
        raise ConfigError(f'train.logger must be one of {", ".join(LOGGERS)}, got {cfg["train"]["logger"]!r}')
    if cfg['train']['logger'] == 'tensorboard' and not _tensorboard_installed():
        raise ConfigError("train.logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]', "
                          'or use train.logger=csv')
    _check_strategy(cfg['strategy']['name'], cfg['strategy']['args'], cfg['train'])
    _check_space(cfg['strategy']['name'], cfg['space']['name'])
    for key in ('learning_rate', 'learning_rate_min', 'momentum', 'weight_decay', 'lr_warmup_epochs'):
        if cfg['train'][key] < 0:
            raise ConfigError(f'train.{key} must be >= 0, got {cfg["train"][key]}')
    try:
        lightning_strategy(cfg['train']['strategy'])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        check_threads(cfg['train']['threads'])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg['train']['learning_rate'] == 0:
        raise ConfigError('train.learning_rate must be positive, got 0')
    return cfg


def _tensorboard_installed() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(name) is not None for name in ('tensorboard', 'tensorboardX'))


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_strategy(name: str, args: dict[str, Any], train: dict[str, Any]) -> None:
    """Unknown arguments, bad values (by building the strategy: cheap, nothing is trained) and a ``train`` section
    (``max_epochs``, optimizer) the strategy cannot run are :class:`ConfigError` naming ``strategy.args``."""
    try:
        strategy = check_strategy_arguments(name, args)(**args)
        if isinstance(strategy, DartsVariant):  # a strategy registered from outside may be a plain NNI one
            strategy.check_trainer(train['max_epochs'], train=train, **args)
    except (TypeError, ValueError) as err:
        raise ConfigError(f'strategy.args: {first_line(err)}') from None


def _check_space(strategy: str, space: str) -> None:
    """An unknown space, or one the strategy cannot search (its :meth:`~DartsVariant.check_space`, e.g. P-DARTS on
    a space it cannot rebuild), is a :class:`ConfigError`."""
    try:
        klass = get_space(space)
    except ValueError as err:
        raise ConfigError(f'space.name: {err}') from None
    strategy_class = get_strategy(strategy)
    if not issubclass(strategy_class, DartsVariant):  # a strategy registered from outside may be a plain NNI one
        return
    try:
        strategy_class.check_space(klass)
    except (TypeError, ValueError) as err:
        raise ConfigError(f'strategy {strategy!r} on space {space!r}: {first_line(err)}') from None
