"""Configuration as data: YAML files, ``--set key=value`` overrides, and checks that name the bad key or value.

A config is a nested mapping. Every section is checked against a schema of defaults, so a typo fails at once with
the bad key named and the valid ones listed. Errors are :class:`ConfigError` (a ``ValueError``) with one line that
names the problem and the fix.

The recipes of the repository's ``experiments/`` folder are package data (``setup.py`` maps the folder to
``nni_darts_variants/recipes``): wherever a YAML path is taken, a recipe name such as
``cifar10/search/darts-1st.yml`` (relative to :func:`recipe_root`, optionally with the ``experiments/`` prefix) works
too, installed or not.
"""
from __future__ import annotations

import copy
import difflib
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

__all__ = ['ConfigError', 'recipe_root', 'recipe_names', 'find_recipe', 'load_yaml', 'apply_overrides', 'set_dotted',
           'merge', 'check_schema']


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the fix."""


#: The package and folder that hold the shipped recipes in an installed distribution.
RECIPE_PACKAGE, RECIPE_FOLDER = 'nni_darts_variants', 'recipes'
#: The folder a recipe name may start with: the recipes' place in the repository (what the README's commands name).
CHECKOUT_FOLDER = 'experiments'


def recipe_root() -> Path:
    """The folder of the shipped recipes.

    Installed (a wheel, or any install that ran the build), it is the package data ``nni_darts_variants/recipes``
    found through :mod:`importlib.resources`. A source checkout used without a build (``PYTHONPATH``, or an editable
    install, whose finder maps packages, not data folders) has no such folder: there the same files are the
    checkout's ``experiments/``, beside the package.
    """
    installed = package_files(RECIPE_PACKAGE) / RECIPE_FOLDER
    if isinstance(installed, Path) and installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / CHECKOUT_FOLDER


def recipe_names(folder: str = '') -> list[str]:
    """Sorted names (``/``-separated, relative to :func:`recipe_root`) of the shipped ``*.yml`` recipes under
    ``folder`` (e.g. ``'retrain'``)."""
    root = recipe_root()
    return sorted(p.relative_to(root).as_posix() for p in (root / folder).rglob('*.yml'))


def find_recipe(name: str | Path) -> Path:
    """The file of a config: ``name`` itself when it is a file, else the shipped recipe of that name.

    A recipe name is relative to :func:`recipe_root` (``cifar10/search/darts-1st.yml``), with or without the leading
    ``experiments/`` of the repository, so a command from the README runs from any folder once the package is
    installed. A path that names an existing file always wins over a recipe of the same name.
    """
    path = Path(name)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == (CHECKOUT_FOLDER,) else path.parts
    if parts and not path.is_absolute() and '..' not in parts:
        candidate = recipe_root().joinpath(*parts)
        if candidate.is_file():
            return candidate
    close = difflib.get_close_matches('/'.join(parts), recipe_names(), n=1, cutoff=0.6) if parts else []
    hint = f' (did you mean the recipe {close[0]}?)' if close else ''
    raise ConfigError(f'config file {name} not found, neither as a path nor as a shipped recipe{hint}; give the '
                      'path of a YAML file or a recipe name such as cifar10/search/darts-1st.yml')


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f'config file {path} not found; give the path of a YAML file')
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(err, 'problem', None) or str(err).splitlines()[0]
        raise ConfigError(f'{path}: malformed YAML{where} ({problem}); fix the syntax there') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: the top level must be a mapping of sections, got {type(data).__name__}')
    return data


def load_yaml(path: str | Path, resolve_base: bool = True, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad syntax or a non-mapping is a :class:`ConfigError`.

    ``path`` is a file or a shipped recipe's name (:func:`find_recipe`). A top-level ``base:`` (a path, or a list
    of paths, relative to the file) makes the file a delta: the bases are loaded first (they may have bases of their
    own), merged in order with :func:`merge`, and the file's own keys are merged over them. ``resolve_base=False``
    returns the file as written.
    """
    path = Path(path) if _chain else find_recipe(path)
    data = _read_mapping(path)
    if not resolve_base or 'base' not in data:
        return data
    bases = data.pop('base')
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f'{path}: base must be a path or a list of paths, got {bases!r}')
    here = path.resolve()
    chain = _chain + (here,)
    result: dict[str, Any] = {}
    for base in bases:
        base_path = (path.parent / base).resolve()
        if base_path in chain:
            loop = ' -> '.join(str(p) for p in chain + (base_path,))
            raise ConfigError(f'{path}: base files form a loop ({loop}); remove one of the base: entries')
        if not base_path.is_file():
            raise ConfigError(f'{path}: base file {base} not found (looked for {base_path}); fix the path, '
                              'which is relative to this file')
        result = merge(result, load_yaml(base_path, True, chain))
    return merge(result, data)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(config: dict[str, Any], key: str, value: Any, where: str = 'override') -> None:
    """Set ``config[a][b][c] = value`` for ``key = 'a.b.c'`` in place, creating missing sections."""
    parts = [p for p in str(key).strip().split('.') if p]
    if not parts:
        raise ConfigError(f'{where} {key!r} has an empty key; use dotted keys such as section.key')
    node = config
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f'{where} {key!r}: {part!r} is a value, not a section')
        node = child
    node[parts[-1]] = value


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML: ``3``, ``1e-3``, ``[2, 4]``, ``true``)."""
    config = copy.deepcopy(config)
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'override {item!r} has no "="; write it as section.key=value')
        key, _, text = item.partition('=')
        set_dotted(config, key, _parse_value(text), where='override')
    return config


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge, anything else in ``update`` replaces."""
    result = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def check_schema(config: Mapping[str, Any], schema: Mapping[str, Any], where: str = 'config',
                 open_sections: Iterable[str] = ()) -> dict[str, Any]:
    """Fill defaults from ``schema`` and reject unknown keys and values of the wrong type.

    ``schema`` maps each key to its default; a nested mapping is a section checked recursively. Sections named in
    ``open_sections`` (dotted paths such as ``'strategy.args'``) accept any keys (they are checked later, e.g.
    against a constructor's signature).
    """
    open_sections = set(open_sections)
    unknown = sorted(set(config) - set(schema))
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {unknown}; valid keys: {", ".join(sorted(schema))}')
    result: dict[str, Any] = {}
    for key, default in schema.items():
        path = f'{where}.{key}' if where != 'config' else key
        value = config.get(key, copy.deepcopy(default))
        if path in open_sections:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f'{path} must be a mapping of keyword arguments, got {value!r}')
            result[key] = dict(value)
        elif isinstance(default, Mapping):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f'{path} must be a section (a mapping), got {value!r}')
            result[key] = check_schema(value, default, path, open_sections)
        else:
            result[key] = _check_type(value, default, path)
    return result


def _check_type(value: Any, default: Any, path: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f'{path} must be true or false, got {value!r}')
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{path} must be a number, got {value!r}')
        if isinstance(default, float):
            return float(value)
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f'{path} must be a whole number, got {value!r}')
        return int(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f'{path} must be a string, got {value!r}')
    if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
        raise ConfigError(f'{path} must be a list, got {value!r}')
    return value
