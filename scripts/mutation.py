"""A small mutation runner for the algorithm cores (issue #18): AST operator swaps on named functions.

    python scripts/mutation.py [--budget SECONDS] [--list] [TARGET ...]   # TARGET: a key of TARGETS (default: all)

For each target (a source file, its core functions and its own test files):

1. one child process runs the target's tests unmutated, recording which tests execute each core function (a profile
   hook on the functions' code objects) and how long each test takes; a failing baseline stops the target;
   (``slow`` tests included: they are the target's own);
2. every mutant of every core function (one operator swap or one deleted statement, see :func:`mutation_points`) runs
   in a forked child that swaps the function's ``__code__`` in place and runs, with ``-x``, only the tests that
   executed the function, fastest first. A failing test kills the mutant; passing tests let it survive; a child
   running past its timeout (4x the tests' baseline time + 20 s, counted in CPU seconds) is a timeout (found).

The parent imports torch, Lightning and NNI once, so a mutant costs only its tests. Mutants left when the target's
time budget (``--budget``, default 300 CPU seconds) runs out are reported as ``not run``. Results go to stdout and, as one line
per mutant, to ``$MUTATION_OUT/mutation-<target>.txt`` (default: a temporary folder). ``OMP_NUM_THREADS=1``.
"""
from __future__ import annotations

import __future__
import argparse
import ast
import copy
import inspect
import json
import os
import signal
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
S = 'nni_darts_variants.strategies'
T = 'tests/strategies'

#: target -> (module, core functions as ``name`` or ``Class.method``, test files)
TARGETS: dict[str, tuple[str, list[str], list[str]]] = {
    'darts': (f'{S}.darts', ['virtual_step', 'plain_sgd_problem', 'Darts.check_trainer',
                             'DartsLightning.unrolled_arch_gradients', 'DartsLightning.finite_difference_hvp'],
              [f'{T}/test_darts.py']),
    'genotype': ('nni_darts_variants.genotype', ['darts_rule'], ['tests/test_genotype_registry.py']),
    'gdas': (f'{S}.gdas', ['gumbel_noise', 'GumbelMaxEdge._probs', 'GumbelMaxEdge.op_weights', 'GumbelMaxEdge.forward',
                           'GumbelMaxEdge.resample', 'GumbelMaxInput._probs', 'GumbelMaxInput.resample',
                           'GumbelMaxInput.forward'], [f'{T}/test_gdas.py', 'tests/test_hub_spaces.py']),
    'proxyless': (f'{S}.proxyless', ['gate_to_alpha_gradient', 'rescale_sampled_alphas', 'ProxylessEdge._sample',
                                     'ProxylessEdge.cost_probs', 'ProxylessEdge.forward', 'prepare_arch_update',
                                     'finish_arch_update', 'ProxylessLightning.weight_step',
                                     'ProxylessLightning.arch_update_enabled'], [f'{T}/test_proxyless.py']),
    'parsec': (f'{S}.parsec', ['importance_weights', 'importance_weighted_backward',
                               'ParsecLightning.compute_arch_gradients', 'ParsecLightning._sample_loss',
                               'ParsecLightning.weight_backward'], [f'{T}/test_parsec.py']),
    'pcdarts': (f'{S}.pcdarts', ['channel_shuffle', 'PartialChannelEdge.forward', 'EdgeNormalizedNode.input_weights',
                                 'PCDartsLightning.edge_weights'], [f'{T}/test_pcdarts.py']),
    'merged_conv': ('nni_darts_variants.merged_conv', ['receptive_field_mask', 'linear_op_kernel',
                                                       'MergedConv.masked_kernel', 'MergedConv.mixed_depthwise_kernel',
                                                       'MergedConv.linear_kernel', 'MergedConv.forward'],
                    [f'{T}/test_merged_conv.py', f'{T}/test_mergenas.py']),
    'dropnas': (f'{S}.dropnas', ['sample_group_mask', 'kept_share', 'adjust_kept_alphas', 'partial_decay_loss',
                                 'DropNASLightning.masked_arch_step', 'DropNASLightning.partial_decay_step'],
                [f'{T}/test_dropnas.py']),
    'pdarts': (f'{S}.pdarts', ['drop_operations', 'limit_skip_connections'], [f'{T}/test_pdarts.py']),
}

_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
         ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv,
         ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And}
_NAME_SWAP = {'min': 'max', 'max': 'min', 'argmax': 'argmin', 'argmin': 'argmax', 'topk': 'topk'}


def _docstring(node: ast.AST) -> ast.AST | None:
    body = getattr(node, 'body', None)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def mutation_points(func: ast.FunctionDef) -> list[tuple[str, callable]]:
    """``[(description, apply)]`` in a fixed walk order; ``apply()`` mutates the node it was found on, in place.

    Operators: arithmetic, comparison and boolean swaps (:data:`_SWAP`), ``-x`` -> ``x``, ``not x`` -> ``not not x``, a number ``n`` ->
    ``n + 1``, ``True`` <-> ``False``, ``min``/``max`` and ``argmin``/``argmax`` swaps, and deleting one statement
    that is a call or an assignment to an attribute or a subscript (in-place effects).
    """
    points: list[tuple[str, callable]] = []
    skip = {id(n) for n in ast.walk(func.args)} | ({id(n) for n in ast.walk(func.returns)} if func.returns else set())
    doc = _docstring(func)
    for node in ast.walk(func):
        if id(node) in skip or node is doc:
            continue
        line = getattr(node, 'lineno', '?')
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _SWAP:
            new = _SWAP[type(node.op)]
            points.append((f'L{line} {type(node.op).__name__} -> {new.__name__}',
                           lambda n=node, new=new: setattr(n, 'op', new())))
        elif isinstance(node, ast.BoolOp):
            new = _SWAP[type(node.op)]
            points.append((f'L{line} {type(node.op).__name__} -> {new.__name__}',
                           lambda n=node, new=new: setattr(n, 'op', new())))
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                new = _SWAP[type(op)]
                points.append((f'L{line} {type(op).__name__} -> {new.__name__}',
                               lambda n=node, i=i, new=new: n.ops.__setitem__(i, new())))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            points.append((f'L{line} drop {type(node.op).__name__}',
                           lambda n=node: (setattr(n, 'op', ast.UAdd()) if isinstance(n.op, ast.USub)
                                           else setattr(n, 'operand', ast.UnaryOp(ast.Not(), n.operand)))))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            points.append((f'L{line} {node.value!r} -> {node.value + 1!r}',
                           lambda n=node: setattr(n, 'value', n.value + 1)))
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            points.append((f'L{line} {node.value} -> {not node.value}',
                           lambda n=node: setattr(n, 'value', not n.value)))
        elif isinstance(node, ast.Name) and node.id in _NAME_SWAP and node.id != 'topk':
            points.append((f'L{line} {node.id} -> {_NAME_SWAP[node.id]}',
                           lambda n=node: setattr(n, 'id', _NAME_SWAP[n.id])))
        elif isinstance(node, ast.Attribute) and node.attr in _NAME_SWAP and node.attr != 'topk':
            points.append((f'L{line} .{node.attr} -> .{_NAME_SWAP[node.attr]}',
                           lambda n=node: setattr(n, 'attr', _NAME_SWAP[n.attr])))
        for field in ('body', 'orelse', 'finalbody'):
            stmts = getattr(node, field, None)
            if not isinstance(stmts, list):
                continue
            for i, stmt in enumerate(stmts):
                deletable = (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)) or (
                    isinstance(stmt, (ast.Assign, ast.AugAssign)) and all(
                        isinstance(t, (ast.Attribute, ast.Subscript))
                        for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])))
                if deletable and stmt is not doc:
                    points.append((f'L{stmt.lineno} delete `{ast.unparse(stmt)[:60]}`',
                                   lambda s=stmts, i=i: s.__setitem__(i, ast.Pass())))
    return points


def find_def(tree: ast.Module, qualname: str) -> tuple[ast.FunctionDef, str | None]:
    *owner, name = qualname.split('.')
    scope = tree.body
    if owner:
        scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner[0]).body
    node = next((n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        raise SystemExit(f'mutation: no function {qualname} in the module; fix TARGETS in {__file__}')
    return node, owner[0] if owner else None


def live_function(module: types.ModuleType, qualname: str) -> types.FunctionType:
    *owner, name = qualname.split('.')
    obj = module.__dict__[name] if not owner else getattr(module, owner[0]).__dict__[name]
    obj = getattr(obj, 'fget', None) or getattr(obj, '__func__', None) or obj
    return inspect.unwrap(obj)


def compile_mutant(module: types.ModuleType, tree_def: ast.FunctionDef, owner: str | None) -> types.CodeType:
    func = copy.copy(tree_def)
    func.decorator_list = []
    body: list[ast.stmt] = [func]
    if owner:  # inside a class body, so that super() gets its __class__ cell as in the original
        body = [ast.ClassDef(name=owner, bases=[], keywords=[], body=[func], decorator_list=[], type_params=[])]
    tree = ast.fix_missing_locations(ast.Module(body=body, type_ignores=[]))
    flags = __future__.annotations.compiler_flag if module.__dict__.get('annotations') else 0
    code = compile(tree, module.__file__, 'exec', flags=flags, dont_inherit=True)
    namespace = dict(module.__dict__)
    exec(code, namespace)  # noqa: S102 (our own source, mutated)
    new = namespace[owner].__dict__[func.name] if owner else namespace[func.name]
    return new.__code__


def install(module: types.ModuleType, qualname: str, function: types.FunctionType, code: types.CodeType) -> None:
    """Swap ``function``'s code in place (every reference sees it); when a deleted statement took the only use of
    ``super()``'s ``__class__`` cell, put a new function with the remaining cells on the class instead."""
    if code.co_freevars == function.__code__.co_freevars:
        function.__code__ = code
        return
    cells = dict(zip(function.__code__.co_freevars, function.__closure__ or ()))
    new = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                             tuple(cells[name] for name in code.co_freevars))
    new.__kwdefaults__ = function.__kwdefaults__
    owner, name = qualname.split('.')
    cls = getattr(module, owner)
    original = cls.__dict__[name]
    wrapped = type(original)(new) if isinstance(original, (staticmethod, classmethod)) else new
    setattr(cls, name, property(wrapped, original.fset) if isinstance(original, property) else wrapped)


def run_pytest(args: list[str], log: Path) -> int:
    import pytest
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    return pytest.main(['-q', '-p', 'no:cacheprovider', '-m', 'not gpu', '-W', 'ignore', *args])


class _Coverage:
    """A pytest plugin: which tests execute which core code objects, and each test's duration."""

    def __init__(self, codes: dict[types.CodeType, str]):
        self.codes, self.current, self.hits, self.durations, self.failed = codes, None, {}, {}, []

    def profile(self, frame, event, arg):
        if event == 'call' and frame.f_code in self.codes and self.current:
            self.hits.setdefault(self.codes[frame.f_code], set()).add(self.current)

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid
        sys.setprofile(self.profile)

    def pytest_runtest_teardown(self, item):
        sys.setprofile(None)

    def pytest_runtest_logreport(self, report):
        if report.when == 'call':
            self.durations[report.nodeid] = report.duration
        if report.failed:
            self.failed.append(report.nodeid)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (``/proc``), so that timeouts hold on a loaded machine and
    across a ``SIGSTOP`` of the run."""
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def fork_and_wait(child, timeout: float) -> tuple[str, float]:
    """Run ``child()`` in a forked process; ``(status, CPU seconds)``, the status by exit code (0: survived, 1 or 2:
    killed), ``timeout`` past ``timeout`` CPU seconds (or 100x that in wall time, for a child that sleeps)."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            rc = child()
        except BaseException:  # noqa: BLE001 (the child must never return into the parent's code)
            rc = 99
        os._exit(int(rc))
    used = 0.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return ('survived' if code == 0 else 'killed' if code in (1, 2) else f'error rc={code}', used)
        try:
            used = cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            pass
        if used > timeout or time.monotonic() - start > 100 * timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return 'timeout', used
        time.sleep(0.1)


def run_target(key: str, budget: float, out: Path) -> dict[str, int]:
    import importlib
    module_name, functions, test_files = TARGETS[key]
    module = importlib.import_module(module_name)
    tree = ast.parse(Path(module.__file__).read_text())
    live = {q: live_function(module, q) for q in functions}
    cov_file = out / f'coverage-{key}.json'

    def baseline() -> int:
        plugin = _Coverage({f.__code__: q for q, f in live.items()})
        import pytest
        fd = os.open(out / f'baseline-{key}.log', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        rc = pytest.main(['-q', '-p', 'no:cacheprovider', '-m', 'not gpu', '-W', 'ignore', *test_files],
                         plugins=[plugin])
        cov_file.write_text(json.dumps({'hits': {q: sorted(t) for q, t in plugin.hits.items()},
                                        'durations': plugin.durations, 'failed': plugin.failed}))
        return rc

    status, took = fork_and_wait(baseline, 1800)
    if status != 'survived':
        print(f'{key}: baseline tests did not pass ({status}); see {out}/baseline-{key}.log', flush=True)
        return {'baseline failed': 1}
    cov = json.loads(cov_file.read_text())
    print(f'{key}: baseline {took:.1f} CPU s', flush=True)
    counts: dict[str, int] = {}
    spent = 0.0  # CPU seconds of the mutants' children
    with open(out / f'mutation-{key}.txt', 'w') as report:
        for qualname in functions:
            node, owner = find_def(tree, qualname)
            tests = sorted(cov['hits'].get(qualname, []), key=lambda t: cov['durations'].get(t, 0.0))
            for index, (description, _) in enumerate(mutation_points(node)):
                mutant_def = copy.deepcopy(node)
                mutation_points(mutant_def)[index][1]()
                label = f'{key} {qualname} #{index} {description}'
                if not tests:
                    status, took = 'no tests', 0.0
                elif spent > budget:
                    status, took = 'not run', 0.0
                else:
                    try:
                        code = compile_mutant(module, mutant_def, owner)
                    except (SyntaxError, ValueError, TypeError) as err:
                        status, took = f'invalid ({err})', 0.0
                    else:
                        timeout = 4 * sum(cov['durations'].get(t, 1.0) for t in tests) + 20

                        def child(code=code) -> int:
                            install(module, qualname, live[qualname], code)
                            return run_pytest(['-x', *tests], out / 'last-mutant.log')
                        status, took = fork_and_wait(child, timeout)
                        spent += took
                counts[status.split(' ')[0]] = counts.get(status.split(' ')[0], 0) + 1
                line = f'{label}: {status} ({took:.1f} CPU s)'
                report.write(line + '\n')
                report.flush()
                if status != 'killed':
                    print('  ' + line, flush=True)
    print(f'{key}: ' + ', '.join(f'{k} {v}' for k, v in sorted(counts.items())), flush=True)
    return counts


def preimport_tests(test_files: list[str]) -> None:
    """Import the test modules (and their conftest) in the parent under the names pytest gives them (rootdir-relative
    ``prepend`` import: the file's stem, its folder first on ``sys.path``), so that no forked child imports them."""
    import importlib
    for path in [REPO / 'tests' / 'conftest.py', *(REPO / f for f in test_files)]:
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            importlib.import_module(path.stem)
        except Exception as err:  # noqa: BLE001 (only a speed-up: the child imports it then)
            print(f'note: {path} not pre-imported ({type(err).__name__}: {err})', flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('targets', nargs='*', help=f'default: all of {", ".join(TARGETS)}')
    parser.add_argument('--budget', type=float, default=300.0, help='CPU seconds of mutants per target (default 300)')
    parser.add_argument('--list', action='store_true', help='list the mutants and exit')
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f'unknown target(s) {", ".join(unknown)}; choose from {", ".join(TARGETS)}')
    os.environ['OMP_NUM_THREADS'] = '1'
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    targets = args.targets or list(TARGETS)
    if args.list:
        import importlib
        for key in targets:
            module_name, functions, _ = TARGETS[key]
            tree = ast.parse(Path(importlib.util.find_spec(module_name).origin).read_text())
            for q in functions:
                for i, (d, _) in enumerate(mutation_points(find_def(tree, q)[0])):
                    print(f'{key} {q} #{i} {d}')
        return 0
    out = Path(os.environ.get('MUTATION_OUT') or tempfile.mkdtemp(prefix='mutation-'))
    out.mkdir(parents=True, exist_ok=True)
    import pytorch_lightning  # noqa: F401 (imported once here, so that each forked mutant pays only its tests)
    import nni  # noqa: F401
    import pytest  # noqa: F401
    import torch
    torch.set_num_threads(1)
    import nni_darts_variants  # noqa: F401
    preimport_tests([f for key in targets for f in TARGETS[key][2]])
    summary = {key: run_target(key, args.budget, out) for key in targets}
    lines = [f'{k}: ' + ', '.join(f'{s} {n}' for s, n in sorted(c.items())) for k, c in summary.items()]
    (out / 'mutation-summary.txt').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines) + f'\nper-mutant results: {out}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
