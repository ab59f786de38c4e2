"""``nni-darts bench --quality``: search quality of every strategy, scored by the NAS-Bench-201 table.

Every row (each strategy of this package, plus NNI's ``DARTS``, ``GumbelDARTS``, ``RandomOneShot`` and ``ENAS``)
searches :class:`~search_spaces.nasbench201.NasBench201Space` under one protocol, once per seed, through NNI's
``NasExperiment``; the exported cell is looked up in the CIFAR-10 table (:mod:`nni_darts_variants.nasbench201`).
A row reports the table accuracy (mean, std over seeds, worst seed), its percentile among the 15,625 cells, the
search seconds, the ``skip_connect`` share of the exported cell, and how far the architecture parameters moved from
their initial values (mean ``|alpha_end - alpha_init|`` and the mean top probability of an edge, 0.2 when uniform).
The ``skip_connect`` share of the cell exported after every epoch is recorded too. P-DARTS draws fresh alphas at
every stage: its movement is that of its last stage, over the operations left on each edge.

Protocols (:data:`PROTOCOLS`):

* ``paper``: the official NAS-Bench-201 search settings (``configs/nas-benchmark/algos/{DARTS,GDAS}.config`` and the
  ``scripts-search`` arguments): C=16, N=5, CIFAR-10's training set split 25k/25k, batch 64, SGD 0.025 Nesterov
  momentum 0.9, cosine to 0.001, wd 5e-4, 50 epochs (GDAS 250), architecture Adam 3e-4 (0.5, 0.999) wd 1e-3;
  BN ``affine=False``, ``track_running_stats=False``. For a GPU.
* ``cpu``: our reduced protocol for 2 CPU cores (see :data:`PROTOCOLS` for every setting and why).

NNI's ``RandomOneShot`` trains the supernet with uniformly sampled paths; its export is one random sample, which the
row reports as it is (the paper's RSPS picks the best of 100 samples by supernet accuracy; that step is not run here).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ['PROTOCOLS', 'quality_rows', 'VARIANT_ROWS', 'NNI_ROWS', 'QualityConfig', 'format_quality_table', 'quality_main', 'run_quality']

_logger = logging.getLogger(__name__)

_SLICE = Path('../shared/data/cifar10-slice')

#: Protocols: space, data and training settings, and per-row strategy overrides.
PROTOCOLS: dict[str, dict[str, Any]] = {
    'paper': {
        'space': {'width': 16, 'num_cells': 5},
        'data': {'name': 'cifar10', 'root': 'data', 'image_size': 32, 'limit': None, 'batch_size': 64},
        'train': {'max_epochs': 50, 'learning_rate': 0.025, 'learning_rate_min': 0.001, 'momentum': 0.9,
                  'weight_decay': 5e-4, 'nesterov': True},
        'epochs': {'gdas': 250},
        'arch': {'arc_learning_rate': 3e-4, 'arc_weight_decay': 1e-3},
        'rows': {'pdarts': {'stage_cells': (5, 5, 5), 'num_to_keep': (3, 2, 1), 'epochs_per_stage': 25,
                            'stage_warmup_epochs': 10},
                 'pcdarts': {'arc_learning_rate': 6e-4, 'warmup_epochs': 15}},
        'epochs_rows': {'pdarts': 75},
    },
    # The cpu protocol: the same network shape at C=8 and N=1 (3 cells, 2 ResNet blocks), 16x16 inputs, 2,000 images
    # of the shared CIFAR-10 slice (1,000 weights / 1,000 architecture), batch 64, 10 epochs (150 steps); the
    # architecture learning rate is 2e-2 (the paper's 3e-4 x 67) because Adam moves an alpha by about one learning
    # rate per step, and 150 steps must move it as far as the paper's 19,500 steps can; warm-ups are scaled to the
    # epochs (PC-DARTS 15 of 50 -> 3 of 10).
    'cpu': {
        'space': {'width': 8, 'num_cells': 1},
        'data': {'name': 'imagefolder', 'root': str(_SLICE), 'image_size': 16, 'limit': 2000, 'batch_size': 64},
        'train': {'max_epochs': 10, 'learning_rate': 0.025, 'learning_rate_min': 0.001, 'momentum': 0.9,
                  'weight_decay': 5e-4, 'nesterov': True},
        'epochs': {},
        'arch': {'arc_learning_rate': 2e-2, 'arc_weight_decay': 1e-3},
        'rows': {'pcdarts': {'warmup_epochs': 3, 'partial_channels_k': 2},
                 'pdarts': {'stage_cells': (1, 1, 1), 'num_to_keep': (3, 2, 1), 'epochs_per_stage': 4,
                            'stage_warmup_epochs': 1}},
        'epochs_rows': {'pdarts': 12},
    },
}

#: Rows beyond one per registered strategy: name -> (strategy, fixed arguments). DARTS is scored in both orders.
VARIANT_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    # DARTS-V2.py unrolls plain momentum although the protocol's weight SGD is Nesterov: so does this row.
    'darts-2nd': ('darts', {'order': 2, 'unroll_nesterov': True})}
#: Fixed arguments of a strategy's own row (first-order DARTS, said explicitly beside ``darts-2nd``).
ROW_ARGUMENTS: dict[str, dict[str, Any]] = {'darts': {'order': 1}}
#: NNI's own one-shot strategies (classes of ``nni.nas.strategy``), each a row ``nni-<class>``.
NNI_ROWS = ('DARTS', 'GumbelDARTS', 'RandomOneShot', 'ENAS')


def quality_rows() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Rows: name -> (builder kind, strategy name or NNI class, fixed arguments).

    One row per strategy of :func:`~nni_darts_variants.registry.list_strategies` (a newly registered strategy gets
    its row without an edit here), each followed by its :data:`VARIANT_ROWS`, then NNI's :data:`NNI_ROWS`.
    """
    from .registry import list_strategies
    rows: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for name in list_strategies():
        rows[name] = ('ours', name, dict(ROW_ARGUMENTS.get(name, {})))
        rows.update((row, ('ours', name, dict(args))) for row, (of, args) in VARIANT_ROWS.items() if of == name)
    rows.update((f'nni-{cls}', ('nni', cls, {})) for cls in NNI_ROWS)
    return rows


#: Which NNI strategies take an architecture learning rate.
_NNI_ARCH = {'DARTS', 'GumbelDARTS'}


@dataclass
class QualityConfig:
    """What ``nni-darts bench --quality`` runs."""
    protocol: str = 'cpu'
    seeds: Sequence[int] = (0, 1, 2)
    rows: Sequence[str] | None = None
    data_root: str | None = None
    table: str | None = None
    progress: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)

    def check(self) -> QualityConfig:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f'unknown protocol {self.protocol!r}; valid protocols: {", ".join(PROTOCOLS)}')
        rows = quality_rows()
        unknown = [r for r in self.rows or () if r not in rows]
        if unknown:
            raise ValueError(f'unknown row(s) {unknown}; valid rows: {", ".join(rows)}')
        if not self.seeds:
            raise ValueError('--seeds is empty; give e.g. 0,1,2')
        return self

    def protocol_settings(self) -> dict[str, Any]:
        settings = copy.deepcopy(PROTOCOLS[self.protocol])
        if self.data_root:
            settings['data']['root'] = self.data_root
        return settings


def _loaders(settings: dict[str, Any], seed: int) -> tuple[Any, Any, int]:
    """The weight and architecture loaders of a protocol, decoded once into memory (one seeded augmented draw of
    each image, no fresh augmentation per epoch: the CPU protocol cannot afford decoding every epoch)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from .data import build_search_data
    d = settings['data']
    torch.manual_seed(seed)  # the one augmented draw of every image that is cached
    data = build_search_data(d['name'], root=d['root'], batch_size=d['batch_size'], image_size=d['image_size'],
                             limit=d['limit'], seed=seed, train_portion=0.5)

    def cached(loader: Any) -> TensorDataset:
        dataset = loader.dataset
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
        return TensorDataset(torch.stack(xs), torch.as_tensor(ys))

    def loader(dataset: TensorDataset, offset: int) -> DataLoader:
        return DataLoader(dataset, batch_size=d['batch_size'], shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(seed + offset))
    return loader(cached(data.train), 0), loader(cached(data.val), 1), data.num_classes


def build_row_strategy(row: str, settings: dict[str, Any]) -> Any:
    """The strategy object of a row under a protocol."""
    kind, name, fixed = quality_rows()[row]
    arch = settings['arch']
    if kind == 'ours':
        from .registry import create_strategy
        kwargs = {**arch, **fixed, **settings['rows'].get(row, {})}
        if name == 'dropnas':
            kwargs.pop('arc_weight_decay')  # DropNAS decays the used alphas itself (alpha_decay)
        return create_strategy(name, **kwargs)
    import nni.nas.strategy as nni_strategies
    klass = getattr(nni_strategies, name)
    if name == 'ENAS':  # the reward is the supernet's accuracy on an architecture batch
        return klass(reward_metric_name='val_acc')
    return klass(arc_learning_rate=arch['arc_learning_rate']) if name in _NNI_ARCH else klass()


class _TaggedLoader:
    """Yields ``(batch, tag)``: NNI 3.0's ENAS module reads its ``'train'``/``'val'`` mode from such pairs.

    With pytorch-lightning 2.x, NNI's sequential train/val loader hands ``training_step`` the bare batch, which its
    ENAS module then mistakes for a ``(batch, mode)`` pair (checked with NNI 3.0 and pytorch-lightning 2.6); tagging
    the batches ourselves gives it the pair it expects.
    """

    def __init__(self, loader: Any, tag: str):
        self.loader, self.tag = loader, tag

    def __iter__(self) -> Any:
        return ((batch, self.tag) for batch in self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _arch_callback(record: dict[str, Any]) -> Any:
    """A Lightning callback: alphas at train start and end, and the cell's skip_connect share after every epoch."""
    import pytorch_lightning as pl

    from .nasbench201 import sample_to_arch, skip_share

    def parameters(pl_module: Any) -> list[Any]:
        getter = getattr(pl_module, 'arch_parameters', None)
        return list(getter()) if callable(getter) else []

    def alphas(pl_module: Any) -> list[Any]:
        return [p.detach().clone() for p in parameters(pl_module)]

    class ArchRecorder(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            """Initial alphas: at the first batch, and again when a new stage brings new ones (P-DARTS)."""
            ids = [id(p) for p in parameters(pl_module)]
            if 'alpha_init' not in record or record.get('alpha_ids') != ids:
                record['alpha_init'], record['alpha_ids'] = alphas(pl_module), ids

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            try:
                record.setdefault('skip_share_per_epoch', []).append(round(skip_share(sample_to_arch(
                    pl_module.export())), 3))
            except Exception as err:  # noqa: BLE001 - an exporter that cannot run mid-search is no failed search
                _logger.debug('no per-epoch export: %s', err)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            record['alpha_end'] = alphas(pl_module)
    return ArchRecorder()


def alpha_movement(init: list[Any], end: list[Any]) -> dict[str, float | None]:
    """Mean ``|alpha_end - alpha_init|`` over all entries, and the mean top softmax probability per edge at the end."""
    import torch
    if not init or len(init) != len(end):
        return {'alpha_delta': None, 'top_prob': None}
    delta = torch.cat([(e - i).abs().flatten() for i, e in zip(init, end)]).mean()
    top = [float(torch.softmax(e.flatten(), -1).max()) for e in end if e.numel() > 1]
    return {'alpha_delta': round(float(delta), 4), 'top_prob': round(statistics.fmean(top), 3) if top else None}


def run_one(row: str, seed: int, settings: dict[str, Any], loaders: tuple[Any, Any, int], table: Any,
            workdir: str) -> dict[str, Any]:
    """One search of ``row`` with ``seed``; the looked-up record."""
    import pytorch_lightning as pl
    from nni.nas.evaluator.pytorch import Lightning, Trainer
    from nni.nas.experiment import NasExperiment

    from search_spaces.nasbench201 import NasBench201Space

    from .nasbench201 import sample_to_arch, skip_share
    from .search import SearchClassification

    pl.seed_everything(seed, verbose=False)
    train_loader, val_loader, num_classes = loaders
    strategy = build_row_strategy(row, settings)
    strategy_name = quality_rows()[row][1]
    epochs = settings['epochs_rows'].get(row) or settings['epochs'].get(strategy_name) or \
        settings['train']['max_epochs']
    t = settings['train']
    from .strategies.base import DartsVariant  # NNI's built-in rows have no schedule hook
    schedule_epochs = strategy.schedule_epochs(epochs) if isinstance(strategy, DartsVariant) else epochs
    # DropNAS applies its own partial weight decay; the evaluator's optimizer must not decay again.
    weight_decay = 0.0 if strategy_name == 'dropnas' else t['weight_decay']
    module = SearchClassification(learning_rate=t['learning_rate'], learning_rate_min=t['learning_rate_min'],
                                  momentum=t['momentum'], weight_decay=weight_decay, nesterov=t['nesterov'],
                                  num_classes=num_classes, max_epochs=schedule_epochs)
    record: dict[str, Any] = {'row': row, 'seed': seed}
    trainer = Trainer(max_epochs=epochs, accelerator='cpu' if settings['data']['name'] != 'cifar10' else 'auto',
                      devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, callbacks=[_arch_callback(record)])
    if row == 'nni-ENAS':
        train_loader, val_loader = _TaggedLoader(train_loader, 'train'), _TaggedLoader(val_loader, 'val')
    evaluator = Lightning(module, trainer, train_dataloaders=train_loader, val_dataloaders=val_loader)
    space = NasBench201Space(num_classes=num_classes, affine=False, track_running_stats=False, **settings['space'])
    experiment = NasExperiment(space, evaluator, strategy)
    experiment.config.experiment_working_directory = workdir
    start = time.perf_counter()
    experiment.run()
    seconds = time.perf_counter() - start
    arch = sample_to_arch(experiment.export_top_models(formatter='dict')[0])
    accuracy = table.lookup(arch)
    record.update(arch=arch, accuracy=accuracy, percentile=round(table.percentile(accuracy), 2),
                  search_seconds=round(seconds, 1), skip_share=round(skip_share(arch), 3), epochs=epochs,
                  **alpha_movement(record.pop('alpha_init', []), record.pop('alpha_end', [])))
    record.pop('alpha_ids', None)
    return record


def summarize(row: str, runs: list[dict[str, Any]], table: Any) -> dict[str, Any]:
    """One table row from the runs of a strategy (the failed ones are counted, not averaged)."""
    done = [r for r in runs if 'accuracy' in r]
    summary: dict[str, Any] = {'row': row, 'runs': runs, 'failed': len(runs) - len(done)}
    if not done:
        return summary
    accs = [r['accuracy'] for r in done]
    mean = statistics.fmean(accs)

    def mean_of(key: str) -> float | None:
        values = [r[key] for r in done if r.get(key) is not None]
        return statistics.fmean(values) if values else None
    summary.update(mean=round(mean, 2), std=round(statistics.pstdev(accs), 2) if len(accs) > 1 else 0.0,
                   worst=min(accs), percentile=round(table.percentile(mean), 1),
                   search_seconds=round(mean_of('search_seconds'), 1), skip_share=round(mean_of('skip_share'), 3),
                   alpha_delta=mean_of('alpha_delta'), top_prob=mean_of('top_prob'))
    return summary


def run_quality(cfg: QualityConfig, progress: Callable[[str], None] | None = None,
                json_path: str | Path | None = None) -> dict[str, Any]:
    """Run every row x seed of ``cfg``; returns ``{'protocol', 'settings', 'rows', 'reference', 'table'}``.

    With ``json_path``, the report so far is written there after every search (an interrupted run keeps its rows).
    """
    import torch

    from .nasbench201 import REFERENCE, NasBench201Table
    cfg.check()
    settings = cfg.protocol_settings()
    table = NasBench201Table(cfg.table)
    rows = list(cfg.rows or quality_rows())
    if settings['data']['name'] != 'cifar10':
        torch.set_num_threads(1)
    total, done = len(rows) * len(cfg.seeds), 0
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    bar = _progress_bar(total, cfg.progress)

    def report() -> dict[str, Any]:
        return {'protocol': cfg.protocol, 'settings': settings, 'seeds': list(cfg.seeds), 'table': table.stats(),
                'reference': REFERENCE, 'rows': [summarize(row, runs[row], table) for row in rows if runs[row]]}
    with tempfile.TemporaryDirectory(prefix='nni-darts-quality-') as workdir:
        for seed in cfg.seeds:
            loaders = _loaders(settings, seed)
            for row in rows:
                try:
                    record = run_one(row, seed, settings, loaders, table, workdir)
                except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
                    _logger.warning('%s seed %d failed: %s: %s', row, seed, type(err).__name__, err)
                    record = {'row': row, 'seed': seed, 'error': f'{type(err).__name__}: {err}'.splitlines()[0]}
                runs[row].append(record)
                done += 1
                line = (f'[{done}/{total}] {row} seed {seed}: ' +
                        (f'{record["accuracy"]:.2f} ({record["search_seconds"]:.0f} s) {record["arch"]}'
                         if 'accuracy' in record else record['error']))
                bar.update(1)
                bar.set_postfix_str(f'{row} seed {seed}')
                if progress:
                    progress(line)
                if json_path:
                    Path(json_path).write_text(json.dumps(report(), indent=1) + '\n')
    bar.close()
    return report()


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm
    return tqdm(total=total, desc='quality', unit='search', disable=not enabled, file=sys.stderr)


def _fmt(value: Any, spec: str) -> str:
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_quality_table(report: dict[str, Any]) -> str:
    """The text table of a report: one line per row, then the reference rows."""
    head = (f'{"strategy":<18} {"acc mean ± std":>15} {"worst":>7} {"pctile":>7} {"search s":>9} {"skip":>5} '
            f'{"|dα|":>6} {"p_max":>6}')
    lines = [f'NAS-Bench-201 CIFAR-10 test accuracy, protocol {report["protocol"]}, seeds {report["seeds"]}', head,
             '-' * len(head)]
    for r in report['rows']:
        if 'mean' not in r:
            lines.append(f'{r["row"]:<18} failed: {r["runs"][0].get("error", "?")}')
            continue
        lines.append(f'{r["row"]:<18} {r["mean"]:>7.2f} ± {r["std"]:<5.2f} {r["worst"]:>7.2f} {r["percentile"]:>7.1f} '
                     f'{r["search_seconds"]:>9.1f} {r["skip_share"]:>5.2f} {_fmt(r["alpha_delta"], ".3f"):>6} '
                     f'{_fmt(r["top_prob"], ".3f"):>6}' + (f'  ({r["failed"]} failed)' if r['failed'] else ''))
    lines.append('-' * len(head))
    for name, ref in report['reference'].items():
        std = f' ± {ref["std"]:.2f}' if ref['std'] else ''
        lines.append(f'{name:<18} {ref["mean"]:>7.2f}{std}')
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='nni-darts bench --quality', description='Search NasBench201Space with '
                                     'every strategy over seeds; score each exported cell by the NAS-Bench-201 table.')
    add = parser.add_argument
    add('--protocol', default='cpu', help=f'settings: {", ".join(PROTOCOLS)} (cpu)')
    add('--seeds', default='0,1,2', help='comma-separated seeds (0,1,2)')
    add('--strategies', nargs='+', metavar='ROW', help=f'rows to run (default all: {", ".join(quality_rows())})')
    add('--data-root', help='dataset folder (cpu: the CIFAR-10 slice; paper: CIFAR-10)')
    add('--table', help='a CSV arch,cifar10_test (default: the table shipped with the package)')
    add('--json', metavar='FILE', help='also write the whole report as JSON to FILE (updated after every search)')
    add('--no-progress', dest='progress', action='store_false', help='no progress bar')
    return parser


def quality_main(argv: Sequence[str] | None = None) -> int:
    """``nni-darts bench --quality``: run, print the table; exit code 2 on bad input, 1 if a run failed."""
    args = build_parser().parse_args(argv)
    try:
        seeds = [int(s) for s in str(args.seeds).split(',') if s.strip()]
        cfg = QualityConfig(protocol=args.protocol, seeds=seeds, rows=args.strategies, data_root=args.data_root,
                            table=args.table, progress=args.progress).check()
        report = run_quality(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True),
                             json_path=args.json)
    except ValueError as err:
        print(f'nni-darts bench --quality: error: {str(err).splitlines()[0]}', file=sys.stderr)
        return 2
    print(format_quality_table(report))
    return 1 if any(r['failed'] for r in report['rows']) else 0
