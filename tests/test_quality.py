"""The rows of ``nni-darts bench --quality`` come from the registry plus declared per-variant rows."""
from __future__ import annotations

import pytest

from nni_darts_variants import registry
from nni_darts_variants.quality import NNI_ROWS, QualityConfig, quality_rows


def test_one_row_per_registered_strategy_then_second_order_darts_then_nni():
    strategies = sorted(registry.list_strategies())
    expected = {}
    for name in strategies:  # written out from the benchmark's definition: each strategy, DARTS in both orders
        expected[name] = ('ours', name, {'order': 1} if name == 'darts' else {})
        if name == 'darts':
            # AutoDL's DARTS-V2.py unrolls plain momentum with the protocol's Nesterov SGD
            expected['darts-2nd'] = ('ours', 'darts', {'order': 2, 'unroll_nesterov': True})
    for cls in ('DARTS', 'GumbelDARTS', 'RandomOneShot', 'ENAS'):
        expected[f'nni-{cls}'] = ('nni', cls, {})
    rows = quality_rows()
    assert list(rows) == list(expected) and rows == expected
    assert {'darts', 'darts-2nd', 'pcdarts', 'gdas', 'proxyless', 'parsec', 'pdarts', 'mergenas', 'dropnas',
            'snas'} <= set(rows)


def test_every_row_names_a_buildable_strategy():
    import nni.nas.strategy as nni_strategies
    for row, (kind, name, fixed) in quality_rows().items():
        if kind == 'ours':
            registry.check_strategy_arguments(name, fixed)  # unknown fixed arguments would raise
        else:
            assert name in NNI_ROWS and isinstance(getattr(nni_strategies, name), type), row


def test_a_newly_registered_strategy_gets_a_row(monkeypatch):
    from nni_darts_variants.strategies.darts import Darts
    monkeypatch.setattr(registry, '_registry', dict(registry._registry))
    registry.register_strategy(type('Plugin', (Darts,), {'__module__': 'plugin_pkg.plugin'}), name='plugin')
    rows = quality_rows()
    assert rows['plugin'] == ('ours', 'plugin', {})
    assert QualityConfig(rows=['plugin']).check().rows == ['plugin']


def test_unknown_row_lists_the_valid_ones():
    with pytest.raises(ValueError, match='unknown row') as err:
        QualityConfig(rows=['darts-3rd']).check()
    assert 'darts-2nd' in str(err.value) and 'nni-ENAS' in str(err.value)
