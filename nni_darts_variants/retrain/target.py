"""What to retrain: a genotype JSON file, an NNI sample JSON, a search run directory, or a published cell's name.

A DARTS genotype is rebuilt as the DARTS evaluation network (:class:`~.network.EvalNetwork`). A search run folder of
any other space (ProxylessNAS, NAS-Bench-201, an NNI hub space) is a :class:`RetrainTarget` holding the space (name
and arguments, from the run's ``config.yaml``) and the sample (``sample.json``): the network is
``space.freeze(sample)``, see :func:`~.network.build_network`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..genotype import CELL_TYPES, Genotype
from .network import validate_genotype
from .presets import get_preset

__all__ = ['resolve_target', 'resolve_retrain_target', 'genotype_from_json', 'RetrainTarget', 'TARGET_FILE']

#: The file a run directory holds its genotype in.
GENOTYPE_FILE = 'genotype.json'
#: The file a retrain run folder of a frozen-space target holds the space and the sample in.
TARGET_FILE = 'target.json'


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


@dataclass
class RetrainTarget:
    """What ``nni-darts retrain`` builds: a DARTS ``genotype``, or a ``space`` (``{'name', 'args'}`` as in a search
    config) and its ``sample`` (NNI's sample dict) to freeze. ``name`` labels the run folder."""
    name: str
    genotype: Genotype | None = None
    space: dict[str, Any] | None = None
    sample: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        return 'genotype' if self.genotype is not None else f'space {self.space["name"]!r}'

    def to_dict(self) -> dict[str, Any]:
        return {'name': self.name, 'genotype': self.genotype.to_dict() if self.genotype is not None else None,
                'space': self.space, 'sample': self.sample}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> 'RetrainTarget':
        genotype = Genotype.from_dict(data['genotype']) if data.get('genotype') else None
        return cls(data['name'], genotype, data.get('space'), data.get('sample'))

    def save(self, run_dir: Path) -> None:
        """``genotype.json`` for a genotype, ``target.json`` (space and sample) otherwise."""
        from ..atomic import atomic_write_json
        if self.genotype is not None:
            self.genotype.save(run_dir / GENOTYPE_FILE)
        else:
            atomic_write_json(run_dir / TARGET_FILE, {'space': self.space, 'sample': self.sample})


def _space_run_target(path: Path) -> RetrainTarget | None:
    """The frozen-space target of a run folder without ``genotype.json``: a retrain run's ``target.json``, or a
    search run's ``config.yaml`` (its space) and ``sample.json``; ``None`` when the folder has neither."""
    import yaml
    name = path.resolve().name
    if (path / TARGET_FILE).is_file():
        data = _load_json(path / TARGET_FILE)
        return RetrainTarget(name, space=data['space'], sample=data['sample'])
    if not ((path / 'config.yaml').is_file() and (path / 'sample.json').is_file()):
        return None
    config = yaml.safe_load((path / 'config.yaml').read_text()) or {}
    sample = _load_json(path / 'sample.json')
    space = config.get('space') if isinstance(config, dict) else None
    if not isinstance(space, dict) or 'name' not in space or not isinstance(sample, dict):
        raise ValueError(f'{path}: config.yaml names no space (space.name) or sample.json is no JSON object; give '
                         'the folder nni-darts search wrote')
    if any(str(key).startswith('normal/input_') for key in sample):  # a DartsSpace sample: its genotype
        return RetrainTarget(name, genotype=genotype_from_json(sample, str(path / 'sample.json')))
    return RetrainTarget(name, space={'name': space['name'], 'args': dict(space.get('args') or {})},
                         sample=sample)


def resolve_retrain_target(target: str | Path) -> RetrainTarget:
    """Resolve ``target`` like :func:`resolve_target`, and also the run folder of a search in any space.

    A folder with ``genotype.json`` gives its genotype; a search run folder of another space (``config.yaml`` and
    ``sample.json``) gives that space and sample, to be frozen. Errors are one-line ``ValueError`` s.
    """
    path = Path(target)
    if path.is_dir() and not (path / GENOTYPE_FILE).is_file():
        found = _space_run_target(path)
        if found is None:
            raise ValueError(f'run directory {path} has no {GENOTYPE_FILE} and no config.yaml with sample.json; give '
                             'a search run folder, a genotype JSON file, or a published name')
        if found.genotype is not None:
            validate_genotype(found.genotype)
        return found
    genotype, name = resolve_target(target)
    return RetrainTarget(name, genotype=genotype)
