"""What ``nni-darts show`` and ``nni-darts list`` print: a search run folder, and the registry's contents.

Nothing here imports NNI or torch: a run folder is read from its JSON/YAML files, and the registry's strategy
arguments, genotype presets and datasets are read from the source of their modules (:mod:`ast`), so ``nni-darts
list`` stays instant. ``tests/test_cli.py`` checks the source reading against ``inspect.signature`` of the imported
classes.
"""
from __future__ import annotations

import ast
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ['RunFolder', 'load_run', 'describe_run', 'strategy_arguments', 'preset_names', 'dataset_descriptions',
           'FIGURE_SUFFIXES']

#: File types of the bundle's figures that ``show`` lists.
FIGURE_SUFFIXES = ('.png', '.svg', '.pdf', '.dot')


# ------------------------------------------------------------------------------------------------- run folders
@dataclass
class RunFolder:
    """The files of a search run folder, parsed (``None`` where a file is missing)."""
    path: Path
    config: dict[str, Any]
    result: dict[str, Any] | None = None
    genotype: dict[str, Any] | None = None
    sample: dict[str, Any] | None = None
    nb201: dict[str, Any] | None = None
    bundle: dict[str, Any] | None = None
    figures: list[Path] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return (self.result or {}).get('metrics', {})

    @property
    def space(self) -> str:
        return str(self.config.get('space', {}).get('name', '?'))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f'{path}: not valid JSON ({err.msg} at line {err.lineno}); fix or delete the file') from None


def load_run(run_dir: str | Path) -> RunFolder:
    """Read a search run folder; a folder that is none is a one-line ``ValueError`` saying what to give."""
    import yaml
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f'{path} is not a folder; give the run folder of a search (nni-darts search -o RUN_DIR)')
    config_file = path / 'config.yaml'
    if not config_file.is_file():
        raise ValueError(f'{path} is not a search run folder (no config.yaml); give the folder nni-darts search '
                         'wrote')
    try:
        config = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f'{config_file}: not valid YAML ({str(err).splitlines()[0]}); fix the file') from None
    bundle_dir = path / 'bundle'
    figures = sorted(p for p in bundle_dir.iterdir() if p.suffix in FIGURE_SUFFIXES) if bundle_dir.is_dir() else []
    return RunFolder(path=path, config=config, result=_read_json(path / 'result.json'),
                     genotype=_read_json(path / 'genotype.json'), sample=_read_json(path / 'sample.json'),
                     nb201=_read_json(path / 'nb201.json'), bundle=_read_json(bundle_dir / 'summary.json'),
                     figures=figures)


def _cell_line(pairs: list) -> str:
    return ', '.join(f'{op}<-{j}' for op, j in pairs)


def _architecture_lines(run: RunFolder) -> list[str]:
    if run.genotype is not None:
        return [f'  normal cell: {_cell_line(run.genotype["normal"])} (concat {run.genotype["normal_concat"]})',
                f'  reduce cell: {_cell_line(run.genotype["reduce"])} (concat {run.genotype["reduce_concat"]})']
    if run.nb201 is not None:
        return [f'  NAS-Bench-201 cell: {run.nb201["arch"]}']
    if run.sample is not None:
        return [f'  {label}: {value}' for label, value in run.sample.items()]
    return ['  (none yet: the search has not finished)']


def _percent(value: Any) -> str:
    return 'n/a' if value is None else f'{100 * float(value):.2f} %'


def _metric_lines(run: RunFolder) -> list[str]:
    metrics = run.metrics
    lines = [f'  supernet accuracy (architecture half; do not rank cells by it): '
             f'{_percent(metrics.get("supernet_val_acc"))}']
    evaluation = metrics.get('evaluate')
    if evaluation:
        lines.append(f'  retrained from scratch (evaluate.epochs): test accuracy {_percent(evaluation.get("test_acc"))}'
                     f', {evaluation.get("params")} parameters')
    nb201 = metrics.get('nb201') or run.nb201
    if nb201:
        table = nb201.get('cifar10_test')
        lines.append(f'  NAS-Bench-201 table: CIFAR-10 test accuracy '
                     f'{"n/a" if table is None else f"{float(table):.2f} %"} (percentile {nb201.get("percentile")})')
    if 'search_seconds' in metrics:
        lines.append(f'  search time: {metrics["search_seconds"]} s')
    return lines


def describe_run(run_dir: str | Path) -> str:
    """The text ``nni-darts show RUN_DIR`` prints: strategy and space, architecture, final metrics, figures."""
    run = load_run(run_dir)
    cfg = run.config
    status = 'finished' if run.result is not None else 'not finished (no result.json)'
    lines = [f'run folder: {run.path.resolve()} ({status})',
             f'strategy: {cfg.get("strategy", {}).get("name")} {cfg.get("strategy", {}).get("args") or ""}'.rstrip(),
             f'space: {run.space} {cfg.get("space", {}).get("args") or ""}'.rstrip(),
             f'data: {cfg.get("data", {}).get("name")}, seed {cfg.get("seed")}, '
             f'{cfg.get("train", {}).get("max_epochs")} epochs',
             'architecture:', *_architecture_lines(run), 'metrics:', *_metric_lines(run)]
    if run.figures:
        lines.append(f'figures ({run.path.resolve() / "bundle"}):')
        lines += [f'  {p.name}' for p in run.figures]
    else:
        lines.append(f'figures: none (draw them with: nni-darts bundle {run.path})')
    if run.bundle and run.bundle.get('retrain_command'):
        lines.append(f'retrain: {run.bundle["retrain_command"]}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- the registry, read from source
def _module_file(module: str) -> Path:
    """The source file of ``module`` inside this project, found without importing it (nor its parent packages,
    which may import torch)."""
    top, *rest = module.split('.')
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise ValueError(f'cannot find the package {top!r}')
    base = Path(spec.origin).parent.joinpath(*rest)
    return base / '__init__.py' if base.is_dir() else base.with_suffix('.py')


def _parse(module: str) -> ast.Module:
    return ast.parse(_module_file(module).read_text())


def _top_level_value(tree: ast.Module, name: str) -> ast.expr:
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node.value
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value
    raise ValueError(f'no top-level {name} found')


def _is_register(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Name) and target.id == 'register_strategy'


def _registered_class(tree: ast.Module) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(_is_register(d) for d in node.decorator_list):
            return node
    raise ValueError('no class decorated with @register_strategy')


def _class_in(tree: ast.Module, module: str, name: str) -> tuple[ast.ClassDef, str] | None:
    """The class ``name`` as seen from ``module``: defined there, or imported relatively from a sibling."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node, module
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level and any(a.name == name for a in node.names):
            package = module.rsplit('.', node.level)[0]
            source = f'{package}.{node.module}' if node.module else package
            return _class_in(_parse(source), source, name)
    return None


def _init_arguments(klass: ast.ClassDef) -> tuple[dict[str, str], bool]:
    """``{argument: default source}`` of a class's ``__init__`` (``'required'`` without default) and whether it
    takes ``**kwargs``."""
    init = next((n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == '__init__'), None)
    if init is None:
        return {}, True
    args: dict[str, str] = {}
    positional = init.args.posonlyargs + init.args.args
    defaults = [None] * (len(positional) - len(init.args.defaults)) + list(init.args.defaults)
    for arg, default in [*zip(positional, defaults), *zip(init.args.kwonlyargs, init.args.kw_defaults)]:
        if arg.arg != 'self':
            args[arg.arg] = 'required' if default is None else ast.unparse(default)
    return args, init.args.kwarg is not None


def strategy_arguments(module: str) -> dict[str, str]:
    """Every keyword argument of the strategy registered in ``module``, with its default as written in the source.

    Like :func:`nni_darts_variants.registry.strategy_parameters`, a class's own ``__init__`` comes first, and its
    bases' are followed through ``**kwargs`` (a default the subclass restates wins).
    """
    tree = _parse(module)
    klass, where = _registered_class(tree), module
    result: dict[str, str] = {}
    while True:
        own, more = _init_arguments(klass)
        for key, value in own.items():
            result.setdefault(key, value)
        if not more or not klass.bases or not isinstance(klass.bases[0], ast.Name):
            return result
        found = _class_in(_parse(where), where, klass.bases[0].id)
        if found is None:  # a base outside this project (NNI's): not followed
            return result
        klass, where = found


def preset_names() -> dict[str, list[str]]:
    """``{published genotype: its aliases}`` of :mod:`nni_darts_variants.retrain.presets`."""
    tree = _parse('nni_darts_variants.retrain.presets')
    names = {ast.literal_eval(k): [] for k in _top_level_value(tree, 'PRESETS').keys}
    aliases = ast.literal_eval(_top_level_value(tree, '_ALIASES'))
    for alias, name in aliases.items():
        names.setdefault(name, []).append(alias)
    return names


def dataset_descriptions() -> dict[str, str]:
    """``{dataset: description}`` of the search datasets (:data:`nni_darts_variants.data.DATASETS`)."""
    table = _top_level_value(_parse('nni_darts_variants.data'), 'DATASETS')
    return {ast.literal_eval(k): ast.literal_eval(v.elts[1]) for k, v in zip(table.keys, table.values)}
