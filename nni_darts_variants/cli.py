"""``nni-darts``: a thin command line over the library.

``nni-darts search CONFIG.yaml [--set key=value ...]``, ``nni-darts list``, ``nni-darts retrain ...``.
``--help`` and ``list`` do not import NNI, torch or Lightning.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Sequence

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='nni-darts',
        description='Differentiable architecture search (DARTS and its memory-efficient variants) on NNI 3.0.')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks and debug logs')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')

    search = sub.add_parser('search', help='run a search from a YAML config',
                            description='Run one search; the run folder gets the genotype, the NNI sample, alphas '
                                        'and metrics.')
    search.add_argument('config', nargs='?', help='YAML config (see experiments/); optional with --resume')
    search.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config value, e.g. --set train.max_epochs=5 --set strategy.args.order=2')
    search.add_argument('--output', '-o', help='run folder (default: output.dir or runs/<strategy>-<space>-...)')
    search.add_argument('--overwrite', action='store_true', help='replace a finished run in the run folder')
    search.add_argument('--resume', metavar='RUN_DIR',
                        help='continue an interrupted search from its last checkpoint (config: the run\'s own)')

    sub.add_parser('list', help='list strategies and search spaces')

    bench = sub.add_parser('bench', add_help=False,
                           help='memory and speed of one search step of every strategy and of NNI\'s built-ins '
                                '(nni-darts bench --help for its options)')
    bench.add_argument('bench_args', nargs=argparse.REMAINDER)

    retrain = sub.add_parser('retrain', help='retrain a found architecture from scratch (pytorch-ignite)',
                             description='Retrain a genotype (JSON, NNI sample JSON, run folder, or a preset name '
                                         'such as DARTS_V2) with the DARTS evaluation protocol.')
    retrain.add_argument('target', help='genotype.json, sample.json, a run folder, or a preset name')
    retrain.add_argument('config', nargs='?', help='retrain recipe YAML (see experiments/retrain/)')
    retrain.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    retrain.add_argument('--output', '-o', help='output folder')
    retrain.add_argument('--resume', action='store_true', help='continue from the last checkpoint in the output folder')
    return parser


def _cmd_list() -> int:
    from .registry import list_spaces, list_strategies
    print('strategies:')
    for name, desc in list_strategies().items():
        print(f'  {name:<10} {desc}')
    print('search spaces:')
    for name, desc in list_spaces().items():
        print(f'  {name:<10} {desc}')
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from .search import SearchInterrupted, run_search
    if args.config is None and args.resume is None:
        raise ValueError('give a CONFIG.yaml (or --resume RUN_DIR)')
    try:
        result = run_search(args.config, args.overrides, output=args.output, overwrite=args.overwrite,
                            resume=args.resume)
    except SearchInterrupted as stop:  # SIGTERM / Ctrl-C: a checkpoint was written (search/interrupt.py)
        print(f'nni-darts search: {stop}', file=sys.stderr)
        return stop.exit_code
    print(f'architecture: {result.genotype if result.genotype is not None else result.sample}')
    nb201 = result.metrics.get('nb201')
    if nb201:
        print(f'NAS-Bench-201 cell: {nb201["arch"]}, CIFAR-10 test accuracy {nb201["cifar10_test"]} (table: '
              f'{nb201["table"]}, percentile {nb201["percentile"]})')
    evaluation = result.metrics.get('evaluate')
    if evaluation:
        print(f'retrained from scratch: test accuracy {evaluation["test_acc"]:.4f} '
              f'({evaluation["params"]} parameters)')
    print(f'files: {result.run_dir.resolve()} (genotype.json, sample.json, alphas.json, alpha_history.json, '
          f'metrics/)')
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_main
    return bench_main(list(args.bench_args))


def _cmd_retrain(args: argparse.Namespace) -> int:
    from .retrain import run_retrain
    summary = run_retrain(args.target, args.config, args.overrides, output=args.output, resume=args.resume)
    for key, value in summary.items():
        print(f'{key}: {value}')
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['bench']:  # the benchmark parses its own options (``nni-darts bench --help``)
        warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')
        from .bench import bench_main
        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format='%(levelname)s %(message)s')
    # NNI 3.0 warns about every torch class it does not know at import; harmless with current torch.
    warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')
    if args.command is None:
        parser.print_help()
        return 2
    commands = {'list': lambda: _cmd_list(), 'search': lambda: _cmd_search(args),
                'retrain': lambda: _cmd_retrain(args), 'bench': lambda: _cmd_bench(args)}
    try:
        return commands[args.command]()
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f'nni-darts {args.command}: error: {message}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'nni-darts {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
