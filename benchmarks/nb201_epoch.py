"""Images per second of whole NAS-Bench-201 CPU-protocol search epochs, data loading included: the current code
against main 729daa5 (``interleaved_steps.unoptimised('main')``), with ``--pre-speed`` also the code before the speed
work, and with ``--channels-last`` the current code in channels_last, interleaved in one process (the order turns
each repeat).

Usage: python benchmarks/nb201_epoch.py [--recipe experiments/nasbench201/cpu/darts-1st.yml] [--epochs 2]
       [--repeats 2] [--channels-last]

Each measurement is one ``run_search`` of the recipe for ``--epochs`` epochs (1 intra-op thread, no bundle, a
temporary run folder); the epochs after the first are timed from ``on_train_epoch_start`` to
``on_train_epoch_end`` (wall and process CPU time), and the images are those the epoch consumed (the weight half and
the architecture half). Run from the repository root with ../shared beside it. On a loaded machine read the CPU
figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch


def _labels(batch) -> int:
    """Images in a (nested) batch: the length of its label tensors (1-D integer tensors)."""
    if torch.is_tensor(batch):
        return len(batch) if batch.dim() == 1 and not batch.is_floating_point() else 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    return sum(_labels(part) for part in batch) if isinstance(batch, (list, tuple)) else 0


def measure(recipe: str, epochs: int, level: str | None, channels_last: bool) -> tuple[float, float]:
    import contextlib

    import pytorch_lightning as pl
    from interleaved_steps import unoptimised

    from nni_darts_variants.search.runner import run_search

    class EpochClock(pl.Callback):
        def __init__(self) -> None:
            self.rates: list[tuple[float, float]] = []
            self.images = 0

        def on_train_epoch_start(self, trainer, pl_module):
            self.images, self.wall, self.cpu = 0, time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.images += _labels(batch)

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch > 0:
                self.rates.append((self.images / (time.perf_counter() - self.wall),
                                   self.images / (time.process_time() - self.cpu)))

    clock = EpochClock()
    with unoptimised(level) if level else contextlib.nullcontext(), tempfile.TemporaryDirectory() as out:
        run_search(recipe, [f'train.max_epochs={epochs}', 'train.threads=1', 'output.bundle=false',
                            'train.progress_bar=false', f'train.channels_last={str(channels_last).lower()}'],
                   output=out, callbacks=[clock])
    return statistics.median(r[0] for r in clock.rates), statistics.median(r[1] for r in clock.rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--recipe', default='experiments/nasbench201/cpu/darts-1st.yml')
    parser.add_argument('--epochs', type=int, default=2, help='epochs per run; all but the first are timed')
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--pre-speed', action='store_true', help='also the code before the speed work (before)')
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error('--epochs must be at least 2 (the first epoch is not timed)')
    torch.set_num_threads(1)
    variants = {'after': (None, False), 'main': ('main', False)}
    if args.pre_speed:
        variants['before'] = ('before', False)
    if args.channels_last:
        variants['after+channels_last'] = (None, True)
    keys = list(variants)
    rates: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for repeat in range(args.repeats):
        for key in keys[repeat % len(keys):] + keys[:repeat % len(keys)]:
            rates[key].append(measure(args.recipe, args.epochs, *variants[key]))
            print(f'  {key}: {rates[key][-1][0]:.1f} images/s wall, {rates[key][-1][1]:.1f} images/s CPU',
                  file=sys.stderr, flush=True)
    for key, series in rates.items():
        wall, cpu = statistics.median(r[0] for r in series), statistics.median(r[1] for r in series)
        print(f'{key}: {wall:.1f} images/s wall, {cpu:.1f} images/s CPU (median of {len(series)})', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
