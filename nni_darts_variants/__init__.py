"""nni-darts-variants: the DARTS family of one-shot NAS strategies as plugins for NNI 3.0.

Light to import: strategies (and NNI / Lightning) load only when first used.

>>> from nni_darts_variants import create_strategy, list_strategies
>>> strategy = create_strategy('darts', order=2)
"""
from __future__ import annotations

from typing import Any

from .registry import create_strategy, get_strategy, list_strategies, register_strategy

__version__ = '0.1.0'

__all__ = ['create_strategy', 'get_strategy', 'list_strategies', 'register_strategy', '__version__',
           'Darts', 'DartsVariant', 'Genotype', 'DartsCell', 'MergedConv', 'MergedEdgeOp']

_LAZY = {
    'Darts': 'nni_darts_variants.strategies.darts',
    'DartsVariant': 'nni_darts_variants.strategies.base',
    'Genotype': 'nni_darts_variants.genotype',
    'DartsCell': 'search_spaces.cell',
    'MergedConv': 'nni_darts_variants.merged_conv',
    'MergedEdgeOp': 'nni_darts_variants.merged_conv',
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
