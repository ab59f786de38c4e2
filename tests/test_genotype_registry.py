"""The DARTS derivation rule, genotype conversions, the registry and the config layer."""
from __future__ import annotations

import pytest
import torch

from nni_darts_variants import create_strategy, list_strategies, register_strategy
from nni_darts_variants.config import ConfigError, apply_overrides, check_schema
from nni_darts_variants.genotype import Genotype, darts_rule
from search_spaces.ops import PRIMITIVES
from nni_darts_variants.strategies.darts import Darts
from nni_darts_variants.testing import tiny_evaluator, tiny_space


def _logits(**values):
    return torch.tensor([float(values.get(op, 0.0)) for op in PRIMITIVES])


# Node 3 has three incoming edges whose raw-logit ranking and softmax ranking disagree:
# edge 0: none=5, sep_conv_3x3=4 -> best raw logit 4, but softmax weight only ~0.26 (none takes the mass)
# edge 1: sep_conv_5x5=2        -> raw 2, softmax ~0.51
# edge 2: dil_conv_3x3=3        -> raw 3, softmax ~0.74
NODE3 = {0: _logits(none=5, sep_conv_3x3=4), 1: _logits(sep_conv_5x5=2), 2: _logits(dil_conv_3x3=3)}


def test_darts_rule_ranks_by_softmax_including_none():
    weights = {(3, j): dict(zip(PRIMITIVES, torch.softmax(a, -1).tolist())) for j, a in NODE3.items()}
    assert darts_rule(weights)[3] == [('dil_conv_3x3', 2), ('sep_conv_5x5', 1)]
    raw = {(3, j): dict(zip(PRIMITIVES, a.tolist())) for j, a in NODE3.items()}
    assert darts_rule(raw)[3] == [('sep_conv_3x3', 0), ('dil_conv_3x3', 2)]  # what raw-logit ranking would pick


def test_strategy_export_follows_the_softmax_rule():
    strategy = Darts()
    space = tiny_space()
    strategy.mutate_model(space)
    module = strategy.configure_oneshot_module(tiny_evaluator().module)
    module.set_model(space)
    normal = next(c for c in space.cells if not c.reduction)
    with torch.no_grad():
        for j, logits in NODE3.items():
            normal.edge(3, j).alpha.copy_(logits)
    sample = module.export()
    assert sample['normal/input_3'] == [1, 2]
    assert sample['normal/op_3_2'] == 'dil_conv_3x3' and sample['normal/op_3_1'] == 'sep_conv_5x5'
    assert all(v != 'none' for k, v in sample.items() if '/op_' in k)


def test_tied_edges_go_to_the_lower_input_index():
    """The official ``genotype()`` ranks a node's inputs with Python's stable ``sorted(range(i + 2), key=...)``: on a
    tie the lower input index wins, whatever its operation's name. Here the names sort the other way round."""
    weights = {(3, 0): {'sep_conv_3x3': 0.5}, (3, 1): {'avg_pool_3x3': 0.5}, (3, 2): {'dil_conv_3x3': 0.5}}
    official = sorted(range(3), key=lambda j: -max(weights[(3, j)].values()))[:2]  # the official ranking, ported
    assert official == [0, 1]
    assert darts_rule(weights)[3] == [('sep_conv_3x3', 0), ('avg_pool_3x3', 1)]


def test_none_is_never_chosen_even_when_strongest():
    weights = {(2, 0): {'none': 0.9, 'skip_connect': 0.1}, (2, 1): {'none': 0.99, 'avg_pool_3x3': 0.01}}
    assert darts_rule(weights)[2] == [('skip_connect', 0), ('avg_pool_3x3', 1)]


def test_genotype_roundtrip_and_validation(tmp_path):
    g = Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)] * 4,
                 reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)] * 4)
    g.save(tmp_path / 'g.json')
    assert Genotype.load(tmp_path / 'g.json') == g
    assert Genotype.from_sample(g.to_sample()) == g
    with pytest.raises(ValueError, match='does not exist'):
        Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 2)], reduce=[('skip_connect', 0), ('skip_connect', 1)])
    with pytest.raises(ValueError, match='two'):
        Genotype(normal=[('sep_conv_3x3', 0)], reduce=[('skip_connect', 0), ('skip_connect', 1)])


def test_registry_lists_every_variant_and_rejects_bad_names_and_arguments():
    assert set(list_strategies()) >= {'darts', 'pcdarts', 'gdas', 'proxyless', 'parsec', 'pdarts', 'mergenas',
                                      'dropnas'}
    with pytest.raises(ValueError, match="unknown strategy 'nope'; valid strategies: darts"):
        create_strategy('nope')
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['ordr'\]"):
        create_strategy('darts', ordr=2)
    assert create_strategy('darts', order=2).order == 2


def test_register_strategy_refuses_duplicates():
    class Mine(Darts):
        name = 'darts'
    with pytest.raises(ValueError, match='already registered'):
        register_strategy(Mine)

    from nni_darts_variants import registry
    try:
        @register_strategy(name='my-darts-for-test')
        class Other(Darts):
            pass
        assert 'my-darts-for-test' in list_strategies()
        assert isinstance(create_strategy('my-darts-for-test'), Other)
        with pytest.raises(ValueError, match='already registered'):
            register_strategy(Other, name='my-darts-for-test')
    finally:
        registry._registry.pop('my-darts-for-test', None)


def test_config_overrides_and_schema():
    cfg = apply_overrides({'a': {'b': 1}}, ['a.b=2', 'a.c=[1, 2]', 'd.e=true'])
    assert cfg == {'a': {'b': 2, 'c': [1, 2]}, 'd': {'e': True}}
    schema = {'a': {'b': 1, 'c': [0]}, 'd': {'e': False}}
    assert check_schema(cfg, schema) == cfg
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['x'\]"):
        check_schema({'a': {'x': 1}}, schema)
    with pytest.raises(ConfigError, match='must be a whole number'):
        check_schema({'a': {'b': 1.5}}, schema)
    with pytest.raises(ConfigError, match='has no "="'):
        apply_overrides({}, ['a.b'])
