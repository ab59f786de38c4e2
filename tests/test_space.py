"""DartsSpace and DartsCell (algorithms.md §0): structure, sharing, freeze, and NNI's own strategies on the space."""
from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn as nn

from search_spaces.cell import DartsCell
from nni_darts_variants.genotype import Genotype
from search_spaces.ops import PRIMITIVES, PoolBN
from nni_darts_variants.testing import tiny_evaluator, tiny_space
from search_spaces import DartsSpace


@pytest.fixture(scope='module')
def cifar_space():
    return DartsSpace(width=16, num_cells=8, dataset='cifar10')


def test_search_network_structure(cifar_space):
    cells = list(cifar_space.cells)
    assert [c.reduction for c in cells] == [i in (2, 5) for i in range(8)]
    for cell in cells:
        assert isinstance(cell, DartsCell) and len(cell.edges) == 14 and len(cell.inputs) == 4
        for edge in cell.edges.values():
            assert list(edge.names) == list(PRIMITIVES)  # all 8 operations, `none` included
    widths = [16, 16, 32, 32, 32, 64, 64, 64]
    assert [c.channels for c in cells] == widths
    assert cifar_space.classifier.in_features == 4 * 64  # output = concat of the 4 nodes
    assert cifar_space(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_batch_norm_inside_cells_is_not_affine_and_pools_have_bn(cifar_space):
    cell = cifar_space.cells[0]
    bns = [m for m in cell.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not bn.affine for bn in bns)
    assert cifar_space.stem0[1].affine  # the stem's BN is affine, as in the official code
    pools = [m for m in cell.modules() if isinstance(m, PoolBN)]
    assert pools and all(isinstance(p[-1], nn.BatchNorm2d) for p in pools)


def test_one_choice_set_per_cell_type(cifar_space):
    labels = cifar_space.simplify()
    assert len(labels) == 2 * (14 + 4)
    assert all(k.split('/')[0] in ('normal', 'reduce') for k in labels)
    assert {k for k in labels if k.startswith('normal/op_')} == {f'normal/op_{n}_{j}' for n in range(2, 6)
                                                                   for j in range(n)}


def test_imagenet_stem_reaches_the_cells_at_28():
    space = DartsSpace(width=8, num_cells=3, dataset='imagenet')
    x = torch.randn(1, 3, 224, 224)
    s0 = space.stem0(x)
    assert s0.shape[-1] == 56 and space.stem1(s0).shape[-1] == 28
    assert space(x).shape == (1, 1000)


def test_other_channels_and_classes():
    space = DartsSpace(width=8, num_cells=3, dataset='cifar10', in_channels=1, num_classes=7)
    assert space(torch.randn(2, 1, 16, 16)).shape == (2, 7)


def test_per_edge_operations():
    ops = {'normal/op_2_0': ['skip_connect', 'sep_conv_3x3'], 'reduce/op_5_4': ['avg_pool_3x3']}
    space = tiny_space(operations=ops)
    normal = next(c for c in space.cells if not c.reduction)
    reduce = next(c for c in space.cells if c.reduction)
    assert list(normal.edges['2_0'].names) == ['skip_connect', 'sep_conv_3x3']
    assert list(reduce.edges['5_4'].names) == ['avg_pool_3x3']
    assert list(normal.edges['2_1'].names) == list(PRIMITIVES)


@pytest.mark.parametrize('bad, message', [(['conv_9x9'], 'unknown operation'), ([], 'empty'),
                                          (['none', 'none'], 'duplicate')])
def test_bad_operations(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_space(operations=bad)


def test_freeze_builds_the_discrete_network_with_only_chosen_edges():
    space = tiny_space()
    genotype = Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1), ('dil_conv_3x3', 2), ('max_pool_3x3', 0),
                                ('avg_pool_3x3', 1), ('sep_conv_5x5', 3), ('skip_connect', 4), ('dil_conv_5x5', 0)],
                        reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('avg_pool_3x3', 0),
                                ('sep_conv_3x3', 3), ('skip_connect', 1), ('dil_conv_3x3', 4), ('sep_conv_5x5', 2)])
    sample = genotype.to_sample(space)
    assert space.check_contains(sample) is None
    net = space.freeze(sample)
    cell = next(c for c in net.cells if not c.reduction)
    assert sorted(cell.edges.keys()) == sorted(['2_0', '2_1', '3_0', '3_2', '4_1', '4_3', '5_0', '5_4'])
    assert isinstance(cell.edges['2_0'], nn.Sequential)  # the chosen op itself, no LayerChoice left
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert Genotype.from_sample(sample) == Genotype.from_sample(genotype.to_sample())


@pytest.mark.parametrize('name', ['DARTS', 'GumbelDARTS', 'Proxyless'])
def test_nni_builtin_strategies_run_on_the_space(name):
    """NNI's own one-shot strategies search DartsSpace too (side-by-side comparisons)."""
    import nni.nas.strategy as strategies
    from nni.nas.experiment import NasExperiment
    space = tiny_space()
    exp = NasExperiment(space, tiny_evaluator(), getattr(strategies, name)())
    exp.config.experiment_working_directory = tempfile.mkdtemp()
    exp.run()
    sample = exp.export_top_models(formatter='dict')[0]
    assert tiny_space().check_contains(sample) is None
