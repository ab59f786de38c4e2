"""ProxylessNAS: invariants of algorithms.md section 3 (binarized paths, two-path update, rescaling, export)."""
from __future__ import annotations

import types
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from nni_darts_variants import create_strategy
from nni_darts_variants.strategies.proxyless import (ProxylessEdge, ProxylessLightning, ProxylessNAS,
                                                     finish_arch_update, gate_to_alpha_gradient, prepare_arch_update,
                                                     unique_edges)
from nni_darts_variants.testing import tiny_space


@pytest.fixture
def supernet(supernet):
    """``supernet(mode='two', seed=0, dtype=float64)``: the shared fixture's ProxylessNAS net, alphas ~ N(0, 0.5)."""
    def build(mode: str = 'two', seed: int = 0, dtype=torch.float64):
        strategy = create_strategy('proxyless', grad_binary_mode=mode)
        model = supernet(strategy, seed=seed, dtype=dtype)
        with torch.no_grad():
            for alpha in strategy._arch_parameters.values():
                alpha.normal_(0, 0.5)
        return strategy, model
    return build


def resample(edges: list[ProxylessEdge], phase: str) -> None:
    memo: dict = {}
    for edge in edges:
        edge.phase = phase
        memo.update(edge.resample(memo))


def count_candidate_calls(edges: list[ProxylessEdge]):
    calls: Counter = Counter()
    handles = [edge[name].register_forward_hook(lambda *_, e=edge: calls.update([id(e)]))
               for edge in edges for name in edge.names]
    return calls, handles


def loss_of(model, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=g)
    return F.cross_entropy(model(x), y)


def candidate_grads(edge):
    """{candidate index: whether any of its parameters has a gradient} for candidates with parameters."""
    return {k: any(p.grad is not None for p in edge[name].parameters())
            for k, name in enumerate(edge.names) if list(edge[name].parameters())}


@pytest.mark.parametrize('phase,expected', [('weight', 1), ('arch', 2)])
def test_candidates_run_per_edge(phase, expected, supernet, edges_of):
    _, model = supernet('two')
    edges = edges_of(model, ProxylessEdge)
    resample(edges, phase)
    calls, handles = count_candidate_calls(edges)
    loss_of(model).backward()
    for h in handles:
        h.remove()
    assert len(calls) == len(edges)
    assert all(n == expected for n in calls.values())


@pytest.mark.parametrize('phase', ['weight', 'arch'])
def test_only_active_path_weights_get_gradients(phase, supernet, edges_of):
    _, model = supernet('two')
    edges = edges_of(model, ProxylessEdge)
    resample(edges, phase)
    loss_of(model).backward()
    for edge in edges:
        for k, has_grad in candidate_grads(edge).items():
            assert has_grad == (k == edge.active), (edge.label, edge.names[k])
        if phase == 'weight':
            assert edge.alpha.grad is None


def test_weight_step_same_sample_for_a_label(supernet, edges_of):
    _, model = supernet()
    edges = edges_of(model, ProxylessEdge)
    resample(edges, 'weight')
    by_label: dict = {}
    for edge in edges:
        by_label.setdefault(edge.label, set()).add(edge.paths)
    assert all(len(s) == 1 for s in by_label.values())
    assert len(by_label) < len(edges), 'cells of a type must share labels in the tiny space'


def test_two_path_gradient_only_on_sampled_pair_and_sums_to_zero(supernet, edges_of):
    _, model = supernet('two')
    edges = edges_of(model, ProxylessEdge)
    resample(edges, 'arch')
    loss_of(model).backward()
    for edge in unique_edges(model.modules()):
        pair = list(edge.paths)
        assert len(pair) == 2 and pair[0] != pair[1]
        grad = edge.alpha.grad
        others = [k for k in range(len(edge.names)) if k not in pair]
        assert torch.all(grad[others] == 0)
        assert abs(float(grad[pair].sum())) <= 1e-12 * max(1.0, float(grad.abs().max()))
    assert any(float(e.alpha.grad.abs().sum()) > 0 for e in unique_edges(model.modules()))


def test_two_path_update_keeps_unsampled_probabilities(supernet, edges_of):
    strategy, model = supernet('two')
    edges = edges_of(model, ProxylessEdge)
    resample(edges, 'arch')
    uniq = unique_edges(model.modules())
    none_edge = uniq[0]  # force the zero path active on one edge: no update for it
    none_edge.paths = (none_edge.names.index('none'), 4)
    for edge in edges:
        if edge.label == none_edge.label:
            edge.paths = none_edge.paths
    alphas = list(strategy._arch_parameters.values())
    before = [a.detach().clone() for a in alphas]
    before_by_label = {e.label: e.alpha.detach().clone() for e in uniq}
    optimizer = torch.optim.Adam(alphas, lr=0.05, betas=(0.0, 0.999), weight_decay=0.0)
    optimizer.zero_grad()
    loss_of(model).backward()
    prepare_arch_update(uniq)
    optimizer.step()
    finish_arch_update(uniq)
    moved = 0
    for edge in uniq:
        old, new, pair = before_by_label[edge.label], edge.alpha.detach(), list(edge.paths)
        if edge is none_edge:
            assert torch.equal(old, new), 'a zero active path must not update alpha'
            continue
        others = [k for k in range(len(old)) if k not in pair]
        assert torch.equal(old[others], new[others]), 'unsampled alphas must be bit-identical'
        assert torch.allclose(torch.exp(new[pair]).sum(), torch.exp(old[pair]).sum(), rtol=1e-6, atol=0)
        assert torch.allclose(F.softmax(new, -1)[others], F.softmax(old, -1)[others], rtol=1e-6, atol=0)
        moved += not torch.equal(old[pair], new[pair])
    assert moved > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, alphas))


def test_gate_gradient_is_softmax_jacobian():
    g = torch.Generator().manual_seed(0)
    alpha = torch.randn(6, dtype=torch.float64, generator=g).requires_grad_()
    gate_grads = torch.randn(6, dtype=torch.float64, generator=g)
    (F.softmax(alpha, -1) * gate_grads).sum().backward()
    ours = gate_to_alpha_gradient(gate_grads, F.softmax(alpha.detach(), -1))
    assert torch.allclose(ours, alpha.grad, rtol=1e-12, atol=1e-14)
    assert abs(float(ours.sum())) < 1e-14


def test_full_v2_equals_darts_gradient_for_linear_loss(supernet, edges_of):
    _, model = supernet('full_v2')
    edges = edges_of(model, ProxylessEdge)
    edge = edges[0]
    assert edge.label == 'normal/op_2_0'  # stride 1, width 8 in the tiny space
    x = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    c = torch.randn_like(edge.run_path(edge.names.index('sep_conv_3x3'), x))
    edge.phase = 'arch'
    edge.paths = (edge.names.index('sep_conv_3x3'),)
    calls, handles = count_candidate_calls(edges)
    out = edge(x)
    assert sum(calls.values()) == 1, 'full_v2 forward must run only the active path'
    for h in handles:
        h.remove()
    (c * out).sum().backward()
    ours = edge.alpha.grad.clone()
    reference_alpha = edge.alpha.detach().clone().requires_grad_()
    probs = F.softmax(reference_alpha, -1)
    mixed = sum(p * edge.run_path(k, x) for k, p in enumerate(probs))
    (c * mixed).sum().backward()
    assert torch.allclose(ours, reference_alpha.grad, rtol=1e-9, atol=1e-12)
    assert abs(float(ours.sum())) < 1e-10


def test_weight_sampling_follows_softmax(supernet, edges_of):
    _, model = supernet(dtype=torch.float32)
    edges = edges_of(model, ProxylessEdge)
    edge = edges[0]
    edge.phase = 'weight'
    torch.manual_seed(3)
    n = 4000
    counts = Counter(edge._sample()[0] for _ in range(n))
    expected = F.softmax(edge.alpha.detach().double(), -1).numpy()
    expected = expected / expected.sum() * n
    observed = [counts.get(k, 0) for k in range(len(expected))]
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_zero_active_keeps_alpha_gradient_none(supernet, edges_of):
    _, model = supernet('full_v2')
    edges = edges_of(model, ProxylessEdge)
    resample(edges, 'arch')
    uniq = unique_edges(model.modules())
    for edge in edges:
        edge.paths = (edge.names.index('none'),)
    loss_of(model).backward()
    prepare_arch_update(uniq)
    assert all(e.alpha.grad is None for e in uniq)


def test_export_is_argmax_not_a_sample(supernet):
    strategy, model = supernet()
    module = ProxylessLightning(model, strategy)
    first = module.export()
    torch.manual_seed(123)
    assert module.export() == first
    for edge in unique_edges(model.modules()):
        node, j = map(int, edge.label.split('_')[-2:])
        if j in first[edge.label.split('/')[0] + f'/input_{node}']:
            weights = F.softmax(edge.alpha.detach(), -1)
            weights[edge.names.index('none')] = -1
            assert first[edge.label] == edge.names[int(weights.argmax())]
    assert tiny_space().check_contains(first) is None


def test_arch_step_every_n_batches():
    strategy = create_strategy('proxyless')
    module = ProxylessLightning(strategy.mutate_model(tiny_space()), strategy)
    module._trainer = types.SimpleNamespace(current_epoch=0)
    assert [module.arch_update_enabled(i) for i in range(10)] == [(i + 1) % 5 == 0 for i in range(10)]


def test_defaults_and_validation():
    strategy = ProxylessNAS()
    assert strategy.arc_learning_rate == 1e-3 and strategy.arc_betas == (0.0, 0.999)
    assert strategy.arc_weight_decay == 0 and strategy.arch_update_every == 5
    assert strategy.grad_binary_mode == 'two'
    with pytest.raises(ValueError, match='grad_binary_mode'):
        ProxylessNAS(grad_binary_mode='full')
    with pytest.raises(ValueError, match='arch_update_every'):
        ProxylessNAS(arch_update_every=0)
