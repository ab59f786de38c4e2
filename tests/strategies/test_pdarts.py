"""P-DARTS: stage policies (pure functions), the skip-dropout edge, and a 2-stage search through NasExperiment."""
from __future__ import annotations

import math

import nni
import pytest
import torch
from nni.nas.evaluator.pytorch.lightning import ClassificationModule

from nni_darts_variants import create_strategy
from nni_darts_variants.genotype import darts_rule
from nni_darts_variants.strategies.pdarts import (
    PDarts,
    PDartsEdge,
    drop_operations,
    limit_skip_connections,
    skip_dropout_rate,
    space_blueprint,
)
from nni_darts_variants.testing import (
    TinySearch,
    run_tiny_search,
    tiny_loaders,
    tiny_space,
)
from search_spaces.ops import PRIMITIVES

OPS = list(PRIMITIVES)


def _random_cell(ops_per_edge: int, seed: int) -> dict[tuple[int, int], dict[str, float]]:
    """Softmax weights of a 4-node cell, each edge on a random subset of ``ops_per_edge`` operations."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for node in range(2, 6):
        for j in range(node):
            names = [OPS[k] for k in sorted(torch.randperm(8, generator=g)[:ops_per_edge].tolist())]
            probs = torch.softmax(torch.randn(ops_per_edge, generator=g, dtype=torch.float64) * 2, 0)
            weights[(node, j)] = dict(zip(names, probs.tolist()))
    return weights


# ----- stage policies -----------------------------------------------------------------------------------------------

def test_drop_operations_none_first_drops_none_before_any_other():
    """Official ``get_min_k_no_zero``: ``none`` goes first whatever its weight, then the weakest others; a ``none``
    that is also the weakest is dropped once, not counted twice."""
    three = ['none', 'sep_conv_3x3', 'skip_connect']
    assert drop_operations(three, [0.6, 0.3, 0.1], 2, none_first=True) == ['sep_conv_3x3', 'skip_connect']
    assert drop_operations(three, [0.1, 0.5, 0.4], 1, none_first=True) == ['sep_conv_3x3']
    assert drop_operations(three, [0.1, 0.5, 0.4], 2, none_first=True) == ['sep_conv_3x3', 'skip_connect']


def test_drop_operations_keeps_the_strongest_in_order():
    weights = [0.05, 0.30, 0.01, 0.20, 0.02, 0.25, 0.03, 0.14]
    assert drop_operations(OPS, weights, 5) == ['none', 'max_pool_3x3', 'skip_connect', 'sep_conv_5x5',
                                                 'dil_conv_5x5']
    assert drop_operations(OPS, weights, 8) == OPS
    # ``none`` survives an intermediate drop when strong, and is removed first at the final pick
    assert drop_operations(['none', 'sep_conv_3x3', 'skip_connect'], [0.6, 0.3, 0.1], 2) == ['none', 'sep_conv_3x3']
    assert drop_operations(['none', 'sep_conv_3x3', 'skip_connect'], [0.6, 0.3, 0.1], 1, none_first=True) == [
        'sep_conv_3x3']
    with pytest.raises(ValueError, match='keep'):
        drop_operations(OPS, weights, 0)


@pytest.mark.parametrize('seed', range(5))
def test_final_rule_equals_official_pick(seed):
    """DARTS rule without ``none`` == official: final drop (none first) and top-2 edges by max non-none prob."""
    weights = _random_cell(3, seed)
    nodes = limit_skip_connections(weights, None)
    for node, pairs in nodes.items():
        survivor = {j: drop_operations(list(weights[(node, j)]), list(weights[(node, j)].values()), 1,
                                       none_first=True)[0] for j in range(node)}
        score = {j: max(w for op, w in weights[(node, j)].items() if op != 'none') for j in range(node)}
        top2 = sorted(range(node), key=lambda j: score[j])[-2:]
        assert {j for _, j in pairs} == set(top2)
        assert all(op == survivor[j] for op, j in pairs)


def test_skip_dropout_schedule():
    d, epochs, warmup = 0.4, 25, 10
    assert skip_dropout_rate(0, d, epochs, warmup) == pytest.approx(d * (epochs - 1) / epochs)
    assert skip_dropout_rate(warmup - 1, d, epochs, warmup) == pytest.approx(d * (epochs - warmup) / epochs)
    assert skip_dropout_rate(warmup, d, epochs, warmup) == pytest.approx(d)
    assert skip_dropout_rate(warmup + 5, d, epochs, warmup) == pytest.approx(d * math.exp(-1.0))
    rates = [skip_dropout_rate(e, d, epochs, warmup) for e in range(epochs)]
    assert all(a > b for a, b in zip(rates[:warmup - 1], rates[1:warmup]))
    assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1:]))


def _skip_heavy_cell() -> dict[tuple[int, int], dict[str, float]]:
    """Every node's edges from inputs 0 and 1 prefer skip (p = 0.5 + n/100 on input 0, 0.1 less on input 1) over
    sep_conv (0.35), which still beats the other edges (0.3) when the skip is removed."""
    weights = {}
    for node in range(2, 6):
        for j in range(node):
            if j < 2:
                skip = 0.5 + node / 100 - j / 10
                weights[(node, j)] = {'none': 0.65 - skip, 'skip_connect': skip, 'sep_conv_3x3': 0.35}
            else:
                weights[(node, j)] = {'none': 0.5, 'sep_conv_3x3': 0.3, 'dil_conv_3x3': 0.2}
    return weights


def test_limit_skip_connections():
    weights = _skip_heavy_cell()
    unlimited = limit_skip_connections(weights, None)
    assert unlimited == darts_rule(weights)
    assert sum(op == 'skip_connect' for pairs in unlimited.values() for op, _ in pairs) == 8
    for limit in (0, 2, 5):
        nodes = limit_skip_connections(weights, limit)
        pairs = [pair for node in sorted(nodes) for pair in nodes[node]]
        skips = [(node, j) for node in nodes for op, j in nodes[node] if op == 'skip_connect']
        assert len(skips) == limit
        assert all(op != 'none' for op, _ in pairs)
        assert all(len({j for _, j in nodes[n]}) == 2 for n in nodes)
        # the weakest skips go first: the survivors are the strongest chosen skips
        strongest = sorted(((n, j) for n in range(2, 6) for j in range(2)),
                           key=lambda e: -weights[e]['skip_connect'])[:limit]
        assert set(skips) == set(strongest)
    assert limit_skip_connections(weights, 8) == unlimited


# An independent port of the official skip-connect refinement (chenxin061/pdarts, train_search.py: the last stage's
# get_min_k_no_zero drop, the final pick, then delete_min_sk_prob / keep_1_on / keep_2_branches until at most
# max_sk skips), on 14 edges with 3 operations each (official num_to_keep = 5, 3, 1); PRIMITIVES order throughout.

def _official_min_k_no_zero(w_in, idxs, k):
    w, index = list(w_in), []
    zero_first = 0 in idxs
    if zero_first:
        w, k = w[1:], k - 1
        index.append(0)
    for _ in range(k):
        idx = min(range(len(w)), key=w.__getitem__)
        w[idx] = 1
        index.append(idx + 1 if zero_first else idx)
    return index


def _official_keep_1_on(switches_in, probs):
    switches = [list(s) for s in switches_in]
    for i, sw in enumerate(switches):
        idxs = [j for j in range(len(OPS)) if sw[j]]
        for idx in _official_min_k_no_zero(probs[i], idxs, 2):
            sw[idxs[idx]] = False
    return switches


def _official_keep_2_branches(switches_in, probs):
    switches = [list(s) for s in switches_in]
    final_prob = [max(p) for p in probs]
    keep, n, start = [0, 1], 3, 2
    for _ in range(3):
        end = start + n
        ranked = sorted(range(n), key=lambda x: final_prob[start:end][x])
        keep += [ranked[-1] + start, ranked[-2] + start]
        start, n = end, n + 1
    for i, sw in enumerate(switches):
        if i not in keep:
            sw[:] = [False] * len(OPS)
    return switches


def _official_delete_min_sk_prob(switches_in, switches_bk, probs_in):
    skip = OPS.index('skip_connect')

    def sk_idx(k):
        return -1 if not switches_in[k][skip] else sum(switches_bk[k][:skip])
    probs = [list(p) for p in probs_in]
    sk_prob = [1.0] * len(switches_bk)
    for i in range(len(switches_in)):
        if sk_idx(i) != -1:
            sk_prob[i] = probs[i][sk_idx(i)]
    d_idx = min(range(len(sk_prob)), key=sk_prob.__getitem__)
    probs[d_idx][sk_idx(d_idx)] = 0.0
    return probs


def _official_refined_cell(weights, max_sk):
    edges = [(n, j) for n in range(2, 6) for j in range(n)]
    switches_bk = [[op in weights[e] for op in OPS] for e in edges]
    probs = [[weights[e][op] for op in OPS if op in weights[e]] for e in edges]
    switches = _official_keep_1_on(switches_bk, probs)  # the last stage's drop (none always goes)
    for i, sw in enumerate(switches_bk):  # the final pick: "remove all Zero operations"
        if sw[0]:
            probs[i][0] = 0.0
    switches = _official_keep_2_branches(switches, probs)
    skip = OPS.index('skip_connect')
    while sum(sw[skip] for sw in switches) > max_sk:
        probs = _official_delete_min_sk_prob(switches, switches_bk, probs)
        switches = _official_keep_1_on(switches_bk, probs)
        switches = _official_keep_2_branches(switches, probs)
    cell = {}
    for (node, j), sw in zip(edges, switches):
        for op, on in zip(OPS, sw):
            if on:
                cell.setdefault(node, set()).add((op, j))
    return cell


def _skip_prone_cell(seed):
    """3 operations per edge (skip on most edges, with a raised logit); softmax weights in PRIMITIVES order."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for node in range(2, 6):
        for j in range(node):
            others = [OPS[k] for k in torch.randperm(8, generator=g).tolist() if OPS[k] != 'skip_connect']
            names = others[:2] + ['skip_connect'] if torch.rand(1, generator=g) < 0.8 else others[:3]
            names = [op for op in OPS if op in names]
            logits = torch.randn(3, generator=g, dtype=torch.float64)
            logits += torch.tensor([1.5 if op == 'skip_connect' else 0.0 for op in names], dtype=torch.float64)
            weights[(node, j)] = dict(zip(names, torch.softmax(logits, 0).tolist()))
    return weights


@pytest.mark.parametrize('seed', range(12))
def test_skip_limit_equals_the_official_refinement(seed):
    weights = _skip_prone_cell(seed)
    unlimited = sum(op == 'skip_connect' for ops in _official_refined_cell(weights, 8).values() for op, _ in ops)
    for max_skip in range(0, 5):
        ours = {node: set(pairs) for node, pairs in limit_skip_connections(weights, max_skip).items()}
        assert ours == _official_refined_cell(weights, max_skip), (max_skip, unlimited)


def test_limit_keeps_a_skip_that_has_no_alternative():
    weights = {(2, 0): {'none': 0.2, 'skip_connect': 0.8}, (2, 1): {'skip_connect': 0.7, 'sep_conv_3x3': 0.3}}
    nodes = limit_skip_connections(weights, 0)
    assert sorted(nodes[2], key=lambda p: p[1]) == [('skip_connect', 0), ('sep_conv_3x3', 1)]


# ----- the edge ------------------------------------------------------------------------------------------------------

def _supernet_edges(supernet):
    net = supernet(create_strategy('pdarts'))
    normal = net.cells[0].edge(2, 0)  # stride 1: Identity
    reduce = net.cells[1].edge(2, 0)  # stride 2: FactorizedReduce
    assert isinstance(normal, PDartsEdge) and isinstance(reduce, PDartsEdge)
    return net, normal, reduce


def test_skip_dropout_only_on_stride1_identity(supernet):
    torch.manual_seed(0)
    net, normal, reduce = _supernet_edges(supernet)
    x = torch.rand(4, 8, 8, 8) + 1.0
    net.train()
    normal.skip_dropout = reduce.skip_dropout = 0.5
    dropped = normal.candidate_output('skip_connect', x)
    assert ((dropped == 0) | torch.isclose(dropped, 2 * x)).all()
    assert 0.3 < (dropped == 0).float().mean() < 0.7
    xr = torch.rand(4, 16, 8, 8)
    assert torch.equal(reduce.candidate_output('skip_connect', xr), reduce['skip_connect'](xr))
    net.eval()
    assert torch.equal(normal.candidate_output('skip_connect', x), x)


def test_edge_without_dropout_is_the_darts_mixture(supernet):
    torch.manual_seed(0)
    _, normal, _ = _supernet_edges(supernet)
    normal.skip_dropout = 0.0
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    normal.double().eval()
    w = torch.softmax(normal.alpha, -1)
    expected = sum(wi * normal[name](x) for wi, name in zip(w, normal.names))
    assert torch.allclose(normal(x), expected)


# ----- configuration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, match', [
    ({'num_to_keep': (3, 1)}, 'one entry per stage'),
    ({'num_to_keep': (5, 3, 2)}, 'ending with 1'),
    ({'num_to_keep': (3, 5, 1)}, 'non-increasing'),
    ({'stage_warmup_epochs': 30}, 'stage_warmup_epochs'),
    ({'skip_dropout': (0.1, 0.4, 1.0)}, r'\[0, 1\)'),
    ({'warmup_epochs': 3}, 'stage_warmup_epochs'),
    ({'max_skip_connect': -1}, 'max_skip_connect'),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PDarts(**kwargs)


def test_blueprint_fills_defaults_and_rejects_other_spaces():
    import torch.nn as nn
    from nni.nas.nn.pytorch import ModelSpace

    from search_spaces import DartsSpace

    cls, kwargs = space_blueprint(DartsSpace(8, dataset='digits'))
    assert cls is DartsSpace and kwargs['width'] == 8 and kwargs['num_cells'] == 8 and kwargs['operations'] is None

    class Plain(ModelSpace):
        def __init__(self, width: int = 4):
            super().__init__()
            self.fc = nn.Linear(width, 2)

    with pytest.raises(TypeError, match='num_cells'):
        space_blueprint(Plain())


def test_official_defaults():
    s = PDarts()
    assert (s.stage_cells, s.num_to_keep, s.skip_dropout) == ((5, 11, 17), (5, 3, 1), (0.1, 0.4, 0.7))
    assert (s.epochs_per_stage, s.stage_warmup_epochs, s.max_skip_connect) == (25, 10, 2)
    assert (s.arc_learning_rate, s.arc_gradient_clip_val, s.arc_weight_decay) == (6e-4, 5.0, 1e-3)
    assert s.total_epochs == 75


# ----- a 2-stage search through NasExperiment --------------------------------------------------------------------------

STAGES = dict(stage_cells=(4, 5), num_to_keep=(3, 1), epochs_per_stage=2, stage_warmup_epochs=1,
              skip_dropout=(0.2, 0.6), max_skip_connect=1)


def _recorder():
    import pytorch_lightning as pl

    class Recorder(pl.Callback):
        """Per epoch: what the first batch saw (after the schedule ran) and the alphas at the epoch's end."""

        def __init__(self):
            self.start, self.end = [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx:
                return
            weight_opt, arch_opt = trainer.optimizers
            edges = [m for m in module.modules() if isinstance(m, PDartsEdge)]
            self.start.append({
                'model': id(module.model), 'cells': len(module.model.cells),
                'ops': {e.label: list(e.names) for e in edges},
                'alphas': {e.label: e.alpha.detach().clone() for e in edges},
                'requires_grad': {a.requires_grad for a in module.arch_parameters()},
                'dropout': {e.skip_dropout for e in edges},
                'weight_opt': {id(p) for g in weight_opt.param_groups for p in g['params']},
                'arch_opt': {id(p) for g in arch_opt.param_groups for p in g['params']},
                'weight_state': len(weight_opt.state),
                'lr': weight_opt.param_groups[0]['lr'],
                'weights': {id(p) for p in module.weight_parameters()},
                'arch': {id(p) for p in module.arch_parameters()},
            })

        def on_train_epoch_end(self, trainer, module):
            self.end.append({m.label: m.alpha.detach().clone() for m in module.modules()
                             if isinstance(m, PDartsEdge)})

    return Recorder()


@nni.trace
class _CosineClassification(ClassificationModule):
    """NNI's classification module with SGD and a per-epoch cosine LR over ``schedule_epochs`` (the official P-DARTS
    per-stage schedule when the strategy's ``schedule_epochs`` sizes it)."""

    def __init__(self, schedule_epochs: int, learning_rate: float = 0.025):
        super().__init__(learning_rate=learning_rate, optimizer=torch.optim.SGD, num_classes=10)
        self.schedule_epochs = schedule_epochs

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.schedule_epochs, eta_min=0.0)
        return [optimizer], [{'scheduler': scheduler, 'interval': 'epoch'}]


@pytest.fixture(scope='module')
def staged(tmp_path_factory):
    import os
    import tempfile
    from unittest import mock

    import pytorch_lightning as pl
    from nni.nas.evaluator.pytorch import Lightning, Trainer
    from nni.nas.experiment import NasExperiment
    home = tmp_path_factory.mktemp('home')
    recorder = _recorder()
    strategy = create_strategy('pdarts', **STAGES)
    train, val = tiny_loaders(n=16)
    pl.seed_everything(0, verbose=False)
    module = _CosineClassification(schedule_epochs=strategy.schedule_epochs(4))
    trainer = Trainer(max_epochs=4, accelerator='cpu', logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                      num_sanity_val_steps=0)
    evaluator = Lightning(module, trainer, train_dataloaders=train, val_dataloaders=val)
    with mock.patch.dict(os.environ, {'HOME': str(home)}):
        experiment = NasExperiment(tiny_space(), evaluator, strategy)
        experiment.config.experiment_working_directory = tempfile.mkdtemp(dir=home)
        experiment.run()
    sample = experiment.export_top_models(formatter='dict')[0]
    return TinySearch(strategy, sample, recorder, experiment), recorder


def test_lr_is_back_at_its_maximum_at_the_first_batch_of_each_stage(staged):
    """Each stage rebuilds the optimizers and their cosine over ``epochs_per_stage`` (official ``train_search.py``):
    a schedule that ran on across stages would be at its minimum (0) at epoch 2."""
    _, rec = staged
    lrs = [s['lr'] for s in rec.start]
    cosine = [0.025 * (1 + math.cos(math.pi * e / 2)) / 2 for e in range(2)]
    assert lrs == pytest.approx(cosine + cosine)
    assert lrs[2] == pytest.approx(0.025) and lrs[1] < 0.025


def test_cells_and_alpha_shapes_per_stage(staged):
    _, rec = staged
    assert [s['cells'] for s in rec.start] == [4, 4, 5, 5]  # stage 1 rebuilt: the tiny space has 3 cells
    assert all(len(a) == 8 for a in rec.start[0]['alphas'].values())
    assert all(len(a) == 3 for a in rec.start[2]['alphas'].values())
    assert len(rec.start[2]['alphas']) == 28  # every edge of both cell types


def test_stage2_keeps_the_strongest_stage1_operations(staged):
    _, rec = staged
    stage1_end, stage2 = rec.end[1], rec.start[2]['ops']
    for label, alpha in stage1_end.items():
        names, probs = rec.start[0]['ops'][label], torch.softmax(alpha, -1).tolist()
        strongest = sorted(range(len(names)), key=lambda i: -probs[i])[:3]  # official get_min_k drops the rest
        assert stage2[label] == [names[i] for i in sorted(strongest)]


def test_fresh_network_alphas_and_optimizers_per_stage(staged):
    _, rec = staged
    first, second = rec.start[0], rec.start[2]
    assert first['model'] != second['model']
    for s in rec.start:  # each optimizer holds exactly the current network's parameters
        assert s['weight_opt'] == s['weights'] and s['arch_opt'] == s['arch']
    assert not first['weights'] & second['weights'] and not first['arch'] & second['arch']
    assert second['weight_state'] == 0  # no momentum carried over
    assert all(a.abs().max() < 0.01 for a in second['alphas'].values())  # fresh 1e-3 * randn


def test_alphas_frozen_during_each_stage_warmup(staged):
    _, rec = staged
    for epoch in (0, 2):  # warm-up epochs
        assert rec.start[epoch]['requires_grad'] == {False}
        assert all(torch.equal(rec.start[epoch]['alphas'][k], v) for k, v in rec.end[epoch].items())
    for epoch in (1, 3):
        assert rec.start[epoch]['requires_grad'] == {True}
        assert any(not torch.equal(rec.start[epoch]['alphas'][k], v) for k, v in rec.end[epoch].items())


def test_skip_dropout_follows_the_stage_schedule(staged):
    _, rec = staged
    for epoch, s in enumerate(rec.start):
        stage, e = divmod(epoch, 2)
        (rate,) = s['dropout']  # one rate on every edge
        assert rate == pytest.approx(skip_dropout_rate(e, STAGES['skip_dropout'][stage], 2, 1))


def test_export_comes_from_the_last_stage(staged):
    result, rec = staged
    module = result.strategy.oneshot_module
    assert len(module.model.cells) == 5
    sample, genotype = result.sample, result.strategy.export_genotype()
    space = tiny_space()
    assert space.check_contains(sample) is None
    assert space.freeze(sample)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    last_ops = rec.start[2]['ops']
    for cell in ('normal', 'reduce'):
        pairs = getattr(genotype, cell)
        assert all(op != 'none' for op, _ in pairs)
        for k, (op, j) in enumerate(pairs):
            assert op in last_ops[f'{cell}/op_{2 + k // 2}_{j}']
        weights = module.edge_weights(module.darts_cells()[cell])
        limit = STAGES['max_skip_connect'] if cell == 'normal' else 8
        nodes = _official_refined_cell(weights, limit)
        assert pairs == [pair for node in sorted(nodes) for pair in sorted(nodes[node], key=lambda p: p[1])]
    assert sum(op == 'skip_connect' for op, _ in genotype.normal) <= STAGES['max_skip_connect']


def test_max_epochs_must_cover_the_stages(tmp_path):
    strategy = create_strategy('pdarts', **STAGES)
    with pytest.raises(ValueError, match='max_epochs to 4'):
        run_tiny_search(strategy, max_epochs=3, loaders=tiny_loaders(n=8), workdir=str(tmp_path / 'run'))
