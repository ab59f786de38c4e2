"""NAS-Bench-201 cells as strings, as NNI samples, and their accuracy in the benchmark's table.

A cell is written as the benchmark writes it, ``|op(1,0)~0|+|op(2,0)~0|op(2,1)~1|+|op(3,0)~0|op(3,1)~1|op(3,2)~2|``
(``op(t,j)`` on the edge from node ``j`` into node ``t``). :func:`arch_to_sample` and :func:`sample_to_arch` convert
between it and a sample of :class:`~search_spaces.nasbench201.NasBench201Space` (labels ``'nb201/op_{t}_{j}'``) or of
NNI's hub ``nni.nas.hub.pytorch.NasBench201`` (labels ``'cell/{j}_{t}'``, convolutions named ``conv_1x1`` and
``conv_3x3``).

:class:`NasBench201Table` looks cells up. By default it reads the copy shipped with this package: CIFAR-10 test
accuracy (percent, 200 epochs, mean over the benchmark's seeds) of all 15,625 cells, from NAS-Bench-201 (Dong & Yang,
ICLR 2020) / NATS-Bench's topology space (Dong et al., TPAMI 2021), both MIT-licensed. It also reads any CSV with the
columns ``arch,cifar10_test`` (optionally gzipped), or the official benchmark files through the ``nats_bench``
package (:meth:`NasBench201Table.from_nats_bench`).
"""
from __future__ import annotations

import bisect
import csv
import gzip
import io
import itertools
import logging
import statistics
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from search_spaces.nasbench201 import NB201_EDGES, NB201_OPERATIONS, nb201_label

__all__ = [
    'NB201_EDGES',
    'NB201_OPERATIONS',
    'REFERENCE',
    'NasBench201Table',
    'TableError',
    'all_archs',
    'arch_to_sample',
    'export_nb201',
    'format_arch',
    'is_nb201_sample',
    'parse_arch',
    'sample_to_arch',
    'skip_share',
]

_logger = logging.getLogger(__name__)

#: NNI hub ``NasBench201`` names of the convolutions.
_HUB_NAMES = {'conv_1x1': 'nor_conv_1x1', 'conv_3x3': 'nor_conv_3x3'}
_TO_HUB = {v: k for k, v in _HUB_NAMES.items()}

#: Reference points on the CIFAR-10 table and the NAS-Bench-201 paper's Table 5 (test accuracy, percent).
REFERENCE: dict[str, dict[str, float | None]] = {
    'optimum': {'mean': 94.37, 'std': None},
    'median cell': {'mean': 90.75, 'std': None},
    'mean cell': {'mean': 87.06, 'std': None},
    'paper: DARTS-V1 / V2': {'mean': 54.30, 'std': 0.0},
    'paper: GDAS': {'mean': 93.61, 'std': 0.09},
    'paper: RSPS': {'mean': 87.66, 'std': 1.69},
    'paper: ENAS': {'mean': 54.30, 'std': 0.0},
    'paper: SETN': {'mean': 87.64, 'std': None},
}

_SHIPPED = 'nb201_cifar10.csv.gz'
_HEADER = ('arch', 'cifar10_test')


class TableError(ValueError):
    """A NAS-Bench-201 table that is missing or malformed, or a string that is not a benchmark cell."""


def parse_arch(arch: str) -> dict[tuple[int, int], str]:
    """``{(t, j): op}`` of a benchmark string; anything else is a one-line :class:`TableError`."""
    example = '|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|none~2|'
    if not isinstance(arch, str):
        raise TableError(f'a NAS-Bench-201 cell is a string such as {example}, got {type(arch).__name__}')
    nodes = arch.split('+')
    edges: dict[tuple[int, int], str] = {}
    if len(nodes) == 3:
        for t, node in enumerate(nodes, start=1):
            parts = node.split('|')
            if len(parts) != t + 2 or parts[0] or parts[-1]:
                break
            for j, part in enumerate(parts[1:-1]):
                op, _, source = part.partition('~')
                if op not in NB201_OPERATIONS or source != str(j):
                    break
                edges[(t, j)] = op
    if len(edges) != len(NB201_EDGES):
        raise TableError(f'{arch!r} is not a NAS-Bench-201 cell string; expected 3 nodes like {example} with ops '
                         f'from {", ".join(NB201_OPERATIONS)}')
    return edges


def format_arch(edges: Mapping[tuple[int, int], str]) -> str:
    """The benchmark string of ``{(t, j): op}``."""
    return '+'.join('|' + '|'.join(f'{edges[(t, j)]}~{j}' for j in range(t)) + '|' for t in range(1, 4))


def _label(t: int, j: int, hub: bool) -> str:
    return f'cell/{j}_{t}' if hub else nb201_label(t, j)


def arch_to_sample(arch: str, hub: bool = False) -> dict[str, str]:
    """The sample of a benchmark string: for ``NasBench201Space``, or for NNI's hub ``NasBench201`` if ``hub``."""
    edges = parse_arch(arch)
    return {_label(t, j, hub): (_TO_HUB.get(op, op) if hub else op) for (t, j), op in edges.items()}


def is_nb201_sample(sample: Mapping[str, Any]) -> bool:
    """Whether ``sample`` holds the 6 choices of a NAS-Bench-201 cell (our labels or the hub's)."""
    return any(all(_label(t, j, hub) in sample for t, j in NB201_EDGES) for hub in (False, True))


def sample_to_arch(sample: Mapping[str, Any]) -> str:
    """The benchmark string of a sample of ``NasBench201Space`` or of NNI's hub ``NasBench201``.

    Other keys of the sample are ignored; a sample without the 6 edges, or with an unknown op, is a ``TableError``.
    """
    for hub in (False, True):
        labels = {edge: _label(*edge, hub) for edge in NB201_EDGES}
        if all(label in sample for label in labels.values()):
            edges = {edge: _HUB_NAMES.get(str(sample[label]), str(sample[label])) for edge, label in labels.items()}
            bad = {labels[e]: op for e, op in edges.items() if op not in NB201_OPERATIONS}
            if bad:
                raise TableError(f'sample has operations {bad} that are not NAS-Bench-201 ops '
                                 f'({", ".join(NB201_OPERATIONS)})')
            return format_arch(edges)
    raise TableError(f'sample {dict(sample)} is not a NAS-Bench-201 cell: it needs the 6 labels nb201/op_t_j (or the '
                     'hub\'s cell/j_t)')


def all_archs() -> Iterator[str]:
    """Every one of the 5^6 = 15,625 benchmark strings."""
    for ops in itertools.product(NB201_OPERATIONS, repeat=len(NB201_EDGES)):
        yield format_arch(dict(zip(NB201_EDGES, ops)))


def skip_share(arch: str) -> float:
    """Share of the 6 edges that are ``skip_connect``."""
    return sum(op == 'skip_connect' for op in parse_arch(arch).values()) / len(NB201_EDGES)


class NasBench201Table:
    """CIFAR-10 test accuracy of NAS-Bench-201 cells: ``lookup(arch)`` with a benchmark string or a sample.

    Parameters
    ----------
    path
        A CSV (or ``.csv.gz``) with the header ``arch,cifar10_test``; default: the table shipped with this package.
        A missing or malformed file is a one-line :class:`TableError`.
    """

    def __init__(self, path: str | Path | None = None):
        if path is None:
            self.source = f'package data {_SHIPPED}'
            text = gzip.decompress(resources.files(__package__).joinpath('resources', _SHIPPED).read_bytes()).decode()
        else:
            path = Path(path)
            self.source = str(path)
            if not path.is_file():
                raise TableError(f'NAS-Bench-201 table {path} not found; give a CSV with columns arch,cifar10_test, '
                                 'or leave the path out to use the table shipped with nni-darts-variants')
            raw = path.read_bytes()
            try:
                text = (gzip.decompress(raw) if raw[:2] == b'\x1f\x8b' else raw).decode()
            except (OSError, UnicodeDecodeError) as err:
                raise TableError(f'{path} is not a readable CSV ({err}); expected columns arch,cifar10_test') from None
        self.accuracy = self._parse(text, self.source)
        self._sorted = sorted(self.accuracy.values())

    @classmethod
    def _parse(cls, text: str, source: str) -> dict[str, float]:
        rows = csv.reader(io.StringIO(text))
        header = tuple(next(rows, ()))
        if header[:2] != _HEADER:
            raise TableError(f'{source} is not a NAS-Bench-201 table: its header is {",".join(header) or "empty"}, '
                             f'expected {",".join(_HEADER)}')
        table: dict[str, float] = {}
        for line, row in enumerate(rows, start=2):
            try:
                parse_arch(row[0])
                table[row[0]] = float(row[1])
            except (IndexError, ValueError):
                raise TableError(f'{source} line {line} is malformed: {",".join(row)!r}; expected '
                                 '<benchmark string>,<accuracy>') from None
        if not table:
            raise TableError(f'{source} has a header but no rows')
        return table

    @classmethod
    def from_nats_bench(cls, path: str | Path, dataset: str = 'cifar10', epochs: int = 200) -> NasBench201Table:
        """The table from the official benchmark files (NATS-Bench ``tss``) through the ``nats_bench`` package."""
        try:
            from nats_bench import create
        except ImportError:
            raise TableError('reading the official benchmark needs the nats_bench package: pip install nats_bench '
                             '(or give a CSV with columns arch,cifar10_test)') from None
        if not Path(path).exists():
            raise TableError(f'NATS-Bench files {path} not found; download the tss benchmark (NATS-tss-v1_0-3ffb9-simple) '
                             'and give its path')
        api = create(str(path), 'tss', fast_mode=True, verbose=False)
        rows = ['arch,cifar10_test']
        for index in range(len(api)):
            info = api.get_more_info(index, dataset, hp=epochs, is_random=False)
            rows.append(f'{api.arch(index)},{info["test-accuracy"]}')
        table = cls.__new__(cls)
        table.source = f'nats_bench {path}'
        table.accuracy = cls._parse('\n'.join(rows), table.source)
        table._sorted = sorted(table.accuracy.values())
        return table

    def __len__(self) -> int:
        return len(self.accuracy)

    def lookup(self, arch: str | Mapping[str, Any]) -> float:
        """Test accuracy (percent) of a benchmark string or of a sample (our labels or the hub's)."""
        arch = arch if isinstance(arch, str) else sample_to_arch(arch)
        parse_arch(arch)
        if arch not in self.accuracy:
            raise TableError(f'{arch} is a valid cell but not in {self.source}')
        return self.accuracy[arch]

    def percentile(self, accuracy: float) -> float:
        """Percent of the table's cells with an accuracy at most ``accuracy``."""
        return 100.0 * bisect.bisect_right(self._sorted, accuracy) / len(self._sorted)

    def stats(self) -> dict[str, Any]:
        """Optimum (with its cell), median and mean of the table."""
        best = max(self.accuracy, key=self.accuracy.get)
        return {'optimum': self.accuracy[best], 'optimum_arch': best, 'median': statistics.median(self._sorted),
                'mean': statistics.fmean(self._sorted), 'cells': len(self)}


def export_nb201(sample: Mapping[str, Any], run_dir: str | Path | None = None,
                 table: NasBench201Table | str | Path | None = None) -> dict[str, Any] | None:
    """The benchmark record of a searched sample, written to ``run_dir/nb201.json`` when a folder is given.

    ``{'arch': string, 'cifar10_test': accuracy or None, 'percentile': ..., 'table': source}``; ``None`` when the
    sample is not a NAS-Bench-201 cell. ``table`` is a table, a path, or ``None`` for the shipped one.
    """
    if not is_nb201_sample(sample):
        return None
    arch = sample_to_arch(sample)
    record: dict[str, Any] = {'arch': arch, 'cifar10_test': None, 'percentile': None, 'table': None}
    try:
        table = table if isinstance(table, NasBench201Table) else NasBench201Table(table)
        record.update(cifar10_test=table.lookup(arch), table=table.source)
        record['percentile'] = round(table.percentile(record['cifar10_test']), 2)
    except TableError as err:
        _logger.warning('no NAS-Bench-201 accuracy for %s: %s', arch, err)
    _logger.info('NAS-Bench-201 cell %s: CIFAR-10 test accuracy %s', arch, record['cifar10_test'])
    if run_dir is not None:
        from .atomic import atomic_write_json
        atomic_write_json(Path(run_dir, 'nb201.json'), record)
    return record
