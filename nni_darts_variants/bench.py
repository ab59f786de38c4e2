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
  synchronized around each step). ``step_cpu_seconds``: the median CPU time of the main thread over the same steps
  (on CPU with one intra-op thread, the work of the step: it is far less sensitive to other jobs on the machine).
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

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from .counting import count_parameters
from .memory import LiveSavedTensorCounter, RssSampler, release_memory, rss

__all__ = ['BenchConfig', 'available_rows', 'build_row_strategy', 'build_row_module', 'bench_trainer',
           'bench_loaders', 'step_meter', 'run_bench', 'measure_row', 'add_ratios', 'bench_main']

_logger = logging.getLogger(__name__)

#: Extra rows: our DARTS second order, and NNI's own one-shot strategies (``nni.nas.strategy``).
NNI_ROWS = {'nni-darts': 'DARTS', 'nni-gumbel': 'GumbelDARTS', 'nni-proxyless': 'Proxyless'}
REFERENCES = {'darts': 'darts', 'nni': 'nni-darts'}
#: Our row of an algorithm NNI also ships, and NNI's row of it (``step_seconds_vs_counterpart``).
COUNTERPARTS = {'darts': 'nni-darts', 'gdas': 'nni-gumbel', 'proxyless': 'nni-proxyless'}
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
    compile: bool = False
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
# Measuring (the memory accounting is in :mod:`nni_darts_variants.memory`)
# ---------------------------------------------------------------------------------------------------------------------

def step_meter(warmup: int, steps: int, device: str, channels_last: bool, rss_baseline: int,
               compile: bool = False) -> Any:
    """A Lightning callback measuring each ``training_step`` (see the module docstring)."""
    import pytorch_lightning as pl

    class StepMeter(pl.Callback):
        def __init__(self) -> None:
            self.activation: list[int] = []
            self.saved: list[int] = []
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []
            self.peaks: list[int] = []
            self.params = self.arch_params = 0
            self.first_seconds = 0.0
            self._counter: LiveSavedTensorCounter | None = None
            self._hooks: Any = None
            self._sampler = RssSampler()
            self._start = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if channels_last:
                pl_module.to(memory_format=torch.channels_last)
            if compile:
                from .speed import compile_supernet
                compile_supernet(pl_module)
            arch = pl_module.arch_parameters() if hasattr(pl_module, 'arch_parameters') else []
            self.params = count_parameters(pl_module)
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
            self._cpu_start = time.thread_time()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self._sync()
            seconds = time.perf_counter() - self._start
            cpu_seconds = time.thread_time() - self._cpu_start
            if batch_idx == 0:
                self.first_seconds = seconds  # with --compile: the compilation, under the saved-tensor hooks
            if batch_idx < warmup:
                self._hooks.__exit__(None, None, None)
                self.activation.append(self._counter.peak_bytes)
                self.saved.append(self._counter.bytes)
                self._counter = self._hooks = None
                return
            self.seconds.append(seconds)
            self.cpu_seconds.append(cpu_seconds)
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
    kwargs = dict(klass.full_step_kwargs())
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
    if name == 'pdarts':  # the row measures P-DARTS's first stage
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
        release_memory(cfg.device)
    return result


def build_row_module(row: str, cfg: BenchConfig) -> tuple[Any, Any, int, str]:
    """``(strategy, lightning_module, max_epochs, note)`` of a row, built as NNI builds a one-shot search."""
    from search_spaces import DartsSpace

    from .search import SearchClassification
    strategy, note = build_row_strategy(row)
    space = DartsSpace(width=cfg.width, num_cells=cfg.num_cells, dataset='cifar10')
    strategy.mutate_model(space)
    from .strategies.base import DartsVariant  # NNI's built-in rows fix no epoch count
    epochs = (strategy.required_max_epochs() if isinstance(strategy, DartsVariant) else None) or SEARCH_EPOCHS
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
    release_memory(cfg.device)
    baseline = rss()
    pl.seed_everything(cfg.seed, verbose=False)
    strategy, module, epochs, note = build_row_module(row, cfg)
    meter = step_meter(cfg.warmup, cfg.steps, cfg.device, cfg.channels_last, baseline, cfg.compile)
    bench_trainer(cfg, epochs, [meter]).fit(module, train_dataloaders=bench_loaders(cfg, batch_size))
    if len(meter.seconds) < cfg.steps:
        raise RuntimeError(f'only {len(meter.seconds)} of {cfg.steps} timed steps ran')
    return {'strategy': f'{type(strategy).__module__}.{type(strategy).__qualname__}',
            'source': 'nni' if row in NNI_ROWS else 'ours', 'note': note,
            'activation_bytes': max(meter.activation), 'saved_bytes': max(meter.saved),
            'peak_bytes': max(meter.peaks), 'peak_kind': 'cuda_max_allocated' if cfg.device == 'cuda' else 'rss',
            'step_seconds': statistics.median(meter.seconds), 'step_seconds_all': meter.seconds,
            'first_step_seconds': meter.first_seconds, 'step_cpu_seconds': statistics.median(meter.cpu_seconds),
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
    for row in rows:
        theirs = by_name.get(COUNTERPARTS.get(row['name'], ''), {}).get('step_seconds')
        ours = row.get('step_seconds')
        row['step_seconds_vs_counterpart'] = ours / theirs if ours and theirs else None
    return rows


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
    from .bench_cli import _config_argv as config_argv
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, 'row.json')
            argv = config_argv(replace(cfg, strategies=[name], isolate=False)) + ['--output', out]
            proc = subprocess.run([sys.executable, '-m', 'nni_darts_variants.bench_cli', *argv],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode == 0 and os.path.exists(out):
                with open(out) as f:
                    yield json.load(f)['rows'][0]
            else:
                tail = proc.stderr.strip().splitlines()[-1:] or ['no output']
                yield {'name': name, 'batch_size': cfg.batch_size, 'error': f'subprocess failed: {tail[0]}'}


def run_bench(config: BenchConfig | None = None, progress: Callable[[int, int, dict[str, Any]], None] | None = None,
              **kwargs: Any) -> list[dict[str, Any]]:
    """Benchmark the rows of ``config`` (or a :class:`BenchConfig` built from ``kwargs``); one dict per row.

    Every row has ``name``, ``batch_size``, ``error`` and, when it ran, ``activation_bytes``, ``saved_bytes``,
    ``peak_bytes``, ``step_seconds``, ``params`` and their ratios ``*_vs_darts`` / ``*_vs_nni`` (and
    ``step_seconds_vs_counterpart``: ours over NNI's version of the same algorithm, see ``COUNTERPARTS``); with
    ``max_batch`` the ``max_batch*`` fields of :func:`~nni_darts_variants.max_batch.find_max_batch`.
    ``progress(index, total, row)`` is called after each row.
    """
    cfg = (replace(config, **kwargs) if config is not None else BenchConfig(**kwargs)).check()
    names = _select(cfg.strategies)
    rows: list[dict[str, Any]] = []
    if cfg.isolate:
        measured: Iterator[dict[str, Any]] = _isolated_rows(cfg, names)
    else:
        if cfg.prime and cfg.device == 'cpu':  # first use of the libraries would inflate the first row's RSS
            measure_row(names[0], replace(cfg, steps=1, warmup=1))
        measured = (_measure_with_max_batch(name, cfg) for name in names)
    for index, row in enumerate(measured, 1):
        rows.append(row)
        if progress is not None:
            progress(index, len(names), row)
    return add_ratios(rows)


def _measure_with_max_batch(name: str, cfg: BenchConfig) -> dict[str, Any]:
    _logger.info('bench: %s', name)
    row = measure_row(name, cfg)
    if cfg.max_batch is not None and row['error'] is None:
        from .max_batch import find_max_batch
        row.update(find_max_batch(name, cfg, cfg.max_batch))
    return row


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``nni-darts bench``: see :func:`nni_darts_variants.bench_cli.bench_main`."""
    from .bench_cli import bench_main as main
    return main(argv)


if __name__ == '__main__':
    sys.exit(bench_main())
