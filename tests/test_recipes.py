"""Recipes are deltas: ``base:`` inheritance, and every search recipe still resolves to the settings it had.

``tests/data/resolved_recipes.json`` was frozen from the full-copy recipes, before they became deltas. Each recipe's
*effective* settings (the resolved config, with the strategy's and the space's constructor defaults filled in) must
equal that expectation on every key the expectation has. Keys added to the schema later may appear, with their
defaults. Intended changes are listed in ``CHANGED`` with their reason.

Regenerate only for an intended change: ``python tests/test_recipes.py --freeze`` (and say why in the commit).
"""
from __future__ import annotations

import copy
import inspect
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / 'experiments'
FROZEN = Path(__file__).resolve().parent / 'data' / 'resolved_recipes.json'

#: recipe -> {dotted key: (value before, value now, why)}: the intended differences from the frozen expectation.
_GDAS_CELLS = (8, 6, 'the official GDAS search network has N=2 cells per stage: 6 cells, reductions at 2 and 4')
_PROXYLESS_NO_CLIP = (5.0, None, 'the official ProxylessNAS loop does not clip the weight gradient (issue #15)')
CHANGED: dict[str, dict[str, tuple]] = {
    'experiments/cifar10/search/gdas.yml': {'space.args.num_cells': _GDAS_CELLS},
    'experiments/imagenet/search/gdas.yml': {'space.args.num_cells': _GDAS_CELLS},
    'experiments/imagenet/search/dropnas.yml': {
        'data.train_portion': (0.5, 0.9, 'inherited from the CIFAR-10 recipe; unused: data.subset picks both halves')},
    **{f'experiments/{kind}/search/proxyless.yml': {'strategy.args.gradient_clip_val': _PROXYLESS_NO_CLIP}
       for kind in ('cifar10', 'imagenet', 'smoke')},
}


def search_recipes() -> list[Path]:
    """Every search recipe: ``experiments/*/search/*.yml`` and the quick-start recipes."""
    found = sorted(EXPERIMENTS.glob('*/search/*.yml')) + sorted((EXPERIMENTS / 'quickstart').glob('*.yml'))
    return found


def _defaults(init) -> dict:
    return {k: p.default for k, p in inspect.signature(init).parameters.items()
            if k != 'self' and p.default is not inspect.Parameter.empty}


def effective(cfg: dict) -> dict:
    """The resolved config with the constructor defaults of its strategy and space filled in (JSON-normalised)."""
    from nni_darts_variants.registry import get_space, get_strategy, strategy_parameters
    cfg = copy.deepcopy(cfg)
    params = strategy_parameters(get_strategy(cfg['strategy']['name']))
    args = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    cfg['strategy']['args'] = {**args, **cfg['strategy']['args']}
    space = get_space(cfg['space']['name'])
    init = getattr(space, '_init_wrapped', None) or space.__init__
    cfg['space']['args'] = {**_defaults(init), **cfg['space']['args']}
    return json.loads(json.dumps(cfg, default=lambda value: list(value) if isinstance(value, tuple) else repr(value)))


def _resolve(path: Path) -> dict:
    from nni_darts_variants.search import resolve_config
    return effective(resolve_config(path))


def _flat(tree: dict, prefix: str = '') -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def _frozen() -> dict:
    if not FROZEN.is_file():
        pytest.skip(f'{FROZEN} missing')
    return json.loads(FROZEN.read_text())


@pytest.mark.parametrize('recipe', search_recipes(), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_recipe_resolves_to_its_frozen_settings(recipe):
    key = str(recipe.relative_to(REPO))
    frozen = _frozen()
    if key not in frozen:
        pytest.skip(f'{key} is newer than the frozen expectation')
    expected, actual = _flat(frozen[key]), _flat(_resolve(recipe))
    changed = CHANGED.get(key, {})
    for dotted, value in expected.items():
        if dotted in changed:
            before, now, _why = changed[dotted]
            assert value == before and actual.get(dotted) == now, f'{key}: {dotted}'
            continue
        assert dotted in actual, f'{key}: {dotted} vanished'
        assert actual[dotted] == value, f'{key}: {dotted} is {actual[dotted]!r}, was {value!r}'


def test_every_frozen_recipe_still_exists():
    missing = [key for key in _frozen() if not (REPO / key).is_file()]
    assert not missing, f'recipes removed without updating the frozen expectation: {missing}'


def test_recipes_hold_only_deltas():
    """No search recipe repeats a value it inherits (its base or the defaults) — the point of ``base:``."""
    from nni_darts_variants.config import load_yaml
    for recipe in search_recipes():
        raw = load_yaml(recipe, resolve_base=False)
        bases = raw.pop('base', None)
        if bases is None:
            continue
        inherited = {}
        for base in [bases] if isinstance(bases, str) else bases:
            inherited.update(_flat(load_yaml(recipe.parent / base)))
        own = _flat(raw)
        repeated = sorted(k for k, v in own.items() if k in inherited and inherited[k] == v)
        assert not repeated, f'{recipe.relative_to(REPO)} repeats inherited values: {repeated}'


if __name__ == '__main__' and '--freeze' in sys.argv:
    sys.path.insert(0, str(REPO))
    result = {str(p.relative_to(REPO)): _resolve(p) for p in search_recipes()}
    FROZEN.write_text(json.dumps(result, indent=1, sort_keys=True) + '\n')
    print(f'froze {len(result)} recipes into {FROZEN}')


def test_base_chain_merges_in_order(tmp_path):
    from nni_darts_variants.config import load_yaml
    (tmp_path / 'a.yml').write_text('train: {max_epochs: 3, learning_rate: 0.1}\nseed: 1\n')
    (tmp_path / 'b.yml').write_text('base: a.yml\ntrain: {max_epochs: 4}\n')
    (tmp_path / 'c.yml').write_text('seed: 9\n')
    (tmp_path / 'd.yml').write_text('base: [b.yml, c.yml]\ntrain: {learning_rate: 0.2}\n')
    assert load_yaml(tmp_path / 'd.yml') == {'seed': 9, 'train': {'max_epochs': 4, 'learning_rate': 0.2}}
    assert load_yaml(tmp_path / 'd.yml', resolve_base=False)['base'] == ['b.yml', 'c.yml']


@pytest.mark.parametrize('files, message', [
    ({'x.yml': 'base: y.yml\n', 'y.yml': 'base: x.yml\n'}, 'form a loop'),
    ({'x.yml': 'base: missing.yml\n'}, 'base file missing.yml not found'),
    ({'x.yml': 'base: {a: 1}\n'}, 'base must be a path or a list of paths'),
    ({'x.yml': 'base: y.yml\n', 'y.yml': 'seed: [1\n'}, 'malformed YAML'),
])
def test_bad_base_is_one_line_error(tmp_path, files, message):
    from nni_darts_variants.config import ConfigError, load_yaml
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_yaml(tmp_path / 'x.yml')
    assert '\n' not in str(err.value)


# ----- recipes as package data -----
def _repo_recipe_names() -> list[str]:
    return sorted(p.relative_to(EXPERIMENTS).as_posix() for p in EXPERIMENTS.rglob('*.yml'))


def test_checkout_recipe_root_is_the_experiments_folder():
    from nni_darts_variants.config import recipe_names, recipe_root
    assert recipe_root() == EXPERIMENTS  # PYTHONPATH checkout: no built package data
    assert recipe_names() == _repo_recipe_names()
    assert recipe_names('retrain') == sorted(f'retrain/{p.name}' for p in (EXPERIMENTS / 'retrain').glob('*.yml'))


def test_recipe_name_resolves_from_any_folder(tmp_path):
    """The tests run in a temporary folder: ``cifar10/search/darts-1st.yml`` is not a file there, so it is the
    shipped recipe, with or without the README's ``experiments/`` prefix; a local file of that name wins."""
    from nni_darts_variants.config import find_recipe, load_yaml
    assert Path.cwd() == tmp_path
    expected = EXPERIMENTS / 'cifar10' / 'search' / 'darts-1st.yml'
    assert find_recipe('cifar10/search/darts-1st.yml') == expected
    assert find_recipe('experiments/cifar10/search/darts-1st.yml') == expected
    assert load_yaml('cifar10/search/darts-1st.yml') == load_yaml(expected)
    (tmp_path / 'cifar10' / 'search').mkdir(parents=True)
    (tmp_path / 'cifar10' / 'search' / 'darts-1st.yml').write_text('seed: 5\n')
    assert load_yaml('cifar10/search/darts-1st.yml') == {'seed': 5}


@pytest.mark.parametrize('name, hint', [('cifar10/search/drats-1st.yml', 'did you mean the recipe '
                                         'cifar10/search/darts-1st.yml'), ('no/such.yml', 'neither as a path'),
                                        ('../experiments/cifar10/search/darts-1st.yml', 'neither as a path')])
def test_unknown_recipe_name_is_one_line_error(name, hint):
    from nni_darts_variants.config import ConfigError, load_yaml
    with pytest.raises(ConfigError, match=hint) as err:
        load_yaml(name)
    assert '\n' not in str(err.value) and 'such as cifar10/search/darts-1st.yml' in str(err.value)


def test_search_and_retrain_take_recipe_names():
    from nni_darts_variants.retrain import resolve_config as retrain_config
    from nni_darts_variants.search import resolve_config
    assert resolve_config('imagenet/search/pcdarts.yml') == resolve_config(EXPERIMENTS / 'imagenet/search/pcdarts.yml')
    assert retrain_config('experiments/retrain/pcdarts-imagenet.yml') == \
        retrain_config(EXPERIMENTS / 'retrain' / 'pcdarts-imagenet.yml')


def test_installed_package_data_is_preferred(tmp_path, monkeypatch):
    """Where the package carries ``recipes/`` (an installed wheel), names and ``base:`` chains resolve there."""
    from nni_darts_variants import config
    package = tmp_path / 'site' / 'nni_darts_variants'
    (package / 'recipes' / 'common').mkdir(parents=True)
    (package / 'recipes' / 'x' / 'search').mkdir(parents=True)
    (package / 'recipes' / 'common' / 'c.yml').write_text('train: {max_epochs: 7}\nseed: 2\n')
    (package / 'recipes' / 'x' / 'search' / 'r.yml').write_text('base: ../../common/c.yml\nseed: 3\n')
    monkeypatch.setattr(config, 'package_files', lambda name: package if name == 'nni_darts_variants' else None)
    assert config.recipe_root() == package / 'recipes'
    assert config.recipe_names() == ['common/c.yml', 'x/search/r.yml']
    assert config.load_yaml('x/search/r.yml') == {'train': {'max_epochs': 7}, 'seed': 3}


def test_setup_maps_experiments_to_the_recipes_package(monkeypatch):
    """setup.py's discovery: every code package (a folder with ``__init__.py``) and every folder of recipes."""
    import runpy

    import setuptools
    captured = {}
    monkeypatch.setattr(setuptools, 'setup', lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / 'setup.py'))
    code = {'.'.join(p.parent.relative_to(REPO).parts) for top in ('nni_darts_variants', 'search_spaces')
            for p in (REPO / top).rglob('__init__.py')}
    folders = {'.'.join(('nni_darts_variants', 'recipes') + p.parent.relative_to(EXPERIMENTS).parts)
               for p in EXPERIMENTS.rglob('*.yml')}
    assert code | folders <= set(captured['packages'])
    assert not [p for p in captured['packages'] if '__pycache__' in p]
    assert captured['package_dir'] == {'nni_darts_variants.recipes': 'experiments'}


@pytest.mark.slow
def test_wheel_ships_the_recipes_and_an_install_resolves_them_by_name(tmp_path):
    """Build a wheel from a copy of the repository (no network, no build isolation), check it holds every recipe,
    install it into a bare folder and resolve recipes by name from a third folder."""
    import os
    import shutil
    import subprocess
    import zipfile
    source = tmp_path / 'src'
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns('.git', 'build', '*.egg-info', '__pycache__', 'dist'))
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run(pip + ['wheel', '--no-deps', '--no-build-isolation', '--no-index', '-w', str(tmp_path / 'w'),
                          str(source)], check=True, capture_output=True, timeout=600)
    wheel, = (tmp_path / 'w').glob('*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    prefix = 'nni_darts_variants/recipes/'
    assert sorted(n[len(prefix):] for n in names if n.startswith(prefix) and n.endswith('.yml')) == \
        _repo_recipe_names()
    subprocess.run(pip + ['install', '--no-deps', '--no-index', '--target', str(tmp_path / 'site'), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    code = ('import json, nni_darts_variants.config as c; from nni_darts_variants.search import resolve_config;'
            'from nni_darts_variants.bundle import RETRAIN_RECIPES;'
            'print(json.dumps({"root": str(c.recipe_root()), "names": c.recipe_names(), "retrain": sorted(RETRAIN_RECIPES),'
            '"cfg": resolve_config("cifar10/search/pdarts.yml")}, default=str))')
    env = {**os.environ, 'PYTHONPATH': str(tmp_path / 'site')}
    out = subprocess.run([sys.executable, '-c', code], cwd=elsewhere, env=env, check=True, capture_output=True,
                         text=True, timeout=600).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got['root'] == str(tmp_path / 'site' / 'nni_darts_variants' / 'recipes')
    assert got['names'] == _repo_recipe_names()
    assert got['retrain'] == sorted(p.stem for p in (EXPERIMENTS / 'retrain').glob('*.yml'))
    from nni_darts_variants.search import resolve_config
    assert got['cfg'] == json.loads(json.dumps(resolve_config(EXPERIMENTS / 'cifar10/search/pdarts.yml'), default=str))
