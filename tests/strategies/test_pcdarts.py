"""PC-DARTS: partial channels, channel shuffle, edge normalization, genotype with beta, warm-up, presets."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from search_spaces.cell import EdgeSpec
from nni_darts_variants.genotype import darts_rule
from nni_darts_variants.memory import saved_tensor_bytes
from nni_darts_variants.strategies.base import VariantLightningModule
from nni_darts_variants.strategies.darts import Darts
from nni_darts_variants.strategies.pcdarts import (
    EdgeNormalizedNode, PartialChannelEdge, PCDarts, PCDartsLightning, channel_shuffle, check_partial_channels,
)
from nni_darts_variants.testing import tiny_loaders

OPS = ['none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3',
       'dil_conv_5x5']


def arch_parameters(net: nn.Module) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for module in net.modules():
        if isinstance(module, (PartialChannelEdge, EdgeNormalizedNode)):
            params.extend(p for p in module.arch_parameters() if all(p is not q for q in params))
    return params


# ----- channel shuffle -----

@pytest.mark.parametrize('groups', [1, 2, 4, 8])
def test_channel_shuffle_is_a_permutation(groups):
    x = torch.arange(2 * 8 * 3 * 3, dtype=torch.float64).view(2, 8, 3, 3)
    shuffled = channel_shuffle(x, groups)
    assert torch.equal(channel_shuffle(shuffled, 8 // groups), x)
    # every channel of x appears exactly once in the output
    assert sorted(shuffled[0, :, 0, 0].tolist()) == sorted(x[0, :, 0, 0].tolist())
    # the first chunk of C/groups channels lands on channels 0, groups, 2 * groups, ...
    assert torch.equal(shuffled[:, ::groups], x[:, :8 // groups])


def test_channel_shuffle_rejects_indivisible_channels():
    with pytest.raises(ValueError, match='6 channels'):
        channel_shuffle(torch.zeros(1, 6, 2, 2), 4)


# ----- the partial-channel edge -----

@pytest.mark.parametrize('cell_index, stride', [(0, 1), (1, 2)])
def test_only_the_processed_slice_goes_through_the_ops(cell_index, stride, supernet):
    net = supernet(PCDarts(partial_channels_k=4)).double()
    edge = net.cells[cell_index].edges['2_0']
    assert isinstance(edge, PartialChannelEdge) and edge.partial_channels_k == 4
    channels = 8 * stride
    part = channels // 4
    x = torch.randn(2, channels, 8, 8, dtype=torch.float64, requires_grad=True)
    out = edge(x)
    assert out.shape == (2, channels, 8 // stride, 8 // stride)
    unshuffled = channel_shuffle(out, channels // 4)
    bypass = x[:, part:] if stride == 1 else nn.MaxPool2d(2, 2)(x[:, part:])
    assert torch.equal(unshuffled[:, part:], bypass)  # the bypass is untouched, bit for bit
    (unshuffled[:, :part] * torch.randn_like(unshuffled[:, :part])).sum().backward()
    assert torch.count_nonzero(x.grad[:, part:]) == 0
    assert torch.count_nonzero(x.grad[:, :part]) > 0


def test_candidates_are_built_at_c_over_k_channels(supernet):
    net = supernet(PCDarts(partial_channels_k=4))
    darts = supernet(Darts())
    for cell in (0, 1):
        pc_edge, darts_edge = net.cells[cell].edges['3_1'], darts.cells[cell].edges['3_1']
        conv = pc_edge['sep_conv_3x3'][0][2]  # pointwise conv of the first separable block
        assert conv.in_channels == darts_edge['sep_conv_3x3'][0][2].in_channels // 4
        assert pc_edge['max_pool_3x3'][1].num_features == darts_edge['max_pool_3x3'][1].num_features // 4


def test_k1_without_edge_normalization_equals_darts(supernet):
    darts = supernet(Darts(), seed=1).double()
    pc = supernet(PCDarts(partial_channels_k=1, edge_normalization=False), seed=2).double()
    pc.load_state_dict(darts.state_dict())  # same weights and alphas
    assert len(arch_parameters(pc)) == 28  # alphas only, no beta
    for a, b in zip(darts.parameters(), pc.parameters()):
        assert torch.equal(a, b)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(pc(x), darts(x), rtol=0, atol=1e-12)


def test_partial_channels_reject_bad_widths(supernet):
    with pytest.raises(ValueError, match='not divisible by partial_channels_k=3'):
        supernet(PCDarts(partial_channels_k=3))
    spec = EdgeSpec('reduce', 2, 0, channels=12, stride=2, affine=False, pool_bn=True)
    with pytest.raises(ValueError, match='odd'):
        check_partial_channels(spec, OPS, 4)
    check_partial_channels(spec, [op for op in OPS if op != 'skip_connect'], 4)  # no FactorizedReduce: fine
    with pytest.raises(ValueError, match='odd'):  # a reduction first cell: 2 * 6 channels // 4 = 3
        supernet(PCDarts(partial_channels_k=4), width=6, num_cells=1)
    with pytest.raises(ValueError, match='partial_channels_k'):
        PCDarts(partial_channels_k=0)


# ----- edge normalization -----

def test_node_weights_incoming_edges_by_softmax_beta(supernet):
    net = supernet(PCDarts()).double()
    node = net.cells[0].inputs['4']
    assert isinstance(node, EdgeNormalizedNode) and node.beta.shape == (4,)
    with torch.no_grad():
        node.beta.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0]))
    inputs = [torch.randn(2, 8, 4, 4, dtype=torch.float64) for _ in range(4)]
    beta = torch.softmax(node.beta.detach(), -1)
    assert torch.allclose(beta.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(node(inputs), sum(b * x for b, x in zip(beta, inputs)))
    params = arch_parameters(net)
    assert len(params) == 28 + 8  # an alpha per edge and a beta per node, per cell type
    assert sorted(p.numel() for p in params if p.numel() != 8) == [2, 2, 3, 3, 4, 4, 5, 5]


def _lightning(net: nn.Module, strategy) -> VariantLightningModule:
    return strategy.module_class(net, strategy)


def _set_alphas(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, PartialChannelEdge):
                module.alpha.copy_(torch.randn(len(module.alpha), generator=g) * 2)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_uniform_beta_gives_the_darts_genotype(seed, supernet):
    strategy = PCDarts()
    net = supernet(strategy)
    _set_alphas(net, seed)
    for beta in arch_parameters(net):
        if isinstance(beta, nn.Parameter) and beta.numel() != 8:
            nn.init.constant_(beta, 0.7)
    module = _lightning(net, strategy)
    for cell in module.darts_cells().values():
        alpha_only = VariantLightningModule.edge_weights(module, cell)
        assert module.discretize(module.edge_weights(cell)) == darts_rule(alpha_only)


def test_beta_enters_the_genotype(supernet):
    strategy = PCDarts()
    net = supernet(strategy)
    cell = net.cells[0]
    with torch.no_grad():
        for j in range(3):
            cell.edges[f'3_{j}'].alpha.copy_(torch.tensor([0., 0, 0, 0, 3.0 if j == 0 else 1.0, 0, 0, 0]))
        cell.inputs['3'].beta.copy_(torch.tensor([-5.0, 0.0, 0.0]))
    module = _lightning(net, strategy)
    weights = module.edge_weights(cell)
    beta = torch.softmax(torch.tensor([-5.0, 0.0, 0.0]), -1)
    alpha0 = torch.softmax(cell.edges['3_0'].alpha.detach(), -1)
    assert weights[(3, 0)]['sep_conv_3x3'] == pytest.approx(float(alpha0[4] * beta[0]))
    assert sorted(j for _, j in module.discretize(weights)[3]) == [1, 2]  # alpha alone would keep input 0
    alpha_only = VariantLightningModule.edge_weights(module, cell)
    assert 0 in [j for _, j in darts_rule(alpha_only)[3]]


# ----- search loop -----

def test_arch_parameters_frozen_until_the_warmup_boundary_and_moving_right_after(search_with):
    """warmup_epochs=1 of max_epochs=2: no arch step and no alpha/beta change in epoch 0; an arch step at the first
    batch of epoch 1, after which every alpha and beta has changed."""
    import pytorch_lightning as pl

    class Watch(pl.Callback):
        def __init__(self):
            self.arch_steps, self.states = [], []

        def on_train_start(self, trainer, module):
            self.states.append([p.detach().clone() for p in module.arch_parameters()])
            for opt in trainer.optimizers:
                if getattr(opt, 'is_arch_optimizer', False):
                    def step(*args, _step=opt.step, **kwargs):
                        self.arch_steps.append((trainer.current_epoch, self.batch_idx))
                        return _step(*args, **kwargs)
                    opt.step = step

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batch_idx = batch_idx

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:
                self.states.append([p.detach().clone() for p in module.arch_parameters()])

        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 0:
                self.states.append([p.detach().clone() for p in module.arch_parameters()])

    watch = Watch()
    search_with(PCDarts(warmup_epochs=1), [watch], loaders=tiny_loaders(n=8, batch_size=4), max_epochs=2)
    start, end_of_warmup, after_first_step = watch.states
    assert len(start) == 28 + 8
    assert all(torch.equal(a, b) for a, b in zip(start, end_of_warmup))
    assert watch.arch_steps == [(1, 0), (1, 1)]
    assert all(not torch.equal(a, b) for a, b in zip(end_of_warmup, after_first_step))


def test_defaults_and_imagenet_preset(supernet):
    default = PCDarts()
    assert (default.partial_channels_k, default.warmup_epochs, default.arc_learning_rate) == (4, 15, 6e-4)
    assert default.edge_normalization and default.arc_betas == (0.5, 0.999) and default.arc_weight_decay == 1e-3
    imagenet = PCDarts.imagenet()
    assert (imagenet.partial_channels_k, imagenet.warmup_epochs, imagenet.arc_learning_rate) == (2, 35, 6e-3)
    assert imagenet.arc_gradient_clip_val == 5.0
    assert PCDarts.imagenet(warmup_epochs=3).warmup_epochs == 3
    assert PCDarts.smoke_kwargs()['warmup_epochs'] == 0
    assert isinstance(_lightning(supernet(default), default), PCDartsLightning)


def _darts_edge_accounting(net, x):
    """Saved-for-backward bytes of a DARTS supernet's forward, split by an independent count (own pack hook):
    ``total``; ``mixture``: saved inside the mixed edges, except the edge input itself (it is not sliced: a
    view keeps its whole storage); ``bypass``: the int64 indices a ``MaxPool2d(2, 2)`` would save on every stride-2
    edge at the edge's full width."""
    from nni_darts_variants.strategies.base import MixedEdge
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen, inputs = set(), []
    count = {'total': 0, 'mixture': 0, 'bypass': 0}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] not in params and key not in seen:
            seen.add(key)
            count['total'] += key[1]
            if inputs and key[0] != inputs[-1]:
                count['mixture'] += key[1]
        return tensor

    def enter(edge, args):
        inputs.append(args[0].untyped_storage().data_ptr())
        if not isinstance(edge['skip_connect'], nn.Identity):  # a stride-2 edge (FactorizedReduce skip)
            n, c, h, w = args[0].shape
            count['bypass'] += n * c * (h // 2) * (w // 2) * 8

    def leave(edge, args, output):
        inputs.pop()

    for module in net.modules():
        if isinstance(module, MixedEdge):
            module.register_forward_pre_hook(enter)
            module.register_forward_hook(leave)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x).sum()
    return count


@pytest.mark.parametrize('k', [2, 4])
def test_partial_channels_activation_memory_follows_the_mechanism(k, supernet, monkeypatch):
    """Only ``C/K`` channels enter the candidates, so what the mixture saves scales by ``1/K``; everything outside the
    edges is unchanged; the bypass adds its max-pool indices on stride-2 edges for the other ``C (1 - 1/K)``:
    ``bytes(K) = total - mixture (1 - 1/K) + bypass (1 - 1/K)``. K=2 (0.53 of DARTS here) and K=4 (0.30) are
    told apart by far more than the 1% allowed. PC-DARTS's edges run NCHW, so the DARTS reference does too (by
    default its edges copy their input to channels-last, a copy PC-DARTS does not make)."""
    from nni_darts_variants.strategies.base import MixedEdge
    monkeypatch.setattr(MixedEdge, 'channels_last_inside', False)
    x = torch.randn(8, 1, 8, 8)
    count = _darts_edge_accounting(supernet(Darts()), x)
    expected = count['total'] - (count['mixture'] - count['bypass']) * (1 - 1 / k)
    pc = supernet(PCDarts(partial_channels_k=k, edge_normalization=False))
    measured = saved_tensor_bytes(lambda: pc(x).sum(), pc.parameters())
    assert measured == pytest.approx(expected, rel=0.01)


def test_imagenet_search_lr_warmup_option():
    """``train.lr_warmup_epochs`` (official ``train_search_imagenet.py`` for batches over 256): during the first
    5 epochs the cosine LR times ``(epoch + 1) / 5``; then the plain cosine; 0 (default) is the plain cosine."""
    import math
    from nni_darts_variants.search.evaluator import SearchClassification
    lr, lr_min, epochs = 0.5, 0.0, 50
    cosine = [lr_min + (lr - lr_min) * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    for warmup in (0, 5):
        module = SearchClassification(learning_rate=lr, learning_rate_min=lr_min, max_epochs=epochs,
                                      lr_warmup_epochs=warmup)
        module.set_model(nn.Linear(2, 2))
        (optimizer,), (config,) = module.configure_optimizers()
        seen = []
        for _ in range(epochs):
            seen.append(optimizer.param_groups[0]['lr'])
            optimizer.step()
            config['scheduler'].step()
        expected = [c * ((e + 1) / warmup if e < warmup else 1.0) for e, c in enumerate(cosine)]
        assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)
