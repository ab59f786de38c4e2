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
