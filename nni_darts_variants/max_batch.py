"""The largest batch of a bench row that fits a memory budget (``nni-darts bench --max-batch BYTES``)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from .bench import BenchConfig, measure_row

__all__ = ['find_max_batch']


def _budget_metric(cfg: BenchConfig) -> str:
    if cfg.max_batch_metric != 'auto':
        return cfg.max_batch_metric
    return 'peak_bytes' if cfg.device == 'cuda' else 'activation_bytes'


def find_max_batch(row: str, cfg: BenchConfig, budget: int,
                   measure: Callable[[str, BenchConfig, int], dict[str, Any]] = measure_row) -> dict[str, Any]:
    """The largest batch whose memory fits ``budget`` bytes, for one row.

    Memory is taken as affine in the batch, ``m(b) = a + k b`` (activations grow per sample; weights and optimizer
    state do not): measured at the two ``probe_batches``, solved for ``b = floor((budget - a) / k)``, then measured
    once at that size (``max_batch_fits`` says whether it fit; sampling strategies may vary a little).
    The metric is ``peak_bytes`` on CUDA (what runs out) and ``activation_bytes`` on CPU (RSS is too noisy).
    """
    metric = 'peak_bytes' if _budget_metric(cfg) in ('peak', 'peak_bytes') else 'activation_bytes'
    probe_cfg = replace(cfg, steps=1, warmup=1)
    b1, b2 = cfg.probe_batches
    m1, m2 = (measure(row, probe_cfg, b).get(metric) for b in (b1, b2))
    out: dict[str, Any] = {'max_batch': None, 'max_batch_metric': metric, 'max_batch_bytes': None,
                           'max_batch_fits': None, 'max_batch_probes': {b1: m1, b2: m2}}
    if m1 is None or m2 is None or m2 <= m1:
        out['max_batch_error'] = f'memory did not grow with the batch ({b1}: {m1}, {b2}: {m2})'
        return out
    per_sample = (m2 - m1) / (b2 - b1)
    batch = math.floor((budget - (m1 - per_sample * b1)) / per_sample)
    if batch < 1:
        out['max_batch_error'] = f'not even one sample fits in {budget} bytes'
        return out
    measured = measure(row, probe_cfg, batch).get(metric)
    out.update(max_batch=batch, max_batch_bytes=measured, max_batch_fits=measured is not None and measured <= budget)
    return out
