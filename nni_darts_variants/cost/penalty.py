"""The hardware-aware loss of ProxylessNAS (Cai, Zhu, Han, ICLR 2019), for every variant of this package.

:class:`HardwareCost` has the interface of NNI's ``ExpectationProfilerPenalty`` (``penalty(loss, probs)`` returns
``(loss, details)``), with ``probs`` each variant's *tensor* probabilities (``VariantLightningModule.cost_probs``),
so the expected cost carries gradient to the architecture parameters. The loss forms are the official
``add_regularization_loss`` (``search/nas_manager.py``) with the defaults of ``imagenet_arch_search.py``:

* ``'mul#log'``: ``alpha * CE * (log(E[cost]) / log(target)) ** beta`` (alpha 0.2, beta 0.3);
* ``'add#linear'``: ``CE + lambda * (E[cost] - target) / target`` (lambda 0.1; the ``- target`` shifts the loss by
  a constant only).

Latency is in ms; FLOPs enter as raw counts, as the official FLOPs searches (reference 300e6 = 300 MFLOPs for the
1.0x mobile net), so ``target_mflops`` is multiplied by 1e6 before the logarithm.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import torch
import torch.nn as nn

from .tables import METRICS, CostTable, build_cost_table

__all__ = ['HardwareCost', 'FORMS', 'cost_from_config', 'mul_log', 'add_linear']

_logger = logging.getLogger(__name__)

FORMS = ('mul#log', 'add#linear')
_TARGET_KEYS = {'latency': ('target_ms', 1.0), 'flops': ('target_mflops', 1e6), 'params': ('target_mparams', 1e6)}
_CONFIG_KEYS = {'metric', 'form', 'alpha', 'beta', 'lambda', 'device', 'warmup', 'repeats', 'threads', 'clock',
                'calibration', 'cache_dir', 'latency_batch_size'} | {k for k, _ in _TARGET_KEYS.values()}


def mul_log(loss: torch.Tensor, expected: Any, target: float, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * loss * (log(expected) / log(target)) ** beta`` (official ``mul#log``)."""
    return alpha * loss * (torch.log(torch.as_tensor(expected, dtype=loss.dtype)) / math.log(target)) ** beta


def add_linear(loss: torch.Tensor, expected: Any, target: float, lambda_: float) -> torch.Tensor:
    """``loss + lambda * (expected - target) / target`` (official ``add#linear``)."""
    return loss + lambda_ * (expected - target) / target


class HardwareCost:
    """A differentiable expected-cost penalty (latency, FLOPs or parameters) in the official ProxylessNAS forms.

    The cost table (:func:`~nni_darts_variants.cost.tables.build_cost_table`) is built by :meth:`prepare` from the
    unmutated model space and an input batch, when the search starts.

    Parameters
    ----------
    metric
        ``'latency'`` (ms, measured on ``device``), ``'flops'`` or ``'params'``.
    target
        The reference value in the table's unit (ms, FLOPs, parameters). ``mul#log`` needs ``target > 1``.
    form
        ``'mul#log'`` (default, official) or ``'add#linear'``.
    alpha, beta
        Of ``mul#log`` (0.2, 0.3). ``lambda_``: of ``add#linear`` (0.1).
    device
        Where latency is measured: ``'auto'`` (CUDA when present, else CPU), ``'cpu'`` or ``'cuda'``.
    latency_batch_size
        Batch size of the latency measurement (1, as on a phone); FLOPs ignore the batch.
    warmup, repeats, threads, clock, cache_dir
        Of the latency measurement (5 warm-up runs, median of 20, 1 thread, wall clock,
        ``~/.cache/nni-darts-variants/cost``); ``clock='cpu'`` times the thread's CPU time, for a shared machine.
    calibration
        Whole random networks timed to rescale the latency table (0: none); see ``build_cost_table``.
    table
        A ready table (then :meth:`prepare` does nothing).
    """

    def __init__(self, metric: str = 'latency', target: float = 1.0, form: str = 'mul#log', *, alpha: float = 0.2,
                 beta: float = 0.3, lambda_: float = 0.1, device: str = 'auto', latency_batch_size: int = 1,
                 warmup: int = 5, repeats: int = 20, threads: int | None = 1, clock: str = 'wall',
                 calibration: int = 0, cache_dir: str | None = None,
                 table: CostTable | None = None):
        if metric not in METRICS:
            raise ValueError(f'cost.metric must be one of {", ".join(METRICS)}, got {metric!r}')
        if form not in FORMS:
            raise ValueError(f'cost.form must be one of {", ".join(FORMS)}, got {form!r}')
        if not isinstance(target, (int, float)) or target <= 0:
            raise ValueError(f'the cost target must be a positive number, got {target!r}')
        if form == 'mul#log' and target <= 1:
            raise ValueError(f'mul#log divides by log(target), so the target must exceed 1 {METRICS[metric]} '
                             f'(got {target}); use add#linear or a larger target')
        if alpha <= 0 or beta <= 0 or lambda_ < 0:
            raise ValueError(f'cost alpha and beta must be positive and lambda >= 0, got {alpha}, {beta}, {lambda_}')
        if device not in ('auto', 'cpu', 'cuda'):
            raise ValueError(f"cost.device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if clock not in ('wall', 'cpu'):
            raise ValueError(f"cost.clock must be 'wall' or 'cpu', got {clock!r}")
        if warmup < 0 or repeats < 1 or latency_batch_size < 1:
            raise ValueError(f'cost warmup must be >= 0, repeats and latency_batch_size >= 1, got {warmup}, '
                             f'{repeats}, {latency_batch_size}')
        self.metric, self.target, self.form = metric, float(target), form
        self.alpha, self.beta, self.lambda_ = alpha, beta, lambda_
        self.device, self.latency_batch_size = device, latency_batch_size
        self.warmup, self.repeats, self.threads, self.clock, self.cache_dir = warmup, repeats, threads, clock, cache_dir
        self.calibration = calibration
        self.table = table
        self._given_table = table is not None

    def forget_table(self) -> None:
        """Drop a table built from an earlier space (a table given to the constructor stays)."""
        if not self._given_table:
            self.table = None

    @property
    def ready(self) -> bool:
        return self.table is not None

    def measurement_device(self) -> torch.device:
        if self.device == 'auto':
            return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        return torch.device(self.device)

    def prepare(self, space: nn.Module, example_input: torch.Tensor) -> CostTable:
        """Build the cost table of ``space`` (unmutated) at the shape of one example of ``example_input``."""
        if self.table is None:
            batch = self.latency_batch_size if self.metric == 'latency' else 1
            x = example_input[:1].expand(batch, *example_input.shape[1:]).contiguous()
            self.table = build_cost_table(space, x, self.metric, device=self.measurement_device(),
                                          warmup=self.warmup, repeats=self.repeats, threads=self.threads,
                                          clock=self.clock, calibration=self.calibration, cache_dir=self.cache_dir)
            _logger.info('%s table: %d choices, fixed part %.4g %s', self.metric, len(self.table.costs),
                         self.table.const, self.table.unit)
        return self.table

    def expected(self, probs: Mapping[str, Mapping[str, Any]]) -> Any:
        if self.table is None:
            raise RuntimeError('the cost table is not built: call prepare(space, example_input) first')
        return self.table.expected(probs)

    def __call__(self, loss: torch.Tensor, probs: Mapping[str, Mapping[str, Any]]) -> tuple[torch.Tensor, dict]:
        """``(penalized loss, details)``, as NNI's ``ProfilerPenalty``."""
        expected = self.expected(probs)
        if self.form == 'mul#log':
            new_loss = mul_log(loss, expected, self.target, self.alpha, self.beta)
        else:
            new_loss = add_linear(loss, expected, self.target, self.lambda_)
        return new_loss, {'loss_original': loss, f'expected_{self.metric}': expected, 'loss_final': new_loss}


def cost_from_config(config: Mapping[str, Any] | HardwareCost | None) -> HardwareCost | None:
    """A :class:`HardwareCost` from ``strategy.args.cost`` (``{metric, target_ms | target_mflops, form, ...}``)."""
    if config is None or isinstance(config, HardwareCost):
        return config
    if not isinstance(config, Mapping):
        raise TypeError(f'cost must be a mapping like {{metric: latency, target_ms: 20}}, got {type(config).__name__}')
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f'unknown cost key(s) {unknown}; valid: {", ".join(sorted(_CONFIG_KEYS))}')
    metric = config.get('metric', 'latency')
    if metric not in _TARGET_KEYS:
        raise ValueError(f'cost.metric must be one of {", ".join(_TARGET_KEYS)}, got {metric!r}')
    target_key, scale = _TARGET_KEYS[metric]
    wrong = [k for k, _ in _TARGET_KEYS.values() if k in config and k != target_key]
    if wrong or target_key not in config:
        others = ', '.join(wrong) or 'other target'
        raise ValueError(f'cost with metric {metric!r} needs {target_key} (and no {others})')
    options = {k: config[k] for k in ('form', 'alpha', 'beta', 'device', 'warmup', 'repeats', 'threads', 'clock',
                                      'calibration', 'cache_dir', 'latency_batch_size') if k in config}
    if 'lambda' in config:
        options['lambda_'] = config['lambda']
    return HardwareCost(metric, float(config[target_key]) * scale, **options)
