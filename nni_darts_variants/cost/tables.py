"""Cost tables: the FLOPs, parameters or measured latency of every candidate of every choice of a model space.

A :class:`CostTable` holds ``const`` (the fixed part of the network) and, per choice label, the cost of each
candidate summed over every module with that label (the normal cells of a DARTS network share labels but differ in
width). The expected cost under per-choice probabilities ``p`` is

    ``E[cost] = const + sum_label share[label] * sum_i p[label][i] * cost[label][i]``

where ``share`` is 1, except on a DARTS cell edge: a node keeps ``n_chosen`` (2) of its ``n`` incoming edges, so an
edge is in the exported cell with share ``2 / n`` when nothing else is known. The cost of one architecture (a
sample) counts exactly the edges its input choices keep (:meth:`CostTable.of_sample`).

Candidates are measured at the input shapes they see in the network: one forward pass of the model space (each
``LayerChoice`` runs its first candidate, all candidates keep the shape) records them. ``const`` is the cost of the
frozen network of the cheapest sample minus its candidates' costs. FLOPs and parameters use NNI's
``FlopsParamsProfiler`` (multiply-accumulates, batch norm and activations counted, NNI's convention), latency the
median time (wall or thread CPU clock) of repeated forwards in eval mode, after a warm-up, at a fixed thread count, on the target device;
latency tables are cached in a JSON file keyed by device, dtype, input shape, threads, clock, calibration, the
torch version and the space's arguments.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from nni.mutable import Categorical, CategoricalMultiple
from nni.nas.nn.pytorch import LayerChoice
from nni.nas.profiler.pytorch.flops import FlopsParamsProfiler

from . import formulas  # noqa: F401  (registers the shape formulas the profiler needs)

__all__ = ['CostTable', 'METRICS', 'build_cost_table', 'measure_latency', 'count_flops_params', 'choice_inputs',
           'default_cache_dir']

_logger = logging.getLogger(__name__)

#: Metric -> unit of its table.
METRICS: dict[str, str] = {'flops': 'FLOPs', 'params': 'parameters', 'latency': 'ms'}


@dataclass
class CostTable:
    """Per-candidate costs of a model space; see the module docstring for the expectation it computes."""

    metric: str
    const: float
    costs: dict[str, dict[str, float]]
    share: dict[str, float] = field(default_factory=dict)
    #: For DARTS cell edges: ``label -> (input choice label, input index)``; the edge counts when the input is chosen.
    gates: dict[str, tuple[str, int]] = field(default_factory=dict)
    key: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return METRICS[self.metric]

    def expected(self, probs: Mapping[str, Mapping[str, Any]]) -> Any:
        """``const + sum share * p * cost``; a tensor with gradient when ``probs`` holds tensors."""
        missing = [label for label in self.costs if label not in probs]
        if missing:
            raise KeyError(f'no probabilities for choice(s) {missing[:3]}: the cost table and the supernet disagree')
        total: Any = self.const
        for label, costs in self.costs.items():
            p = probs[label]
            total = total + self.share.get(label, 1.0) * sum(p[name] * cost for name, cost in costs.items()
                                                             if name in p)
        return total

    def of_sample(self, sample: Mapping[str, Any]) -> float:
        """The cost of one architecture (an NNI sample: candidate names, input lists)."""
        total = self.const
        for label, costs in self.costs.items():
            gate = self.gates.get(label)
            if gate is not None and gate[1] not in sample[gate[0]]:
                continue
            total += costs[str(sample[label])]
        return float(total)

    def cheapest(self) -> dict[str, str]:
        return {label: min(costs, key=costs.get) for label, costs in self.costs.items()}

    def to_dict(self) -> dict[str, Any]:
        return {'metric': self.metric, 'const': self.const, 'costs': self.costs, 'share': self.share,
                'gates': {k: list(v) for k, v in self.gates.items()}, 'key': self.key}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostTable:
        return cls(data['metric'], float(data['const']), {k: dict(v) for k, v in data['costs'].items()},
                   dict(data['share']), {k: (v[0], int(v[1])) for k, v in data['gates'].items()}, dict(data['key']))


def count_flops_params(module: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """FLOPs (multiply-accumulates, NNI's convention: batch size ignored) and parameters of ``module`` at ``x``.

    The profiler's forward runs in eval mode (batch norm on a 1x1 map of one image fails in training mode).
    """
    was_training = module.training
    module.eval()
    try:
        result = FlopsParamsProfiler(module, (x,)).flops_result
    finally:
        module.train(was_training)
    return float(result.flops), float(result.params)


#: Clocks of :func:`measure_latency`: wall time, or the CPU time of the calling thread.
CLOCKS = {'wall': time.perf_counter, 'cpu': time.thread_time}


def measure_latency(module: nn.Module, x: torch.Tensor, *, warmup: int = 5, repeats: int = 20,
                    threads: int | None = 1, clock: str = 'wall') -> float:
    """Median time in ms of ``module(x)`` (eval mode, no grad) after ``warmup`` runs, at ``threads`` threads.

    The module and input must already be on the target device; CUDA is synchronized around each run. ``clock``
    ``'wall'`` is the latency; ``'cpu'`` (the calling thread's CPU time, CPU only, meaningful with ``threads=1``)
    leaves out the time the thread waits for a core, for a machine shared with other jobs: there the wall-time
    median of a whole network is inflated far more than that of one block (a long run is more often preempted).
    """
    if clock not in CLOCKS or (clock == 'cpu' and x.is_cuda):
        raise ValueError(f"clock must be 'wall' or (on the CPU) 'cpu', got {clock!r}")
    now = CLOCKS[clock]
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    was_training = module.training
    module.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                sync()
                start = now()
                module(x)
                sync()
                if i >= warmup:
                    times.append((now() - start) * 1e3)
    finally:
        module.train(was_training)
        torch.set_num_threads(previous)
    return statistics.median(times)


def choice_inputs(space: nn.Module, x: torch.Tensor) -> dict[str, list[tuple[LayerChoice, torch.Size]]]:
    """``label -> [(LayerChoice, input shape), ...]`` from one forward pass of the (unfrozen) model space."""
    found: dict[str, list[tuple[LayerChoice, torch.Size]]] = {}
    handles = []
    for module in space.modules():
        if isinstance(module, LayerChoice):
            def hook(mod: LayerChoice, args: tuple, _found: dict = found) -> None:
                _found.setdefault(mod.label, []).append((mod, args[0].shape))
            handles.append(module.register_forward_pre_hook(hook))
    was_training = space.training
    space.eval()
    try:
        with torch.no_grad():
            space(x)
    finally:
        space.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def _edge_gates(space: nn.Module) -> tuple[dict[str, float], dict[str, tuple[str, int]]]:
    """Share and gate of every DARTS cell edge (``'{cell}/op_{node}_{j}'`` kept when ``j`` is in its node's input)."""
    from search_spaces.cell import DartsCell, edge_label, input_label
    share, gates = {}, {}
    for cell in space.modules():
        if isinstance(cell, DartsCell):
            for node in cell.node_indices:
                n_chosen = cell.inputs[str(node)].n_chosen
                for j in range(node):
                    label = edge_label(cell.label, node, j)
                    share[label] = n_chosen / node
                    gates[label] = (input_label(cell.label, node), j)
    return share, gates


def _reference_sample(space: nn.Module, cheapest: Mapping[str, str]) -> dict[str, Any]:
    sample: dict[str, Any] = {}
    for label, mutable in space.simplify().items():
        if label in cheapest:
            sample[label] = cheapest[label]
        elif isinstance(mutable, CategoricalMultiple):
            sample[label] = list(mutable.values[:mutable.n_chosen or 1])
        elif isinstance(mutable, Categorical):
            raise ValueError(f'choice {label!r} is not a LayerChoice or a DARTS node input; our cost tables do not '
                             'cover it: give NNI\'s ExpectationProfilerPenalty as penalty= instead')
    return sample


def space_key(space: nn.Module) -> dict[str, Any]:
    """The space's class and constructor arguments, as NNI recorded them (part of the latency cache key)."""
    args = getattr(space, 'trace_args', ())
    kwargs = getattr(space, 'trace_kwargs', {})
    return {'space': f'{type(space).__module__}.{type(space).__qualname__}', 'args': repr(list(args)),
            'kwargs': repr(sorted(kwargs.items()))}


def default_cache_dir() -> Path:
    return Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'nni-darts-variants' / 'cost'


def build_cost_table(space: nn.Module, example_input: torch.Tensor, metric: str = 'flops', *,
                     device: str | torch.device = 'cpu', warmup: int = 5, repeats: int = 20, threads: int | None = 1,
                     clock: str = 'wall', calibration: int = 0, cache_dir: str | Path | None = None) -> CostTable:
    """The cost table of an unmutated model space at ``example_input`` (whose shape, batch included, is used).

    ``space`` is not changed. ``metric`` is ``'flops'``, ``'params'`` or ``'latency'`` (on ``device``, cached under
    ``cache_dir``, default ``~/.cache/nni-darts-variants/cost``). With ``calibration = n > 1`` (latency), ``n``
    random networks are also timed whole and the table is rescaled to the least-squares line
    ``measured = const + scale * sum(candidates)`` (blocks timed alone run faster than inside a network: warm caches,
    and on a shared machine fewer interruptions); without it, ``const`` comes from the cheapest network alone.
    """
    if metric not in METRICS:
        raise ValueError(f'unknown cost metric {metric!r}; valid: {", ".join(METRICS)}')
    space = copy.deepcopy(space).cpu()
    x = example_input.detach().to('cpu')
    device = torch.device(device)
    key = {**space_key(space), 'metric': metric, 'input': list(x.shape), 'dtype': str(x.dtype)}
    if metric == 'latency':
        key.update(device=str(device), threads=threads, clock=clock, calibration=calibration if calibration > 1 else 0,
                   torch=torch.__version__)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache / f'latency-{hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json'
        if path.is_file():
            table = CostTable.from_dict(json.loads(path.read_text()))
            if table.key == key:
                _logger.info('latency table from %s', path)
                return table
    share, gates = _edge_gates(space)
    costs: dict[str, dict[str, float]] = {}
    for label, modules in choice_inputs(space, x).items():
        costs[label] = {}
        for choice, shape in modules:
            for name in choice.names:
                cost = _cost_of(choice[name], torch.zeros(shape), metric, device, warmup, repeats, threads, clock)
                costs[label][str(name)] = costs[label].get(str(name), 0.0) + cost
    table = CostTable(metric, 0.0, costs, {k: v for k, v in share.items() if k in costs},
                      {k: v for k, v in gates.items() if k in costs}, key)
    reference = _reference_sample(space, table.cheapest())
    whole = _cost_of(space.freeze(reference), x, metric, device, warmup, repeats, threads, clock)
    table.const = max(whole - table.of_sample(reference), 0.0)
    if metric == 'latency' and calibration > 1:
        _calibrate(table, space, x, calibration, reference, whole,
                   lambda net: _cost_of(net, x, metric, device, warmup, repeats, threads, clock))
    if metric == 'latency':
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table.to_dict(), indent=1))
        _logger.info('latency table written to %s', path)
    return table


def _calibrate(table: CostTable, space: nn.Module, x: torch.Tensor, n: int, reference: dict[str, Any],
               reference_cost: float, measure: Any) -> None:
    """Rescale ``table`` to the least-squares fit of ``n`` whole networks (the cheapest one and ``n - 1`` random)."""
    import numpy as np
    rng = np.random.RandomState(0)
    samples = [reference] + [{label: mutable.random(random_state=rng) for label, mutable in space.simplify().items()}
                             for _ in range(n - 1)]
    table.const = 0.0
    predicted = np.array([table.of_sample(sample) for sample in samples])
    measured = np.array([reference_cost] + [measure(space.freeze(sample)) for sample in samples[1:]])
    scale, const = np.polyfit(predicted, measured, 1)
    scale = max(float(scale), 1e-6)
    table.costs = {label: {name: cost * scale for name, cost in costs.items()} for label, costs in table.costs.items()}
    table.const = max(float(const), 0.0)
    _logger.info('latency table calibrated on %d networks: scale %.3f, fixed part %.3f ms', n, scale, table.const)


def _cost_of(module: nn.Module, x: torch.Tensor, metric: str, device: torch.device, warmup: int, repeats: int,
             threads: int | None, clock: str) -> float:
    if metric == 'latency':
        module = copy.deepcopy(module).to(device)
        return measure_latency(module, x.to(device), warmup=warmup, repeats=repeats, threads=threads, clock=clock)
    flops, params = count_flops_params(module, x)
    return flops if metric == 'flops' else params
