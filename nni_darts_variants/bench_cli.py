"""``nni-darts bench`` on the command line: options, presets, a progress line per row, the table or JSON.

The CLI layer over :mod:`nni_darts_variants.bench` (rows and measuring), :mod:`nni_darts_variants.max_batch`
(``--max-batch``) and :mod:`nni_darts_variants.quality` (``--quality``, its own options). The default is a quick
representative run (the CIFAR-10 search network at batch 8, 1 timed step after 1 warm-up; a few minutes on two
cores); ``--paper`` is the paper-scale batch (64, 5 steps after 2 warm-ups).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any, Sequence

import torch

from .bench import COUNTERPARTS, PRECISION, BenchConfig, available_rows, run_bench

__all__ = ['PRESETS', 'bench_main', 'build_parser', 'format_table', 'progress_line']

#: ``--quick`` (the default) and ``--paper``: batch, timed steps, warm-up steps; explicit options override them.
PRESETS: dict[str, dict[str, int]] = {'quick': {'batch_size': 8, 'steps': 1, 'warmup': 1},
                                      'paper': {'batch_size': 64, 'steps': 5, 'warmup': 2}}


def _config_argv(cfg: BenchConfig) -> list[str]:
    argv = ['--width', str(cfg.width), '--cells', str(cfg.num_cells), '--batch-size', str(cfg.batch_size),
            '--image-size', str(cfg.image_size), '--device', cfg.device, '--dtype', cfg.dtype,
            '--steps', str(cfg.steps), '--warmup', str(cfg.warmup), '--seed', str(cfg.seed),
            '--max-batch-metric', cfg.max_batch_metric, '--probe-batches', *map(str, cfg.probe_batches)]
    if cfg.channels_last:
        argv.append('--channels-last')
    if cfg.compile:
        argv.append('--compile')
    if not cfg.prime:
        argv.append('--no-prime')
    if cfg.max_batch is not None:
        argv += ['--max-batch', str(cfg.max_batch)]
    if cfg.strategies:
        argv += ['--strategies', *cfg.strategies]
    return argv


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
    header = ['strategy'] + [c[0] for c in columns] + ['step vs NNI'] + (['max batch'] if show_max else [])
    body = []
    for row in rows:
        if row.get('error'):
            body.append([row['name'], f'error: {row["error"]}'])
            continue
        line = [row['name']] + [_cell(row.get(key), (row.get(f'{key}_vs_darts'), row.get(f'{key}_vs_nni')), s, d)
                                for _, key, s, d in columns]
        versus = row.get('step_seconds_vs_counterpart')
        line.append(f'{versus:.2f}' if versus is not None else '-')
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
        lines.append(f'(ratio to darts / to nni-darts; step vs NNI: our step over NNI\'s row of the same algorithm, '
                     f'{", ".join(f"{a}/{b}" for a, b in COUNTERPARTS.items())}) '
                     f'batch {cfg.batch_size}, {cfg.image_size}x{cfg.image_size}, '
                     f'width {cfg.width}, {cfg.num_cells} cells, {cfg.device}, {cfg.dtype}'
                     f'{", channels_last" if cfg.channels_last else ""}{", compiled" if cfg.compile else ""}; '
                     f'median of {cfg.steps} steps after '
                     f'{cfg.warmup} warm-up')
    return '\n'.join(lines)


def progress_line(index: int, total: int, row: dict[str, Any]) -> str:
    """``[3/13] gdas: 1234.5 ms per step, activation 456.7 MB`` (or the row's error)."""
    if row.get('error'):
        return f'[{index}/{total}] {row["name"]}: error: {row["error"]}'
    return (f'[{index}/{total}] {row["name"]}: {1e3 * row["step_seconds"]:.1f} ms per step, '
            f'activation {row["activation_bytes"] / 2 ** 20:.1f} MB')


def _print_progress(index: int, total: int, row: dict[str, Any]) -> None:
    print(progress_line(index, total, row), file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='nni-darts bench', description='Activation memory, peak memory, time per search step and parameters of '
        'every strategy (ours and NNI\'s DARTS, GumbelDARTS, Proxyless) on the same supernet, batch and seed.')
    add = parser.add_argument
    add('--strategies', nargs='+', metavar='NAME', help='rows to run, space- or comma-separated (default: all; see --list)')
    add('--list', action='store_true', help='list the row names and exit')
    add('--width', type=int, default=16, help='initial channels C of the search network (16)')
    add('--cells', dest='num_cells', type=int, default=8, help='cells of the search network (8)')
    add('--paper', dest='preset', action='store_const', const='paper', default='quick',
        help='paper scale: batch 64, 5 timed steps after 2 warm-ups (default: quick, batch 8, 1 after 1)')
    add('--batch-size', type=int, help='batch of each of the two halves (quick 8, --paper 64)')
    add('--image-size', type=int, default=32, help='input height and width (32)')
    add('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    add('--dtype', default='float32', choices=list(PRECISION),
        help='float32, or autocast mixed precision (bfloat16; float16 with GradScaler, CUDA only)')
    add('--channels-last', action='store_true', help='channels_last memory format for the supernet and inputs')
    add('--compile', action='store_true',
        help='torch.compile the supernet forward (first_step_seconds in the JSON includes the compilation)')
    add('--steps', type=int, help='timed steps, median reported (quick 1, --paper 5)')
    add('--warmup', type=int, help='warm-up steps, where activations are counted (quick 1, --paper 2)')
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
    add('--quiet', action='store_true', help='no progress line per row (on stderr)')
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
    sizes = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in PRESETS[args.preset].items()}
    strategies = [n for a in args.strategies for n in a.split(',') if n] if args.strategies else None
    cfg = BenchConfig(strategies=strategies, width=args.width, num_cells=args.num_cells,
                      image_size=args.image_size, device=args.device, dtype=args.dtype,
                      channels_last=args.channels_last, compile=args.compile, **sizes, seed=args.seed,
                      isolate=args.isolate, max_batch=int(args.max_batch) if args.max_batch else None,
                      max_batch_metric=args.max_batch_metric, probe_batches=tuple(args.probe_batches),
                      prime=args.prime)
    try:
        rows = run_bench(cfg.check(), progress=None if args.quiet else _print_progress)
    except ValueError as err:
        print(f'nni-darts bench: error: {err}', file=sys.stderr)
        return 2
    report = {'config': asdict(cfg), 'torch': torch.__version__, 'rows': rows}
    if args.output:
        with open(args.output, 'w') as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1) if args.json else format_table(rows, cfg))
    return 1 if any(r.get('error') for r in rows) else 0


if __name__ == '__main__':  # the child process of --isolate
    sys.exit(bench_main())
