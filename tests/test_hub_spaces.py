"""Every strategy on NNI's own model spaces (issue #12): hub spaces, NNI ``Cell``, free ``InputChoice``.

The matrix runs each registered strategy through ``NasExperiment`` with NNI's ``Classification`` for one epoch on
synthetic data, on each hub space at a tiny size, then freezes the exported sample in a fresh space and runs it; or it
expects the documented one-line refusal at mutation. Only a diagonal runs by default; the full matrix is ``slow``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nni_darts_variants.registry import (
    build_space,
    create_strategy,
    get_strategy,
    list_strategies,
)
from nni_darts_variants.testing import run_tiny_search, tiny_loaders

hub = pytest.importorskip('nni.nas.hub.pytorch')

#: name -> (tiny constructor, image side)
SPACES = {
    'DARTS': (lambda: hub.DARTS(width=4, num_cells=3, dataset='cifar'), 8),
    'NASNet': (lambda: hub.NASNet(width=4, num_cells=3, dataset='cifar'), 8),
    'ENAS': (lambda: hub.ENAS(width=4, num_cells=3, dataset='cifar'), 8),
    'AmoebaNet': (lambda: hub.AmoebaNet(width=4, num_cells=3, dataset='cifar'), 8),
    'PNAS': (lambda: hub.PNAS(width=4, num_cells=3, dataset='cifar'), 8),
    'NasBench201': (lambda: hub.NasBench201(stem_out_channels=4, num_modules_per_stack=1, num_labels=10), 8),
    'NasBench101': (lambda: hub.NasBench101(stem_out_channels=4, num_stacks=1, num_modules_per_stack=1,
                                            num_labels=10), 8),
    'ProxylessNAS': (lambda: hub.ProxylessNAS(num_labels=10, base_widths=(8,) * 9), 32),
    'MobileNetV3Space': (lambda: hub.MobileNetV3Space(num_labels=10, base_widths=(8,) * 9,
                                                      width_multipliers=(0.5, 1.0), expand_ratios=(1.0, 2.0),
                                                      depth_range=(1, 2)), 32),
    'ShuffleNetSpace': (lambda: hub.ShuffleNetSpace(num_labels=10), 32),
}

#: (strategy or '*', space or '*') -> the start of the refusal message at mutation.
REFUSALS = {
    ('pdarts', '*'): 'P-DARTS rebuilds the model space',  # first: P-DARTS refuses before any space check
    ('*', 'NasBench101'): 'NasBench101: cell/final is a NasBench101CellConstraint',
    ('proxyless', 'MobileNetV3Space'): 'proxyless cannot search',
    ('parsec', 'MobileNetV3Space'): 'parsec cannot search',
}

#: The default run: one strategy per space kind, so that every construct is crossed at least once.
#: (GDAS runs on hub DARTS in the tutorial test; PC-DARTS, MergeNAS, DropNAS have their maths tests there.)
DIAGONAL = {('darts', 'DARTS'), ('parsec', 'NasBench201'), ('pdarts', 'DARTS'), ('darts', 'NasBench101'),
            ('proxyless', 'MobileNetV3Space')}


def refusal(strategy: str, space: str) -> str | None:
    for (s, sp), message in REFUSALS.items():
        if s in ('*', strategy) and sp in ('*', space):
            return message
    return None


def _case(strategy: str, space: str) -> object:
    marks = [] if (strategy, space) in DIAGONAL else [pytest.mark.slow]
    return pytest.param(strategy, space, marks=marks, id=f'{strategy}-{space}')


def _search(strategy: str, space: nn.Module, size: int):
    return run_tiny_search(create_strategy(strategy, **get_strategy(strategy).smoke_kwargs()), space=space,
                           loaders=tiny_loaders(n=16, channels=3, size=size))


@pytest.mark.parametrize('strategy, space', [_case(s, sp) for s in list_strategies() for sp in SPACES])
def test_strategy_on_hub_space(strategy: str, space: str) -> None:
    build, size = SPACES[space]
    expected = refusal(strategy, space)
    if expected is not None:
        with pytest.raises(TypeError, match='^' + expected):
            create_strategy(strategy).mutate_model(build())
        return
    result = _search(strategy, build(), size)
    fresh = build()
    fresh.validate(result.sample)  # the export is a valid sample of the user's space
    model = fresh.freeze(result.sample)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10)
    assert any(not torch.equal(a, b) for a, b in zip(result.snapshot.before, result.snapshot.after)), \
        'the architecture parameters did not move'


# ----- each variant's mathematics on hub DARTS -----------------------------------------------------------------------

def _mutated(strategy: str, space: nn.Module | None = None, **kwargs) -> nn.Module:
    space = space if space is not None else SPACES['DARTS'][0]()
    return create_strategy(strategy, **kwargs).mutate_model(space)


def test_gdas_runs_one_candidate_per_edge_on_hub_darts() -> None:
    from nni_darts_variants.strategies.gdas import GumbelMaxEdge
    model = _mutated('gdas')
    edges = [m for m in model.modules() if isinstance(m, GumbelMaxEdge)]
    assert len({e.label for e in edges}) == 2 * 14  # one label per edge of the normal and the reduction cell
    calls = {id(e): 0 for e in edges}

    def counter(key: int):
        return lambda module, args, output: calls.__setitem__(key, calls[key] + 1)
    for edge in edges:
        edge.resample({})
        for name in edge.names:
            edge[name].register_forward_hook(counter(id(edge)))
    model(torch.randn(2, 3, 8, 8))
    assert calls == {id(e): 1 for e in edges}


def test_pcdarts_partial_channels_on_hub_darts() -> None:
    from nni_darts_variants.strategies.pcdarts import PartialChannelEdge
    model = _mutated('pcdarts', partial_channels_k=2)
    edges = [m for m in model.modules() if isinstance(m, PartialChannelEdge)]
    assert edges and all(e.partial_channels_k == 2 for e in edges)
    widths: list[tuple[int, int]] = []
    for edge in edges:
        conv = edge['sep_conv_3x3']
        conv.register_forward_pre_hook(lambda m, args, e=edge: widths.append((args[0].shape[1], e.width)))
        edge.register_forward_pre_hook(lambda m, args: setattr(m, 'width', args[0].shape[1]))
        edge.width = 0
    model(torch.randn(2, 3, 8, 8))
    assert widths and all(inner * 2 == outer for inner, outer in widths)


def test_pcdarts_edge_normalization_on_nni_cell_nodes() -> None:
    from nni_darts_variants.strategies.pcdarts import EdgeNormalizedNode
    model = _mutated('pcdarts')
    nodes = [m for m in model.modules() if isinstance(m, EdgeNormalizedNode)]
    assert len({n.label for n in nodes}) == 2 * 4
    node = nodes[0]
    inputs = [torch.randn(2, 3) for _ in range(node.n_candidates)]
    expected = sum(w * x for w, x in zip(F.softmax(node.beta.detach(), -1), inputs))
    assert torch.allclose(node(inputs), expected)


def test_mergenas_merges_hub_darts_edges() -> None:
    from nni_darts_variants.strategies.mergenas import MergedEdge
    model = _mutated('mergenas')
    edges = [m for m in model.modules() if isinstance(m, MergedEdge)]
    assert len({e.label for e in edges}) == 2 * 14
    assert {e.spec.stride for e in edges} == {1, 2}


def test_mergenas_warns_once_listing_fallback_labels(caplog) -> None:
    import logging
    with caplog.at_level(logging.WARNING, logger='nni_darts_variants'):
        _mutated('mergenas', SPACES['NasBench201'][0]())
    lines = [r.getMessage() for r in caplog.records if 'falls back to plain DARTS' in r.getMessage()]
    assert len(lines) == 1 and 'cell/0_1' in lines[0] and 'cell/2_3' in lines[0]


def test_dropnas_groups_hub_darts_candidates() -> None:
    from nni_darts_variants.strategies.dropnas import DropEdge
    edge = next(m for m in _mutated('dropnas').modules() if isinstance(m, DropEdge))
    groups = [{edge.names[i] for i in g} for g in edge.groups]
    assert groups == [{'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5'},
                      {'none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect'}]


def test_darts_rule_on_nni_cell_exports_nni_labels() -> None:
    """Node 2 of the normal cell: the strongest non-none op on each incoming edge ranks the edges (DARTS rule)."""
    from nni_darts_variants.strategies.base import VariantLightningModule
    from nni_darts_variants.strategies.nni_spaces import MixedCell
    model = _mutated('darts')
    cell = next(m for m in model.modules() if isinstance(m, MixedCell) and m.label == 'normal')
    with torch.no_grad():
        for node in cell.node_indices:
            for j in range(node):
                cell.edge(node, j).alpha.zero_()
        cell.edge(2, 1).alpha[cell.edge(2, 1).names.index('sep_conv_5x5')] = 3.0
        cell.edge(2, 0).alpha[cell.edge(2, 0).names.index('max_pool_3x3')] = 2.0
        cell.edge(2, 0).alpha[cell.edge(2, 0).names.index('none')] = 9.0  # none never wins
    module = VariantLightningModule.__new__(VariantLightningModule)
    sample = VariantLightningModule.export_cell(module, cell)
    assert sample['normal/op_2_0'] == 'sep_conv_5x5' and sample['normal/input_2_0'] == [1]
    assert sample['normal/op_2_1'] == 'max_pool_3x3' and sample['normal/input_2_1'] == [0]
    assert set(sample) == {f'normal/{kind}_{i}_{k}' for kind in ('op', 'input') for i in range(2, 6) for k in (0, 1)}


# ----- NNI Cell and free InputChoice in a user's space ---------------------------------------------------------------

def _small_cell_space():
    from nni.nas.nn.pytorch import Cell, InputChoice, LayerChoice, ModelSpace

    class SmallCellSpace(ModelSpace):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.cell = Cell({'conv': nn.Conv2d(4, 4, 3, padding=1), 'pool': nn.MaxPool2d(3, 1, 1),
                              'skip': nn.Identity()}, num_nodes=2, num_ops_per_node=1, num_predecessors=1,
                             label='cell')
            self.branch = LayerChoice({'a': nn.Conv2d(8, 8, 1), 'b': nn.Conv2d(8, 8, 3, padding=1)}, label='branch')
            self.pick = InputChoice(2, 1, label='pick')
            self.head = nn.Linear(8, 10)

        def forward(self, x):
            x = self.cell(self.stem(x))
            x = self.pick([x, self.branch(x)])
            return self.head(x.mean((2, 3)))
    return SmallCellSpace()


@pytest.mark.parametrize('strategy', [pytest.param(s, marks=[] if s in ('darts', 'parsec') else [pytest.mark.slow])
                                      for s in list_strategies() if s != 'pdarts'])
def test_nni_cell_and_free_input_choice_space(strategy: str) -> None:
    result = _search(strategy, _small_cell_space(), 8)
    assert set(result.sample) == {'cell/op_1_0', 'cell/input_1_0', 'cell/op_2_0', 'cell/input_2_0', 'branch', 'pick'}
    model = _small_cell_space().freeze(result.sample)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_free_input_choice_is_a_weighted_choice_for_darts() -> None:
    from nni_darts_variants.strategies.base import MixedInput
    pick = next(m for m in _mutated('darts', _small_cell_space()).modules() if isinstance(m, MixedInput))
    inputs = [torch.randn(2, 8, 4, 4) for _ in range(2)]
    weights = torch.exp(pick._arch_alpha.detach()) / torch.exp(pick._arch_alpha.detach()).sum()
    assert torch.allclose(pick(inputs), weights[0] * inputs[0] + weights[1] * inputs[1], atol=1e-6)


@pytest.mark.parametrize('strategy, kind', [('gdas', 'GumbelMaxInput'), ('proxyless', 'ProxylessInput'),
                                            ('parsec', 'ParsecInput')])
def test_free_input_choice_is_hard_sampled(strategy: str, kind: str) -> None:
    model = _mutated(strategy, _small_cell_space())
    pick = next(m for m in model.modules() if type(m).__name__ == kind)
    pick.resample({})
    inputs = [torch.full((1, 2), 1.0), torch.full((1, 2), 100.0)]
    (chosen,) = pick.chosen
    assert torch.allclose(pick(inputs).detach(), inputs[chosen])


def test_gdas_free_input_gradient_reaches_every_alpha() -> None:
    from nni_darts_variants.strategies.gdas import GumbelMaxInput
    pick = next(m for m in _mutated('gdas', _small_cell_space()).modules() if isinstance(m, GumbelMaxInput))
    pick.resample({})
    pick([torch.randn(1, 2, requires_grad=True), torch.randn(1, 2)]).sum().backward()
    assert pick._arch_alpha.grad is not None and bool((pick._arch_alpha.grad != 0).all())


# ----- NNI's tutorial and the YAML/CLI entry ---------------------------------------------------------------------------

@pytest.mark.parametrize('strategy', [pytest.param(s, marks=[] if s == 'gdas' else [pytest.mark.slow])
                                      for s in list_strategies() if s != 'pdarts'])
def test_nni_tutorial_searching_in_darts_space(strategy: str, tmp_path) -> None:
    """NNI's tutorial "Searching in DARTS search space", with our strategy in place of ``nni.nas.strategy.DARTS``
    (its evaluator settings, tiny width, depth and data)."""
    from nni.nas.evaluator.pytorch import Classification
    from nni.nas.experiment import NasExperiment
    from nni.nas.hub.pytorch import DARTS as DartsSpace

    model_space = DartsSpace(width=4, num_cells=3, dataset='cifar')
    train_loader, valid_loader = tiny_loaders(n=16, channels=3)
    evaluator = Classification(learning_rate=1e-3, weight_decay=1e-4, train_dataloaders=train_loader,
                               val_dataloaders=valid_loader, max_epochs=1, num_classes=10, accelerator='cpu',
                               enable_progress_bar=False, logger=False, enable_checkpointing=False)
    strategy_ = create_strategy(strategy, **get_strategy(strategy).smoke_kwargs())
    experiment = NasExperiment(model_space, evaluator, strategy_)
    experiment.config.experiment_working_directory = str(tmp_path)
    experiment.run()
    exported_arch = experiment.export_top_models(formatter='dict')[0]
    network = DartsSpace(width=4, num_cells=3, dataset='cifar').freeze(exported_arch)
    assert network(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_nni_hub_space_entry() -> None:
    space = build_space('nni-hub', in_channels=3, num_classes=10, name='DARTS', width=4, num_cells=3)
    assert isinstance(space, hub.DARTS)
    assert build_space('nni-hub', num_classes=7, name='NasBench201', stem_out_channels=4,
                       num_modules_per_stack=1).num_labels == 7
    with pytest.raises(ValueError, match="unknown NNI hub space 'DARTZ'; valid names: .*DARTS"):
        build_space('nni-hub', name='DARTZ')
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['widht'\]"):
        build_space('nni-hub', name='DARTS', widht=3)
    with pytest.raises(ValueError, match='classifies into 1000 classes but the data has 10'):
        build_space('nni-hub', num_classes=10, name='DARTS', dataset='imagenet', width=4, num_cells=3)
