"""MergeNAS strategy: merged edges in DARTS cells, one depthwise convolution per edge, DARTS export and retrain."""
from __future__ import annotations

import copy

import pytest
import torch

from nni_darts_variants.testing import count_depthwise_convs
import torch.nn as nn
import torch.nn.functional as F

from nni_darts_variants import create_strategy
from search_spaces.ops import PRIMITIVES, SepConv
from nni_darts_variants.strategies.base import MixedEdge
from nni_darts_variants.strategies.mergenas import MergedEdge, MergeNAS
from nni_darts_variants.testing import tiny_space


@pytest.fixture(scope='module')
def space():
    """One tiny space per module (building a model space is the slow part); tests mutate deep copies."""
    return tiny_space()


@pytest.fixture
def supernet(supernet, space):
    """``supernet(strategy_name='mergenas', **kwargs)``: the shared fixture on a deep copy of the module's space."""
    def build(strategy_name: str = 'mergenas', **kwargs):
        strategy = create_strategy(strategy_name, **kwargs)
        return strategy, supernet(strategy, space=copy.deepcopy(space))
    return build


def _oneshot(strategy, net):
    from nni.nas.evaluator.pytorch.lightning import ClassificationModule
    module = ClassificationModule(num_classes=10)
    module.set_model(net)
    return strategy.configure_oneshot_module(module)


def _edges(net) -> list[MergedEdge]:
    return [m for m in net.modules() if isinstance(m, MergedEdge)]


def test_every_cell_edge_is_merged_and_keeps_darts_alphas(supernet):
    strategy, net = supernet()
    edges = _edges(net)
    assert len(edges) == 14 * 3
    assert all(e.names == list(PRIMITIVES) and e.alpha.shape == (8,) for e in edges)
    assert {e.spec.stride for e in edges if e.label.startswith('reduce') and e.spec.input < 2} == {2}
    labels = {e.label for e in edges}
    assert len(labels) == 28  # one alpha per label, shared by the cells of a type
    by_label = {}
    for e in edges:
        assert by_label.setdefault(e.label, e.alpha) is e.alpha


def test_one_depthwise_convolution_per_edge_per_forward(supernet, monkeypatch):
    _, net = supernet()
    depthwise = count_depthwise_convs(monkeypatch)
    net(torch.randn(2, 1, 8, 8))
    assert len(depthwise) == 14 * 3


def test_forward_is_the_merged_op_under_softmax_weights(supernet):
    _, net = supernet()
    edge = _edges(net)[0]
    with torch.no_grad():
        edge.alpha.copy_(torch.randn(8))
    x = torch.randn(2, edge.spec.channels, 8, 8)
    torch.testing.assert_close(edge(x), edge.merged(x, F.softmax(edge.alpha, -1)))
    # a candidate view runs the merged op with a one-hot weight
    one_hot = torch.zeros(8)
    one_hot[PRIMITIVES.index('skip_connect')] = 1
    torch.testing.assert_close(edge['skip_connect'](x), edge.merged(x, one_hot))


def test_alphas_and_shared_kernel_get_gradients(supernet):
    _, net = supernet()
    net(torch.randn(4, 1, 8, 8)).logsumexp(1).sum().backward()
    edge = _edges(net)[0]
    assert edge.alpha.grad is not None and torch.all(edge.alpha.grad != 0)
    assert edge.merged.merged.weight.grad.abs().sum() > 0


def test_fewer_parameters_than_darts(supernet):
    _, merged = supernet()
    _, darts = supernet('darts')
    n_merged = sum(p.numel() for p in merged.parameters())
    n_darts = sum(p.numel() for p in darts.parameters())
    assert n_merged < 0.6 * n_darts


def test_export_is_a_darts_genotype_that_retrains_with_darts_ops(supernet, space):
    strategy, net = supernet()
    module = _oneshot(strategy, net)
    favourite = {'normal': 'sep_conv_3x3', 'reduce': 'dil_conv_5x5'}
    with torch.no_grad():
        for edge in _edges(net):
            edge.alpha.zero_()
            edge.alpha[PRIMITIVES.index(favourite[edge.label.split('/')[0]])] = 5.0
    sample = module.export()
    genotype = module.export_genotype()
    assert {op for op, _ in genotype.normal} == {'sep_conv_3x3'}
    assert {op for op, _ in genotype.reduce} == {'dil_conv_5x5'}
    retrain = copy.deepcopy(space).freeze(sample)
    assert isinstance(retrain.cells[0].edges['2_0'], SepConv)  # DARTS's double block, not the merged op
    # freezing the supernet itself gives the same ordinary ops
    frozen = net.freeze(sample)
    assert isinstance(frozen.cells[0].edges['2_0'], SepConv)
    assert not any(isinstance(m, MergedEdge) for m in frozen.modules())
    assert frozen(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_choices_outside_cells_stay_plain_darts_edges():
    from nni.nas.nn.pytorch import LayerChoice, ModelSpace

    class Space(ModelSpace):
        def __init__(self):
            super().__init__()
            self.choice = LayerChoice({'a': nn.Conv2d(1, 2, 3, padding=1), 'b': nn.Conv2d(1, 2, 1)}, label='choice')

        def forward(self, x):
            return self.choice(x)

    net = MergeNAS().mutate_model(Space())
    assert type(net.choice) is MixedEdge
    assert net(torch.randn(1, 1, 4, 4)).shape == (1, 2, 4, 4)


def test_defaults_are_darts_first_order():
    strategy = MergeNAS()
    assert strategy.order == 1 and strategy.arc_learning_rate == 3e-4 and strategy.arc_weight_decay == 1e-3
    with pytest.raises(ValueError, match='order'):
        MergeNAS(order=3)
