"""Differentiable hardware cost (latency, FLOPs, parameters) for every strategy of this package.

* :mod:`.formulas`: NNI shape-inference / FLOPs formulas for our ops (registered on import), so that NNI's
  ``FlopsProfiler`` and ``NumParamsProfiler`` build on our spaces;
* :mod:`.tables`: per-candidate cost tables (FLOPs, parameters, measured latency, cached) and the expectation;
* :mod:`.penalty`: :class:`HardwareCost`, the official ProxylessNAS loss forms on the expected cost.
"""
from __future__ import annotations

from .penalty import FORMS, HardwareCost, cost_from_config
from .tables import METRICS, CostTable, build_cost_table, count_flops_params, measure_latency

__all__ = ['FORMS', 'METRICS', 'HardwareCost', 'CostTable', 'build_cost_table', 'cost_from_config',
           'count_flops_params', 'measure_latency']
