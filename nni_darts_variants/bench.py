"""``nni-darts bench``: memory and speed of one search step of every strategy, ours and NNI's, on one supernet.

Every row runs the same thing: the strategy's own Lightning module (built as NNI builds it: ``mutate_model`` on the
space, ``configure_oneshot_module`` around a :class:`~nni_darts_variants.search.SearchClassification`) fitted by a
real Lightning ``Trainer`` for ``warmup + steps`` batches of synthetic data of the requested shape, same seed, same
batch. A callback measures each step (``training_step`` = architecture step + weight step, whatever order the
strategy uses):

* ``activation_bytes``: the most bytes held at once by tensors saved for backward during one step (warm-up steps,
  max over them), by :class:`LiveSavedTensorCounter`; parameters are not counted (they are resident anyway).
  ``saved_bytes`` is the total saved over the step (the architecture and the weight graphs together).
* ``peak_bytes``: on CUDA ``torch.cuda.max_memory_allocated`` (reset before every timed step; weights, gradients,
  optimizer state and data included). On CPU the process RSS, sampled every millisecond during the timed steps,
  minus the RSS before the supernet was built (after ``gc`` and ``malloc_trim``). RSS is process-wide, so this is
  an approximation: the heap keeps memory of earlier rows (``isolate=True`` runs each row in a fresh process), and
  the first use of the libraries would land in the first row (a discarded run of it comes first unless
  ``prime=False``).
* ``step_seconds``: the median wall time of the timed steps (after the warm-up, no saved-tensor hooks; CUDA is
  synchronized around each step).
* ``params``: parameters of the supernet (weights and architecture parameters).

Each figure also gets its ratio to our DARTS (row ``darts``) and to NNI's DARTS (row ``nni-darts``).

To make every step a full search step, strategies are built with their defaults except: no warm-up
(``warmup_epochs=0``, P-DARTS ``stage_warmup_epochs=0``) and an architecture step every batch
(``arch_update_every=1`` for ProxylessNAS). P-DARTS runs its stage-1 network (``stage_cells[0]`` cells).

Mixed precision is the trainer's (``bf16-mixed``: autocast; ``16-mixed``: autocast and a GradScaler, CUDA only);
``channels_last`` converts the supernet at train start and the inputs. Under float16 the figures are valid but
the search values are not checked: second-order DARTS sets the architecture gradients with ``torch.autograd.grad``
on the unscaled loss, which Lightning's scaler then divides by the scale.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from .memory import SavedTensorCounter

__all__ = ['BenchConfig', 'LiveSavedTensorCounter', 'available_rows', 'build_row_strategy', 'build_row_module',
           'bench_trainer', 'bench_loaders', 'step_meter', 'run_bench', 'measure_row', 'add_ratios', 'find_max_batch',
           'format_table', 'bench_main', 'build_parser']

_logger = logging.getLogger(__name__)

#: Extra rows: our DARTS second order, and NNI's own one-shot strategies (``nni.nas.strategy``).
NNI_ROWS = {'nni-darts': 'DARTS', 'nni-gumbel': 'GumbelDARTS', 'nni-proxyless': 'Proxyless'}
REFERENCES = {'darts': 'darts', 'nni': 'nni-darts'}
FIGURES = ('activation_bytes', 'saved_bytes', 'peak_bytes', 'step_seconds', 'params')
PRECISION = {'float32': '32-true', 'bfloat16': 'bf16-mixed', 'float16': '16-mixed'}
#: Epochs the trainer is told about (the DARTS search length), so that per-epoch schedules sit at their start.
SEARCH_EPOCHS = 50


@dataclass
class BenchConfig:
    """What to benchmark; see ``nni-darts bench --help`` for each field."""
    strategies: list[str] | None = None
    width: int = 16
    num_cells: int = 8
    batch_size: int = 64
    image_size: int = 32
    device: str = 'auto'
    dtype: str = 'float32'
    channels_last: bool = False
    steps: int = 5
    warmup: int = 2
    seed: int = 0
    isolate: bool = False
    max_batch: int | None = None
    max_batch_metric: str = 'auto'
    probe_batches: tuple[int, int] = (4, 8)
    prime: bool = True

    def check(self) -> 'BenchConfig':
        for key in ('width', 'num_cells', 'batch_size', 'image_size', 'steps', 'warmup'):
            if getattr(self, key) < 1:
                raise ValueError(f'{key} must be >= 1, got {getattr(self, key)}')
        if self.dtype not in PRECISION:
            raise ValueError(f'dtype {self.dtype!r} is not supported; use one of {", ".join(PRECISION)}')
        if self.device not in ('auto', 'cpu', 'cuda'):
            raise ValueError(f'device {self.device!r} is not supported; use auto, cpu or cuda')
        if self.device == 'auto':
            self.device = 'cuda' if torch.cuda.is_available() else 'cpu'
        if self.device == 'cuda' and not torch.cuda.is_available():
            raise ValueError('device cuda requested but CUDA is not available; use --device cpu')
        if self.dtype == 'float16' and self.device != 'cuda':
            raise ValueError('float16 mixed precision (GradScaler) needs CUDA; use --dtype bfloat16 on CPU')
        if self.max_batch_metric not in ('auto', 'activation', 'peak'):
            raise ValueError(f'max_batch_metric {self.max_batch_metric!r}: use auto, activation or peak')
        if len(self.probe_batches) != 2 or not 0 < self.probe_batches[0] < self.probe_batches[1]:
            raise ValueError(f'probe_batches must be two increasing positive sizes, got {self.probe_batches}')
        if self.max_batch is not None and self.max_batch <= 0:
            raise ValueError(f'max_batch must be a positive number of bytes, got {self.max_batch}')
        return self


# ---------------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------------

class _Saved:
    """What the pack hook stores instead of a tensor: its death tells the counter that autograd released it."""
    __slots__ = ('tensor', 'key', 'owner')

    def __init__(self, tensor: torch.Tensor, key: tuple[int, int], owner: 'LiveSavedTensorCounter'):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self) -> None:
        self.owner._release(self.key)


class LiveSavedTensorCounter(SavedTensorCounter):
    """A :class:`~nni_darts_variants.memory.SavedTensorCounter` that also knows when autograd frees what it saved.

    ``peak_bytes`` is the most bytes of distinct storages held for backward at any moment (what a step needs, since
    the architecture and the weight graphs of a search step are not alive together); ``bytes`` is the total over
    all graphs, counting a storage again only if it was released and saved anew (the plain counter keys storages by
    address, which the allocator reuses across graphs).
    """

    def __init__(self, include_parameters: bool = False, parameters: Any = ()):
        super().__init__(include_parameters=include_parameters, parameters=parameters)
        self._live: dict[tuple[int, int], int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def _pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] in self._param_ptrs and not self.include_parameters:
            return tensor
        holders = self._live.get(key, 0)
        if holders == 0:
            self.bytes += key[1]
            self.count += 1
            self.live_bytes += key[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._live[key] = holders + 1
        return _Saved(tensor, key, self)

    def _release(self, key: tuple[int, int]) -> None:
        holders = self._live.pop(key, 0) - 1
        if holders > 0:
            self._live[key] = holders
        elif holders == 0:
            self.live_bytes -= key[1]

    def active(self) -> Any:
        def unpack(saved: Any) -> torch.Tensor:
            return saved.tensor if isinstance(saved, _Saved) else saved
        return torch.autograd.graph.saved_tensors_hooks(self._pack, unpack)


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _release_memory(device: str) -> None:
    """Collect garbage and hand freed memory back (``malloc_trim`` on glibc; the CUDA cache on CUDA)."""
    gc.collect()
    if device == 'cuda':
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RssSampler:
    """Samples the process RSS in a thread while running; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak = _rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss())
        return self.peak


def step_meter(warmup: int, steps: int, device: str, channels_last: bool, rss_baseline: int) -> Any:
    """A Lightning callback measuring each ``training_step`` (see the module docstring)."""
    import pytorch_lightning as pl

    class StepMeter(pl.Callback):
        def __init__(self) -> None:
            self.activation: list[int] = []
            self.saved: list[int] = []
            self.seconds: list[float] = []
            self.peaks: list[int] = []
            self.params = self.arch_params = 0
            self._counter: LiveSavedTensorCounter | None = None
            self._hooks: Any = None
            self._sampler = _RssSampler()
            self._start = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if channels_last:
                pl_module.to(memory_format=torch.channels_last)
            arch = pl_module.arch_parameters() if hasattr(pl_module, 'arch_parameters') else []
            self.params = sum(p.numel() for p in pl_module.parameters())
            self.arch_params = sum(p.numel() for p in arch)

        def _sync(self) -> None:
            if device == 'cuda':
                torch.cuda.synchronize()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._sync()
            if batch_idx < warmup:
                self._counter = LiveSavedTensorCounter(parameters=pl_module.parameters())
                self._hooks = self._counter.active()
                self._hooks.__enter__()
            elif device == 'cuda':
                torch.cuda.reset_peak_memory_stats()
            else:
                self._sampler.start()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._sync()
            seconds = time.perf_counter() - self._start
            if batch_idx < warmup:
                self._hooks.__exit__(None, None, None)
                self.activation.append(self._counter.peak_bytes)
                self.saved.append(self._counter.bytes)
                self._counter = self._hooks = None
                return
            self.seconds.append(seconds)
            if batch_idx + 1 >= warmup + steps:
                trainer.should_stop = True
            if device == 'cuda':
                self.peaks.append(torch.cuda.max_memory_allocated())
            else:
                self.peaks.append(self._sampler.stop() - rss_baseline)

    return StepMeter()


class _RepeatedBatch(torch.utils.data.Dataset):
    """``length`` times the same pre-generated batch (the loader uses ``batch_size=None``)."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch


def bench_loaders(cfg: BenchConfig, batch_size: int, num_classes: int = 10) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    g = torch.Generator().manual_seed(cfg.seed)
    loaders = {}
    for split in ('train', 'val'):
        x = torch.randn(batch_size, 3, cfg.image_size, cfg.image_size, generator=g)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, num_classes, (batch_size,), generator=g)
        loaders[split] = DataLoader(_RepeatedBatch((x, y), cfg.warmup + cfg.steps), batch_size=None)
    return loaders


# ---------------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------------

def _bench_kwargs(klass: type) -> tuple[dict[str, Any], list[str]]:
    """Overrides that make every batch a full search step (architecture and weights); and notes saying so."""
    from .registry import strategy_parameters
    params = strategy_parameters(klass)
    wanted = {'warmup_epochs': 0, 'stage_warmup_epochs': 0, 'arch_update_every': 1}
    kwargs = {k: v for k, v in wanted.items() if k in params and params[k].default != v}
    return kwargs, [f'{k}={v}' for k, v in kwargs.items()]


def available_rows() -> list[str]:
    """Row names in table order: our strategies (``darts-2nd`` after ``darts``), then NNI's."""
    from .registry import list_strategies
    rows: list[str] = []
    for name in list_strategies():
        rows.append(name)
        if name == 'darts':
            rows.append('darts-2nd')
    return sorted(rows, key=lambda r: (not r.startswith('darts'), r)) + list(NNI_ROWS)


def build_row_strategy(row: str) -> tuple[Any, str]:
    """The strategy object of a row, and a note on what differs from its defaults."""
    if row in NNI_ROWS:
        import nni.nas.strategy as nni_strategy  # before anything under nni.nas.oneshot
        return getattr(nni_strategy, NNI_ROWS[row])(), 'NNI 3.0 built-in'
    from .registry import get_strategy
    name, extra = ('darts', {'order': 2}) if row == 'darts-2nd' else (row, {})
    klass = get_strategy(name)
    kwargs, notes = _bench_kwargs(klass)
    strategy = klass(**kwargs, **extra)
    if hasattr(strategy, 'stage_cells'):
        notes.append(f'stage-1 network ({strategy.stage_cells[0]} cells)')
    return strategy, ', '.join(notes)


def measure_row(row: str, cfg: BenchConfig, batch_size: int | None = None) -> dict[str, Any]:
    """Build and run one row; a failure gives a row with ``error`` instead of raising."""
    batch_size = batch_size or cfg.batch_size
    result: dict[str, Any] = {'name': row, 'batch_size': batch_size, 'error': None}
    try:
        result.update(_measure(row, cfg, batch_size))
    except Exception as err:  # a broken strategy must not stop the table
        _logger.debug('bench row %s failed', row, exc_info=True)
        result['error'] = f'{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ""}'
    finally:
        _release_memory(cfg.device)
    return result


def build_row_module(row: str, cfg: BenchConfig) -> tuple[Any, Any, int, str]:
    """``(strategy, lightning_module, max_epochs, note)`` of a row, built as NNI builds a one-shot search."""
    from search_spaces import DartsSpace

    from .search import SearchClassification
    strategy, note = build_row_strategy(row)
    space = DartsSpace(width=cfg.width, num_cells=cfg.num_cells, dataset='cifar10')
    strategy.mutate_model(space)
    epochs = getattr(strategy, 'total_epochs', SEARCH_EPOCHS)
    module = strategy.configure_oneshot_module(SearchClassification(num_classes=10, max_epochs=epochs))
    module.set_model(space)
    return strategy, module, epochs, note


def bench_trainer(cfg: BenchConfig, max_epochs: int, callbacks: list) -> Any:
    """A quiet Lightning trainer on the configured device and precision (it stops when a callback says so)."""
    import pytorch_lightning as pl
    return pl.Trainer(accelerator='gpu' if cfg.device == 'cuda' else 'cpu', devices=1,
                      precision=PRECISION[cfg.dtype], max_epochs=max_epochs, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, callbacks=callbacks)


def _measure(row: str, cfg: BenchConfig, batch_size: int) -> dict[str, Any]:
    import pytorch_lightning as pl
    _release_memory(cfg.device)
    baseline = _rss()
    pl.seed_everything(cfg.seed, verbose=False)
    strategy, module, epochs, note = build_row_module(row, cfg)
    meter = step_meter(cfg.warmup, cfg.steps, cfg.device, cfg.channels_last, baseline)
    bench_trainer(cfg, epochs, [meter]).fit(module, train_dataloaders=bench_loaders(cfg, batch_size))
    if len(meter.seconds) < cfg.steps:
        raise RuntimeError(f'only {len(meter.seconds)} of {cfg.steps} timed steps ran')
    return {'strategy': f'{type(strategy).__module__}.{type(strategy).__qualname__}',
            'source': 'nni' if row in NNI_ROWS else 'ours', 'note': note,
            'activation_bytes': max(meter.activation), 'saved_bytes': max(meter.saved),
            'peak_bytes': max(meter.peaks), 'peak_kind': 'cuda_max_allocated' if cfg.device == 'cuda' else 'rss',
            'step_seconds': statistics.median(meter.seconds), 'step_seconds_all': meter.seconds,
            'params': meter.params, 'arch_params': meter.arch_params}


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``{figure}_vs_{darts,nni}``: each figure over the same figure of the reference row (``None`` if absent)."""
    by_name = {r['name']: r for r in rows}
    for ref_key, ref_name in REFERENCES.items():
        ref = by_name.get(ref_name, {})
        for row in rows:
            for figure in FIGURES:
                value, base = row.get(figure), ref.get(figure)
                ok = isinstance(value, (int, float)) and isinstance(base, (int, float)) and base > 0
                row[f'{figure}_vs_{ref_key}'] = value / base if ok else None
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Largest batch for a memory budget
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------

def _select(strategies: Sequence[str] | None) -> list[str]:
    rows = available_rows()
    if not strategies:
        return rows
    unknown = [s for s in strategies if s not in rows]
    if unknown:
        raise ValueError(f'unknown bench row(s) {unknown}; valid: {", ".join(rows)}')
    return list(strategies)


def _isolated_rows(cfg: BenchConfig, names: list[str]) -> Iterator[dict[str, Any]]:
    """Each row in a fresh Python process (clean heap for the CPU RSS figure, clean CUDA context)."""
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, 'row.json')
            argv = _config_argv(replace(cfg, strategies=[name], isolate=False)) + ['--output', out]
            proc = subprocess.run([sys.executable, '-m', 'nni_darts_variants.bench', *argv],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode == 0 and os.path.exists(out):
                with open(out) as f:
                    yield json.load(f)['rows'][0]
            else:
                tail = proc.stderr.strip().splitlines()[-1:] or ['no output']
                yield {'name': name, 'batch_size': cfg.batch_size, 'error': f'subprocess failed: {tail[0]}'}


def _config_argv(cfg: BenchConfig) -> list[str]:
    argv = ['--width', str(cfg.width), '--cells', str(cfg.num_cells), '--batch-size', str(cfg.batch_size),
            '--image-size', str(cfg.image_size), '--device', cfg.device, '--dtype', cfg.dtype,
            '--steps', str(cfg.steps), '--warmup', str(cfg.warmup), '--seed', str(cfg.seed),
            '--max-batch-metric', cfg.max_batch_metric, '--probe-batches', *map(str, cfg.probe_batches)]
    if cfg.channels_last:
        argv.append('--channels-last')
    if not cfg.prime:
        argv.append('--no-prime')
    if cfg.max_batch is not None:
        argv += ['--max-batch', str(cfg.max_batch)]
    if cfg.strategies:
        argv += ['--strategies', *cfg.strategies]
    return argv


def run_bench(config: BenchConfig | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Benchmark the rows of ``config`` (or a :class:`BenchConfig` built from ``kwargs``); one dict per row.

    Every row has ``name``, ``batch_size``, ``error`` and, when it ran, ``activation_bytes``, ``saved_bytes``,
    ``peak_bytes``, ``step_seconds``, ``params`` and their ratios ``*_vs_darts`` / ``*_vs_nni``; with
    ``max_batch`` the ``max_batch*`` fields of :func:`find_max_batch`.
    """
    cfg = (replace(config, **kwargs) if config is not None else BenchConfig(**kwargs)).check()
    names = _select(cfg.strategies)
    if cfg.isolate:
        rows = list(_isolated_rows(cfg, names))
    else:
        rows = []
        if cfg.prime and cfg.device == 'cpu':  # first use of the libraries would inflate the first row's RSS
            measure_row(names[0], replace(cfg, steps=1, warmup=1))
        for name in names:
            _logger.info('bench: %s', name)
            row = measure_row(name, cfg)
            if cfg.max_batch is not None and row['error'] is None:
                row.update(find_max_batch(name, cfg, cfg.max_batch))
            rows.append(row)
    return add_ratios(rows)


# ---------------------------------------------------------------------------------------------------------------------
# Output and command line
# ---------------------------------------------------------------------------------------------------------------------

def _cell(value: Any, ratios: tuple[Any, Any], scale: float, digits: int) -> str:
    if value is None:
        return '-'
    parts = [f'{r:.2f}' if r is not None else '-' for r in ratios]
    return f'{value / scale:.{digits}f} ({parts[0]}/{parts[1]})'


def format_table(rows: list[dict[str, Any]], cfg: BenchConfig | None = None) -> str:
    """A plain-text table; each figure is followed by its ratios (to our DARTS / to NNI's DARTS)."""
    columns = [('activation MB', 'activation_bytes', 2 ** 20, 1), ('saved MB', 'saved_bytes', 2 ** 20, 1),
               ('peak MB', 'peak_bytes', 2 ** 20, 1), ('step ms', 'step_seconds', 1e-3, 1),
               ('params M', 'params', 1e6, 3)]
    show_max = any('max_batch' in r for r in rows)
    header = ['strategy'] + [c[0] for c in columns] + (['max batch'] if show_max else [])
    body = []
    for row in rows:
        if row.get('error'):
            body.append([row['name'], f'error: {row["error"]}'])
            continue
        line = [row['name']] + [_cell(row.get(key), (row.get(f'{key}_vs_darts'), row.get(f'{key}_vs_nni')), s, d)
                                for _, key, s, d in columns]
        if show_max:
            fits = ' (over)' if row.get('max_batch_fits') is False else ''
            line.append(f'{row["max_batch"]}{fits}' if row.get('max_batch') else '-')
        body.append(line + ([f'[{row["note"]}]'] if row.get('note') else []))
    widths = [max(len(r[i]) for r in [header] + body if i < len(r) and not r[1].startswith('error'))
              for i in range(len(header))]
    lines = ['  '.join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ['  '.join(c.ljust(w) for c, w in zip(r, widths + [0])) if not r[1].startswith('error')
              else '  '.join(r) for r in body]
    if cfg is not None:
        lines.append(f'(ratio to darts / to nni-darts) batch {cfg.batch_size}, {cfg.image_size}x{cfg.image_size}, '
                     f'width {cfg.width}, {cfg.num_cells} cells, {cfg.device}, {cfg.dtype}'
                     f'{", channels_last" if cfg.channels_last else ""}; median of {cfg.steps} steps after '
                     f'{cfg.warmup} warm-up')
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='nni-darts bench', description='Activation memory, peak memory, time per search step and parameters of '
        'every strategy (ours and NNI\'s DARTS, GumbelDARTS, Proxyless) on the same supernet, batch and seed.')
    add = parser.add_argument
    add('--strategies', nargs='+', metavar='NAME', help='rows to run (default: all; see --list)')
    add('--list', action='store_true', help='list the row names and exit')
    add('--width', type=int, default=16, help='initial channels C of the search network (16)')
    add('--cells', dest='num_cells', type=int, default=8, help='cells of the search network (8)')
    add('--batch-size', type=int, default=64, help='batch of each of the two halves (64)')
    add('--image-size', type=int, default=32, help='input height and width (32)')
    add('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    add('--dtype', default='float32', choices=list(PRECISION),
        help='float32, or autocast mixed precision (bfloat16; float16 with GradScaler, CUDA only)')
    add('--channels-last', action='store_true', help='channels_last memory format for the supernet and inputs')
    add('--steps', type=int, default=5, help='timed steps (median reported) (5)')
    add('--warmup', type=int, default=2, help='warm-up steps, where activations are counted (2)')
    add('--seed', type=int, default=0)
    add('--isolate', action='store_true', help='run each row in a fresh process (clean heap for CPU peak RSS)')
    add('--max-batch', type=float, metavar='BYTES', help='also find the largest batch fitting this many bytes')
    add('--max-batch-metric', default='auto', choices=['auto', 'activation', 'peak'],
        help='memory the --max-batch budget applies to (auto: peak on CUDA, activation on CPU)')
    add('--probe-batches', type=int, nargs=2, default=(4, 8), metavar=('B1', 'B2'),
        help='the two batch sizes --max-batch extrapolates from (4 8)')
    add('--no-prime', dest='prime', action='store_false',
        help='skip the discarded first run that loads the libraries before the CPU RSS figures')
    add('--json', action='store_true', help='print JSON instead of the table')
    add('--output', metavar='FILE', help='also write the JSON to FILE')
    return parser


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``nni-darts bench``: parse ``argv``, run, print the table (or JSON); the exit code (1 if any row failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if '--quality' in argv:  # the search-quality benchmark has its own module and options
        from .quality import quality_main
        return quality_main([a for a in argv if a != '--quality'])
    args = build_parser().parse_args(argv)
    if args.list:
        print('\n'.join(available_rows()))
        return 0
    cfg = BenchConfig(strategies=args.strategies, width=args.width, num_cells=args.num_cells,
                      batch_size=args.batch_size, image_size=args.image_size, device=args.device, dtype=args.dtype,
                      channels_last=args.channels_last, steps=args.steps, warmup=args.warmup, seed=args.seed,
                      isolate=args.isolate, max_batch=int(args.max_batch) if args.max_batch else None,
                      max_batch_metric=args.max_batch_metric, probe_batches=tuple(args.probe_batches),
                      prime=args.prime)
    try:
        rows = run_bench(cfg.check())
    except ValueError as err:
        print(f'nni-darts bench: error: {err}', file=sys.stderr)
        return 2
    report = {'config': asdict(cfg), 'torch': torch.__version__, 'rows': rows}
    if args.output:
        with open(args.output, 'w') as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1) if args.json else format_table(rows, cfg))
    return 1 if any(r.get('error') for r in rows) else 0


if __name__ == '__main__':
    sys.exit(bench_main())
