"""What to retrain: a genotype JSON file, an NNI sample JSON, a search run directory, or a published cell's name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..genotype import CELL_TYPES, Genotype
from .network import validate_genotype
from .presets import get_preset

__all__ = ['resolve_target', 'genotype_from_json']

#: The file a run directory holds its genotype in.
GENOTYPE_FILE = 'genotype.json'


def genotype_from_json(data: Any, where: str = 'genotype') -> Genotype:
    """A genotype from its JSON form, or from an NNI sample dict (``'normal/op_2_0'``, ``'normal/input_2'``, ...)."""
    if not isinstance(data, dict):
        raise ValueError(f'{where}: expected a JSON object (a genotype or an NNI sample), got {type(data).__name__}')
    try:
        if all(cell in data for cell in CELL_TYPES):
            return Genotype.from_dict(data)
        if any(str(key).startswith('normal/input_') for key in data):
            return Genotype.from_sample(data)
    except (TypeError, KeyError) as err:
        raise ValueError(f'{where}: malformed genotype ({err}); expected pairs [op, input]') from None
    except ValueError as err:
        raise ValueError(f'{where}: {err}') from None
    raise ValueError(f'{where}: neither a genotype (keys {list(CELL_TYPES)}) nor an NNI sample of DartsSpace '
                     "(keys 'normal/op_2_0', 'normal/input_2', ...)")


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f'{path}: not valid JSON ({err.msg} at line {err.lineno}); fix the file') from None


def resolve_target(target: str | Path) -> tuple[Genotype, str]:
    """Resolve ``target`` to ``(genotype, name)``; the name labels the run folder.

    ``target`` may be a JSON file (a genotype or an NNI sample dict), a directory holding ``genotype.json`` (a
    search run or a retrain run), or the name of a published cell (see :mod:`.presets`). Every failure is a one-line
    ``ValueError`` naming the target and what was expected.
    """
    path = Path(target)
    if path.is_dir():
        file = path / GENOTYPE_FILE
        if not file.is_file():
            raise ValueError(f'run directory {path} has no {GENOTYPE_FILE}; give a genotype JSON file, a run '
                             'directory that holds one, or a published name')
        genotype, name = genotype_from_json(_load_json(file), str(file)), path.resolve().name
    elif path.is_file():
        genotype, name = genotype_from_json(_load_json(path), str(path)), path.stem
    else:
        try:
            genotype, name = get_preset(str(target)), str(target)
        except KeyError as err:
            raise ValueError(f'{target!r} is no file, directory or published genotype ({err.args[0]})') from None
    try:
        validate_genotype(genotype)
    except ValueError as err:
        raise ValueError(f'{target}: {err}') from None
    return genotype, name
