"""The registry and the strategy classes agree; listing needs no NNI; declared hooks replace lookups by name."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

from nni_darts_variants.registry import BUILTIN_STRATEGIES, get_strategy, list_strategies, register_strategy

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'nni_darts_variants'


@pytest.mark.parametrize('name', sorted(BUILTIN_STRATEGIES))
def test_registry_and_class_agree(name):
    module, description = BUILTIN_STRATEGIES[name]
    klass = get_strategy(name)
    assert klass.__module__ == module
    assert (klass.name, klass.description) == (name, description)
    assert list_strategies()[name] == description


def test_builtin_classes_do_not_repeat_name_or_description():
    """One source: the class files leave ``name`` and ``description`` to the registry."""
    for module, _ in BUILTIN_STRATEGIES.values():
        path = PACKAGE.parent / (module.replace('.', '/') + '.py')
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assigned = {t.id for stmt in node.body if isinstance(stmt, ast.Assign)
                            for t in stmt.targets if isinstance(t, ast.Name)}
                assert not assigned & {'name', 'description'}, f'{path.name}: {node.name} repeats the registry'


def test_a_class_contradicting_the_registry_is_refused():
    from nni_darts_variants.strategies.base import DartsVariant
    klass = type('Impostor', (DartsVariant,), {'__module__': BUILTIN_STRATEGIES['darts'][0], 'description': 'x'})
    with pytest.raises(ValueError, match='already registered'):
        register_strategy(klass)


def test_list_imports_no_nni():
    code = ('import sys; from nni_darts_variants.cli import main; main(["list"]); '
            'bad = sorted(m for m in sys.modules if m == "nni" or m.startswith(("nni.", "torch", "pytorch_lightning")));'
            'assert not bad, bad')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in BUILTIN_STRATEGIES:
        assert name in result.stdout


def test_no_getattr_on_strategy_hooks_outside_the_base():
    """Hooks are declared on ``DartsVariant``; nothing looks them up by name (``getattr``/``hasattr``)."""
    hooks = {'smoke_kwargs', 'quick_kwargs', 'full_step_kwargs', 'check_trainer', 'check_max_epochs',
             'trainer_max_epochs', 'required_max_epochs', 'schedule_epochs', 'total_epochs'}
    offenders = []
    for path in PACKAGE.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ('getattr', 'hasattr') and len(node.args) >= 2
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in hooks):
                offenders.append(f'{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.func.id} {node.args[1].value}')
    assert not offenders, offenders


def test_no_variant_defines_training_step():
    for module, _ in BUILTIN_STRATEGIES.values():
        path = PACKAGE.parent / (module.replace('.', '/') + '.py')
        names = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        assert 'training_step' not in names, path.name


@pytest.mark.parametrize('name', sorted(BUILTIN_STRATEGIES))
def test_check_trainer_builds_nothing_and_accepts_the_defaults(name):
    klass = get_strategy(name)
    required = klass.trainer_max_epochs()
    klass.check_trainer(required if required is not None else 7)
    if required is not None:
        with pytest.raises(ValueError, match=f'max_epochs to {required}'):
            klass.check_trainer(required + 1)


def test_pdarts_check_trainer_counts_the_stages():
    klass = get_strategy('pdarts')
    klass.check_trainer(3 * 25)  # paper: 3 stages of 25 epochs
    klass.check_trainer(2 * 4, stage_cells=(5, 8), num_to_keep=(3, 1), skip_dropout=(0.1, 0.2), epochs_per_stage=4)
    with pytest.raises(ValueError, match='max_epochs to 8'):
        klass.check_trainer(9, stage_cells=(5, 8), epochs_per_stage=4)
