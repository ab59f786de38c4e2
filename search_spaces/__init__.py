"""Search spaces for nni-darts-variants, written with NNI's model-space primitives.

Classes load on first use, so that listing them does not import NNI or torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ['DartsSpace', 'ProxylessSpace', 'DartsCell', 'NasBench201Space']

_LAZY = {'DartsSpace': 'search_spaces.darts', 'ProxylessSpace': 'search_spaces.proxylessnas', 'DartsCell': 'search_spaces.cell',
         'NasBench201Space': 'search_spaces.nasbench201'}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
