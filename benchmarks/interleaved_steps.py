"""Before/after step times on a loaded machine: ours with the exact shortcuts, ours without them, NNI's row of the
same algorithm, measured in ONE process with interleaved repeats (after, before, NNI, after, before, NNI, ...), so
that the load of other jobs hits all of them alike.

Usage: python benchmarks/interleaved_steps.py --strategies darts pcdarts gdas proxyless --batch-size 16 --repeats 3
       [--channels-last-rows darts]

"before" is the same strategy with ``VariantLightningModule.skip_unread_gradients = False`` and the mixed edges'
``zero_names`` emptied (``none`` computed, weighted and summed): the code before the speed work (the layout of the
data pipeline aside). Each measurement is one ``nni-darts bench`` row (1 warm-up step, then ``--steps`` timed), the
median over the repeats is printed, with the ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from dataclasses import replace

import torch


@contextlib.contextmanager
def unoptimised():
    from nni_darts_variants import bench
    from nni_darts_variants.strategies.base import MixedEdge, VariantLightningModule
    build = bench.build_row_module

    def build_without_zero_skip(row, cfg):
        built = build(row, cfg)
        for module in built[1].modules():
            if isinstance(module, MixedEdge):
                module.zero_names = set()
        return built
    VariantLightningModule.skip_unread_gradients = False
    bench.build_row_module = build_without_zero_skip
    try:
        yield
    finally:
        VariantLightningModule.skip_unread_gradients = True
        bench.build_row_module = build


def _print_medians(row: str, label: str, med: dict[str, float]) -> None:
    pairs = [('after', 'before'), ('after', 'nni'), ('before', 'nni'), ('after+channels_last', 'nni'),
             ('after+channels_last', 'before'), ('nni+channels_last', 'nni')]
    ratios = ', '.join(f'{k}/{b} {med[k] / med[b]:.2f}' for k, b in pairs if k in med and b in med)
    print(f'{row} ({label}): ' + ', '.join(f'{k} {1e3 * v:.0f} ms' for k, v in med.items()) + f' | {ratios}',
          flush=True)


def main(argv=None) -> int:
    from nni_darts_variants import bench
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--strategies', nargs='+', default=['darts', 'pcdarts', 'gdas', 'proxyless'])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--steps', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--channels-last-rows', nargs='*', default=[], metavar='ROW',
                        help='rows also measured in channels_last (ours and NNI\'s)')
    parser.add_argument('--output', help='JSON of every measurement')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = bench.BenchConfig(batch_size=args.batch_size, steps=args.steps, warmup=1, device='cpu', prime=False).check()
    results = {}
    for row in args.strategies:
        nni_row = bench.COUNTERPARTS.get(row)
        variants = {'after': (row, cfg, False), 'before': (row, cfg, True)}
        if nni_row:
            variants['nni'] = (nni_row, cfg, False)
        if row in args.channels_last_rows:
            variants['after+channels_last'] = (row, replace(cfg, channels_last=True), False)
            if nni_row:
                variants['nni+channels_last'] = (nni_row, replace(cfg, channels_last=True), False)
        times = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        for _ in range(args.repeats):
            for key, (name, c, before) in variants.items():
                with unoptimised() if before else contextlib.nullcontext():
                    out = bench.measure_row(name, c)
                if out['error']:
                    raise RuntimeError(f'{key}: {out["error"]}')
                times[key].append(out['step_seconds'])
                cpu[key].append(out['step_cpu_seconds'])
                print(f'  {row} {key}: {1e3 * out["step_seconds"]:.0f} ms wall, {1e3 * out["step_cpu_seconds"]:.0f} ms '
                      'CPU', file=sys.stderr, flush=True)
        results[row] = {'seconds': times, 'cpu_seconds': cpu}
        for label, series in (('wall', times), ('CPU', cpu)):
            _print_medians(row, label, {k: statistics.median(v) for k, v in series.items()})
    if args.output:
        with open(args.output, 'w') as f:
            json.dump({'batch_size': args.batch_size, 'repeats': args.repeats, 'results': results}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
