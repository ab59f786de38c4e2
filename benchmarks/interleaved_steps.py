"""Before/after step times on a loaded machine: ours now, ours as at main 729daa5, ours before the speed work, NNI's
row of the same algorithm, measured in ONE process with interleaved repeats (after, main, NNI, then main, NNI,
after, ...: the order turns each repeat), so that the load of other jobs hits all of them alike.

Usage: python benchmarks/interleaved_steps.py --strategies darts pcdarts gdas proxyless --batch-size 16 --repeats 3
       [--channels-last-rows darts] [--nni-channels-last] [--pre-speed] [--channels-last-ops]

* ``after``: the current code as by default: NCHW network, mixed edges computed in channels-last inside (every
  exact shortcut, the shared ReLU of each edge);
  ``after+cl_ops`` (``--channels-last-ops``): the same with the max pools' channels-last option on too
  (``MaxPool2d.via_channels_last``, off by default; ``MixedEdge.channels_last_inside`` is on by default);
  ``after+channels_last``: the whole network in channels_last (``--channels-last-rows``: ``train.channels_last``,
  off by default);
* ``main``: the code of main 729daa5: the dilated depthwise rewrite off (``DepthwiseConv2d.fast_backward``), max
  pools in NCHW (``MaxPool2d.via_channels_last``), mixed edges in NCHW (``MixedEdge.channels_last_inside``), the
  architecture step's weights not frozen (``VariantLightningModule.frozen_weights`` a no-op);
* ``before`` (``--pre-speed``): also the shared ReLU off (``MixedEdge.share_relu = False``),
  ``VariantLightningModule.skip_unread_gradients = False`` and the mixed edges' ``zero_names`` emptied (``none``
  computed, weighted and summed): the code before the speed work;
* ``nni`` (and ``nni+channels_last`` with ``--nni-channels-last``): NNI's row (``bench.COUNTERPARTS``), on the same
  space, so with the operations' own rewrites (``DepthwiseConv2d``, ``MaxPool2d``); ``nni@main`` (``--nni-main``):
  NNI's row with those off too, i.e. NNI on the space as at main 729daa5.

Each measurement is one ``nni-darts bench`` row (1 warm-up step, then ``--steps`` timed); the median over the
repeats is printed, with the ratios.
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
def _patched(*changes: tuple[object, str, object]):
    """Set each ``(owner, name, value)`` (a class or module attribute defined on ``owner`` itself) for the block, and
    put back what was there."""
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in changes]
    for owner, name, value in changes:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def unoptimised(level: str):
    """``level`` 'main': the last session's rewrite, channels-last edges and pools, and freeze off; 'before': every
    shortcut off as well."""
    from nni_darts_variants import bench
    from nni_darts_variants.strategies.base import MixedEdge, VariantLightningModule
    from search_spaces.ops import DepthwiseConv2d, MaxPool2d
    build = bench.build_row_module

    def build_without_zero_skip(row, cfg):
        built = build(row, cfg)
        for module in built[1].modules():
            if isinstance(module, MixedEdge):
                module.zero_names = set()
        return built
    changes = [(DepthwiseConv2d, 'fast_backward', False), (MaxPool2d, 'via_channels_last', False),
               (MixedEdge, 'channels_last_inside', False),
               (VariantLightningModule, 'frozen_weights', lambda self: contextlib.nullcontext())]
    if level == 'before':
        changes += [(MixedEdge, 'share_relu', False), (VariantLightningModule, 'skip_unread_gradients', False),
                    (bench, 'build_row_module', build_without_zero_skip)]
    return _patched(*changes)


def channels_last_options():
    """Both channels-last switches on: the mixed edges' (on by default) and the max pools' (off by default)."""
    from nni_darts_variants.strategies.base import MixedEdge
    from search_spaces.ops import MaxPool2d
    return _patched((MaxPool2d, 'via_channels_last', True), (MixedEdge, 'channels_last_inside', True))


def _context(level: str | None):
    if level == 'options':
        return channels_last_options()
    return unoptimised(level) if level else contextlib.nullcontext()


def _print_medians(row: str, label: str, med: dict[str, float]) -> None:
    pairs = [('after+cl_ops', 'nni'), ('after+cl_ops', 'after'), ('after', 'main'), ('after+channels_last', 'main'),
             ('after+channels_last', 'after'), ('main', 'nni'),
             ('after', 'nni'), ('after+channels_last', 'nni'), ('after+channels_last', 'nni+channels_last'),
             ('after', 'before'), ('nni+channels_last', 'nni'), ('after', 'nni@main'), ('nni', 'nni@main')]
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
                        help='rows also measured in channels_last')
    parser.add_argument('--nni-channels-last', action='store_true', help="NNI's rows in channels_last as well")
    parser.add_argument('--nni-main', action='store_true',
                        help="NNI's rows also on the operations as at main (nni@main)")
    parser.add_argument('--pre-speed', action='store_true', help='also the code before the speed work (before)')
    parser.add_argument('--channels-last-ops', action='store_true',
                        help='also ours with the channels-last options on (after+cl_ops)')
    parser.add_argument('--output', help='JSON of every measurement')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = bench.BenchConfig(batch_size=args.batch_size, steps=args.steps, warmup=1, device='cpu', prime=False).check()
    results = {}
    for row in args.strategies:
        nni_row = bench.COUNTERPARTS.get(row)
        variants = {'after': (row, cfg, None), 'main': (row, cfg, 'main')}
        if args.pre_speed:
            variants['before'] = (row, cfg, 'before')
        if args.channels_last_ops:
            variants['after+cl_ops'] = (row, cfg, 'options')
        if nni_row:
            variants['nni'] = (nni_row, cfg, None)
            if args.nni_main:
                variants['nni@main'] = (nni_row, cfg, 'main')
        if row in args.channels_last_rows:
            variants['after+channels_last'] = (row, replace(cfg, channels_last=True), None)
            if nni_row and args.nni_channels_last:
                variants['nni+channels_last'] = (nni_row, replace(cfg, channels_last=True), None)
        times = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        keys = list(variants)
        for repeat in range(args.repeats):
            # the order turns each repeat, so that no variant always runs first (right after the row is imported)
            for key in keys[repeat % len(keys):] + keys[:repeat % len(keys)]:
                name, c, level = variants[key]
                with _context(level):
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
