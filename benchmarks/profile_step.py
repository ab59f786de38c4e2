"""torch.profiler on one search step of some bench rows: the top operators by self CPU time, as shares.

Usage: python benchmarks/profile_step.py --strategies darts pcdarts gdas --batch-size 16 [--top 15]

Each row is built exactly as ``nni-darts bench`` builds it (CIFAR-10 search network, 8 cells, C=16, synthetic data)
and fitted by a real Lightning trainer; the profiler records the step after ``--warmup`` warm-up steps. Shares of
the total self time are printed (they survive a loaded machine better than wall times).
"""
from __future__ import annotations

import argparse
import sys

import torch


def profile_row(row: str, cfg, top: int) -> str:
    import pytorch_lightning as pl
    from torch.profiler import ProfilerActivity, profile

    from nni_darts_variants import bench

    class Recorder(pl.Callback):
        def __init__(self) -> None:
            self.prof = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == cfg.warmup:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == cfg.warmup:
                self.prof.__exit__(None, None, None)
                trainer.should_stop = True

    pl.seed_everything(cfg.seed, verbose=False)
    _, module, epochs, _ = bench.build_row_module(row, cfg)
    rec = Recorder()
    bench.bench_trainer(cfg, epochs, [rec]).fit(module, train_dataloaders=bench.bench_loaders(cfg, cfg.batch_size))
    events = [e for e in rec.prof.key_averages()]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    lines = [f'== {row}: {total / 1e3:.0f} ms self CPU in the step, {sum(e.count for e in events)} op calls']
    for e in events[:top]:
        lines.append(f'{e.key:<45} {100 * e.self_cpu_time_total / total:5.1f}%  calls {e.count}')
    return '\n'.join(lines)


def main(argv=None) -> int:
    from nni_darts_variants.bench import BenchConfig
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--strategies', nargs='+', default=['darts', 'pcdarts', 'gdas'])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--top', type=int, default=15)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(batch_size=args.batch_size, warmup=args.warmup, steps=1, device='cpu', prime=False).check()
    for row in args.strategies:
        print(profile_row(row, cfg, args.top), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
