"""``nni-darts``: a thin command line over the library.

``nni-darts search CONFIG.yaml [--set key=value ...]``, ``list``, ``show RUN_DIR``, ``export RUN_DIR --format ...``,
``bundle RUN_DIR``, ``retrain ...``, ``bench ...``. ``--help``, ``--version``, ``list`` and ``show`` do not import
NNI, torch or Lightning. ``--debug`` and ``--verbose`` go before or after the command.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from collections.abc import Sequence
from typing import Any

__all__ = ['build_parser', 'main']

#: ``--device`` values: shortcuts for ``train.accelerator`` (Lightning's names).
DEVICES = ('cpu', 'cuda', 'auto')
#: ``export --format`` values (kept equal to ``export.FORMATS`` by a test; listed here so ``--help`` stays light).
EXPORT_FORMATS = ('genotype', 'nni', 'nb201', 'onnx', 'torchscript')


def _add_log_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--debug`` / ``--verbose``; on a command their default is ``SUPPRESS``, so they keep a value given before it."""
    parser.add_argument('--debug', action='store_true', default=default, help='show full tracebacks and debug logs')
    parser.add_argument('--verbose', '-v', action='store_true', default=default,
                        help='show NNI\'s and Lightning\'s log lines too')


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog='nni-darts',
        description='Differentiable architecture search (DARTS and its memory-efficient variants) on NNI 3.0.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    _add_log_flags(parser, False)
    common = argparse.ArgumentParser(add_help=False)
    _add_log_flags(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')

    search = sub.add_parser('search', help='run a search from a YAML config', parents=[common],
                            description='Run one search; the run folder gets the genotype, the NNI sample, alphas '
                                        'and metrics.')
    search.add_argument('config', nargs='?', help='YAML config (see experiments/); optional with --resume')
    search.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config value, e.g. --set train.max_epochs=5 --set strategy.args.order=2')
    search.add_argument('--output', '-o', help='run folder (default: output.dir or runs/<strategy>-<space>-...)')
    search.add_argument('--overwrite', action='store_true', help='replace a finished run in the run folder')
    search.add_argument('--resume', metavar='RUN_DIR',
                        help='continue an interrupted search from its last checkpoint (config: the run\'s own)')
    search.add_argument('--device', choices=DEVICES, help='shortcut for --set train.accelerator=...')
    search.add_argument('--seed', type=int, help='shortcut for --set seed=N')
    search.add_argument('--print-config', action='store_true',
                        help='print the resolved config (every key, defaults filled) as YAML and exit')
    search.add_argument('--dry-run', action='store_true',
                        help='resolve and check everything, build the data, space and strategy, write nothing')

    sub.add_parser('list', parents=[common],
                   help='list datasets, genotype presets, search spaces and strategies with their arguments')

    show = sub.add_parser('show', parents=[common], help='print a run folder\'s architecture, metrics and figures')
    show.add_argument('run_dir', metavar='RUN_DIR')

    export = sub.add_parser('export', parents=[common], help='write a run\'s architecture or network as a file',
                            description='genotype: DARTS genotype JSON; nni: the NNI sample (what freeze takes); '
                                        'nb201: the NAS-Bench-201 string; onnx / torchscript: the frozen network '
                                        '(the retrain network of a DARTS genotype, else freeze(sample)).')
    export.add_argument('run_dir', metavar='RUN_DIR')
    export.add_argument('--format', '-f', required=True, choices=EXPORT_FORMATS)
    export.add_argument('--output', '-o', metavar='FILE',
                        help='file to write (default: text formats to stdout, networks to RUN_DIR/export/)')
    export.add_argument('--recipe', metavar='RECIPE.yml',
                        help='retrain recipe that shapes the network of a DARTS genotype (default: DARTS CIFAR-10)')

    bundle = sub.add_parser('bundle', parents=[common], help='redraw the figures of a run folder (RUN_DIR/bundle/)')
    bundle.add_argument('run_dir', metavar='RUN_DIR')

    bench = sub.add_parser('bench', add_help=False,
                           help='memory and speed of one search step of every strategy and of NNI\'s built-ins '
                                '(nni-darts bench --help for its options)')
    bench.add_argument('bench_args', nargs=argparse.REMAINDER)

    retrain = sub.add_parser('retrain', help='retrain a found architecture from scratch (pytorch-ignite)',
                             parents=[common],
                             description='Retrain a genotype (JSON, NNI sample JSON, run folder, or a preset name '
                                         'such as DARTS_V2) with the DARTS evaluation protocol, or the frozen '
                                         'network of a ProxylessNAS, NAS-Bench-201 or NNI hub-space run folder '
                                         '(recipes: experiments/retrain/<space>-<dataset>.yml).')
    retrain.add_argument('target', help='genotype.json, sample.json, a run folder, or a preset name')
    retrain.add_argument('config', nargs='?', help='retrain recipe YAML (see experiments/retrain/)')
    retrain.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    retrain.add_argument('--output', '-o', help='output folder')
    retrain.add_argument('--resume', action='store_true', help='continue from the last checkpoint in the output folder')
    return parser


def _cmd_list() -> int:
    from .registry import BUILTIN_STRATEGIES, list_spaces, list_strategies
    from .show import dataset_descriptions, preset_names, strategy_arguments
    print('datasets: (data.name)')
    for name, desc in dataset_descriptions().items():
        print(f'  {name:<12} {desc}')
    print('search spaces: (space.name)')
    for name, desc in list_spaces().items():
        print(f'  {name:<12} {desc}')
    print('genotype presets: (nni-darts retrain NAME)')
    for name, aliases in preset_names().items():
        print(f'  {name:<15}' + (f' (also {", ".join(aliases)})' if aliases else ''))
    print('strategies: (strategy.name; strategy.args with their defaults)')
    for name, desc in list_strategies().items():
        print(f'  {name:<12} {desc}')
        if name in BUILTIN_STRATEGIES:
            arguments = strategy_arguments(BUILTIN_STRATEGIES[name][0])
            print('      ' + ', '.join(f'{key}={value}' for key, value in arguments.items()))
    return 0


def _search_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then the ``--device`` / ``--seed`` shortcuts (which win)."""
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.append(f'train.accelerator={args.device}')
    if args.seed is not None:
        overrides.append(f'seed={args.seed}')
    return overrides


def _cmd_search(args: argparse.Namespace) -> int:
    from .search import SearchInterrupted, run_search
    if args.config is None and args.resume is None:
        raise ValueError('give a CONFIG.yaml (or --resume RUN_DIR)')
    if args.print_config and args.dry_run:
        raise ValueError('--print-config and --dry-run are exclusive; give one of them')
    overrides = _search_overrides(args)
    if args.print_config:
        import yaml

        from .search import resolve_config
        config = args.config if args.config is not None else str(Path(args.resume) / 'config.yaml')
        print(yaml.safe_dump(resolve_config(config, overrides), sort_keys=False), end='')
        return 0
    if args.dry_run:
        from .search.runner import check_search
        run_dir = check_search(args.config, overrides, output=args.output, overwrite=args.overwrite,
                               resume=args.resume)
        print(f'dry run: the config, data, space and strategy are fine; the run would write {run_dir}')
        return 0
    try:
        result = run_search(args.config, overrides, output=args.output, overwrite=args.overwrite,
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
    files = [name for name in ('genotype.json', 'sample.json', 'nb201.json', 'alphas.json', 'alpha_history.json',
                               'metrics', 'bundle') if (result.run_dir / name).exists()]
    print(f'files: {result.run_dir.resolve()} ({", ".join(files)}); nni-darts show {result.run_dir} sums them up')
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from .show import describe_run
    print(describe_run(args.run_dir))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run
    result = export_run(args.run_dir, args.format, output=args.output, recipe=args.recipe)
    if isinstance(result, str):
        print(result, end='')
    else:
        print(f'wrote {result}')
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from .export import redraw_bundle
    summary = redraw_bundle(args.run_dir)
    print(f'bundle: {Path(args.run_dir) / "bundle"} ({len(summary["files"])} files)')
    for error in summary['errors']:
        print(f'  could not make {error}', file=sys.stderr)
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
        from .logs import configure_logging
        configure_logging(frameworks='--help' not in argv and '-h' not in argv)  # Lightning's per-Trainer banners
        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .logs import configure_logging
    configure_logging(verbose=args.verbose, debug=args.debug, frameworks=args.command in ('search', 'retrain', 'export', 'bundle'))
    if args.command is None:
        parser.print_help()
        return 2
    commands = {'list': lambda: _cmd_list(), 'search': lambda: _cmd_search(args),
                'retrain': lambda: _cmd_retrain(args), 'bench': lambda: _cmd_bench(args),
                'show': lambda: _cmd_show(args), 'export': lambda: _cmd_export(args),
                'bundle': lambda: _cmd_bundle(args)}
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
