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


# ---------------------------------------------------------------------------------------------------------------------
# Inside the Lightning loop: the hardware-cost gradient, the step order, the alpha-gradient resets
# ---------------------------------------------------------------------------------------------------------------------

class _LoopWatch:
    """Wraps a ProxylessLightning module's steps (on train start): the order of ``weight_step`` and
    ``architecture_step`` with the parameters each changed, and at every arch update each edge label's paths, alpha,
    alpha gradient before and after ``before_architecture_update`` (the zero-path reset), and alpha after the step."""

    def __init__(self, setup=None):
        self.setup, self.steps, self.updates = setup, [], []

    def callback(self):
        import pytorch_lightning as pl
        watch = self

        class Watch(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                watch.attach(pl_module)
        return Watch()

    def attach(self, module) -> None:
        if self.setup is not None:
            self.setup(module)
        alphas, weights = module.arch_parameters(), module.weight_parameters()
        by_label = {m.label: m for m in module.supernet_modules() if isinstance(m, ProxylessEdge)}

        def wrap(name, step):
            def wrapped(*args, **kwargs):
                before = [p.detach().clone() for p in alphas + weights]
                out = step(*args, **kwargs)
                moved = [not torch.equal(b, p) for b, p in zip(before, alphas + weights)]
                self.steps.append((name, any(moved[:len(alphas)]), any(moved[len(alphas):])))
                return out
            return wrapped
        for name in ('weight_step', 'architecture_step'):
            setattr(module, name, wrap(name, getattr(module, name)))

        prepare, finish = module.before_architecture_update, module.after_architecture_update

        def grads():
            return {label: None if e.alpha.grad is None else e.alpha.grad.detach().clone() for label, e in by_label.items()}

        def before_update():
            record = {'paths': {label: e.paths for label, e in by_label.items()}, 'grad': grads(),
                      'alpha': {label: e.alpha.detach().clone() for label, e in by_label.items()},
                      'names': {label: e.names for label, e in by_label.items()}}
            prepare()
            record['grad_at_step'] = grads()
            self.updates.append(record)

        def after_update():
            finish()
            self.updates[-1]['alpha_after'] = {label: e.alpha.detach().clone() for label, e in by_label.items()}
        module.before_architecture_update, module.after_architecture_update = before_update, after_update


def _edge_table(supernet):
    """Edge labels and candidate names of the tiny space, and a fixed random cost per candidate (``none``: 0)."""
    from nni_darts_variants.cost.tables import CostTable
    _, model = supernet('two')
    names = {e.label: list(e.names) for e in unique_edges(model.modules())}
    g = torch.Generator().manual_seed(7)
    costs = {label: {n: 0.0 if n == 'none' else float(torch.rand(1, generator=g)) * 10 for n in ops}
             for label, ops in names.items()}
    return CostTable(metric='flops', const=3.0, costs=costs), costs


def _loop_search(search_with, strategy, watch, batches: int = 2):
    from nni_darts_variants.testing import tiny_loaders
    search_with(strategy, [watch.callback()], loaders=tiny_loaders(n=4 * batches, batch_size=4))
    return watch


@pytest.mark.slow  # two tiny searches per mode: about 35 s each on the loaded two-core machine
@pytest.mark.parametrize('mode', ['two', 'full_v2'])
def test_loop_architecture_gradient_carries_the_add_linear_cost_term(mode, supernet, search_with):
    """Two identical searches but the cost weight (lambda 0.5 against 0): at the first arch step (same weights, same
    samples) the alpha gradients differ by the official ``add#linear`` term, ``lambda / target * dE/dalpha`` with
    ``E = sum_l sum_k p_k c_k`` over the official ``current_prob_over_ops``: two-path, ``p = softmax(alpha[pair])`` on
    the pair (0 elsewhere); ``full_v2``, ``p = softmax(alpha)``. Hence ``p * (c - E_l)`` per edge."""
    from nni_darts_variants.cost.penalty import HardwareCost
    table, costs = _edge_table(supernet)
    target, lam = 2.0, 0.5
    runs = []
    for weight in (0.0, lam):
        cost = HardwareCost('flops', target=target, form='add#linear', lambda_=weight, table=table)
        strategy = ProxylessNAS(grad_binary_mode=mode, arch_update_every=1, warmup_epochs=0, cost=cost)
        runs.append(_loop_search(search_with, strategy, _LoopWatch(), batches=1).updates[0])
    plain, costed = runs
    assert plain['paths'] == costed['paths'] and all(
        torch.equal(plain['alpha'][k], costed['alpha'][k]) for k in plain['alpha'])
    for label, names in costed['names'].items():
        alpha, paths = costed['alpha'][label].double(), costed['paths'][label]
        c = torch.tensor([costs[label][n] for n in names], dtype=torch.float64)
        expected = torch.zeros_like(alpha)
        index = list(paths) if mode == 'two' else list(range(len(names)))
        assert len(index) == (2 if mode == 'two' else len(names))
        p = F.softmax(alpha[index], -1)
        expected[index] = lam / target * p * (c[index] - (p * c[index]).sum())
        difference = costed['grad'][label].double() - plain['grad'][label].double()
        torch.testing.assert_close(difference, expected, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope='module')
def two_path_loop(tmp_path_factory):
    """One tiny two-path search (4 batches, an arch step every 2nd, with an ``add#linear`` cost) in which ``none`` is
    made likely on every edge (alpha['none'] = 1.5 at train start), so that zero active paths occur."""
    import pytorch_lightning as pl
    from nni.nas.experiment import NasExperiment

    from nni_darts_variants.cost.penalty import HardwareCost
    from nni_darts_variants.cost.tables import CostTable
    from nni_darts_variants.testing import tiny_evaluator, tiny_loaders

    def favour_none(module):
        with torch.no_grad():
            for edge in unique_edges(module.supernet_modules()):
                edge.alpha[edge.names.index('none')] = 1.5
    probe = create_strategy('proxyless').mutate_model(tiny_space())
    costs = {e.label: {n: float(k) for k, n in enumerate(e.names)} for e in unique_edges(probe.modules())}
    cost = HardwareCost('flops', target=4.0, form='add#linear', lambda_=0.3,
                        table=CostTable(metric='flops', const=0.0, costs=costs))
    watch = _LoopWatch(setup=favour_none)
    pl.seed_everything(0, verbose=False)
    evaluator = tiny_evaluator(max_epochs=1, callbacks=[watch.callback()], loaders=tiny_loaders(n=16, batch_size=4))
    experiment = NasExperiment(tiny_space(), evaluator, ProxylessNAS(arch_update_every=2, cost=cost))
    experiment.config.experiment_working_directory = str(tmp_path_factory.mktemp('proxyless-loop'))
    experiment.run()
    return watch


def test_loop_runs_the_weight_step_before_the_arch_step(two_path_loop):
    """Official ``nas_manager.train``: every batch trains the weights, then every ``arch_update_every``-th batch
    updates the architecture. The weight step moves weights and no alpha; the arch step moves alphas and no weight."""
    steps = two_path_loop.steps
    assert [s[0] for s in steps] == ['weight_step', 'weight_step', 'architecture_step'] * 2
    for name, alpha_moved, weight_moved in steps:
        assert (alpha_moved, weight_moved) == ((True, False) if name == 'architecture_step' else (False, True)), name


def test_loop_alpha_gradient_only_on_the_pair_and_dropped_for_a_zero_active_path(two_path_loop):
    """At the arch optimizer step of the loop: an edge whose active path is ``none`` has ``grad=None`` (task and cost
    terms dropped, alpha unchanged by the step); every other edge has gradient only on its two sampled paths (cost
    term included), the others bit-identical after the step and the pair's ``logsumexp`` restored."""
    seen = Counter()
    for update in two_path_loop.updates:
        for label, paths in update['paths'].items():
            names, grad = update['names'][label], update['grad_at_step'][label]
            old, new = update['alpha'][label], update['alpha_after'][label]
            assert len(paths) == 2 and paths[0] != paths[1]
            if names[paths[0]] == 'none':
                seen['zero'] += 1
                assert update['grad'][label] is not None, 'the backward reached this alpha before the reset'
                assert grad is None, label
                assert torch.equal(old, new), label
                continue
            seen['other'] += 1
            others = [k for k in range(len(names)) if k not in paths]
            assert grad is not None and torch.all(grad[others] == 0) and torch.all(grad[list(paths)] != 0), label
            assert torch.equal(old[others], new[others]), label
            torch.testing.assert_close(torch.logsumexp(new[list(paths)], 0), torch.logsumexp(old[list(paths)], 0),
                                       rtol=1e-6, atol=1e-6)
    assert len(two_path_loop.updates) == 2 and seen['zero'] > 0 and seen['other'] > 0, seen


def test_two_candidate_edge_samples_both_in_the_arch_step():
    """Two-path mode needs only two candidates: an edge of exactly two gets both (active first), one in the weight
    phase (``_sample`` on a stand-in edge: NNI builds a ``LayerChoice`` only inside a model space)."""
    alpha = torch.zeros(2)
    edge = types.SimpleNamespace(phase='arch', grad_binary_mode='two', alpha=alpha,
                                 op_weights=lambda: F.softmax(alpha, -1))
    assert sorted(ProxylessEdge._sample(edge)) == [0, 1]
    edge.phase = 'weight'
    assert len(ProxylessEdge._sample(edge)) == 1


def test_two_path_edge_value_is_the_active_output_and_alpha_gets_the_binary_gate_gradient(supernet, edges_of):
    """Arch phase, two paths ``(i, j)``: the value is ``o_i(x)`` (gates one-hot in value), and with
    ``g_m = <dL/dout, o_m(x)>`` and ``p = softmax(alpha[(i, j)])`` the official binary-gate rule gives
    ``dL/dalpha_k = p_k (g_k - sum_m p_m g_m)`` on the pair and 0 elsewhere (computed here from the formula).
    In the weight phase only the active path runs and alpha gets no gradient, even when it requires one."""
    _, model = supernet('two')
    edges = edges_of(model, ProxylessEdge)
    edge = edges[0]
    assert edge.label == 'normal/op_2_0'  # stride 1, width 8 in the tiny space
    i, j = edge.names.index('sep_conv_3x3'), edge.names.index('dil_conv_5x5')
    x = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    edge.phase, edge.paths = 'arch', (i, j)
    out = edge(x)
    o_i, o_j = edge.run_path(i, x).detach(), edge.run_path(j, x).detach()
    torch.testing.assert_close(out.detach(), o_i, rtol=1e-12, atol=1e-12)
    c = torch.randn_like(out)
    edge.alpha.grad = None
    (c * out).sum().backward()
    g = torch.stack([(c * o_i).sum(), (c * o_j).sum()])
    p = F.softmax(edge.alpha.detach()[[i, j]], -1)
    expected = torch.zeros_like(edge.alpha)
    expected[[i, j]] = p * (g - (p * g).sum())
    torch.testing.assert_close(edge.alpha.grad, expected, rtol=1e-9, atol=1e-14)

    edge.alpha.grad = None
    edge.phase = 'weight'
    assert edge.alpha.requires_grad
    calls, handles = count_candidate_calls(edges)
    out = edge(x)
    for h in handles:
        h.remove()
    assert sum(calls.values()) == 1
    (c * out).sum().backward()
    assert edge.alpha.grad is None


def test_an_edge_used_before_any_sample_draws_one(supernet, edges_of):
    _, model = supernet('two')
    edge = edges_of(model, ProxylessEdge)[0]
    edge.paths, edge.phase = None, 'weight'
    edge(torch.randn(2, 8, 8, 8, dtype=torch.float64))
    assert edge.paths is not None and len(edge.paths) == 1  # the weight phase draws one path


def test_only_two_path_mode_keeps_the_pair_for_the_rescale(supernet, edges_of):
    """``prepare_arch_update`` keeps the two involved alphas only in two-path mode; in ``full_v2`` nothing is
    rescaled, even when the edge holds two paths."""
    for mode in ('two', 'full_v2'):
        _, model = supernet(mode)
        edge = edges_of(model, ProxylessEdge)[0]
        pair = (edge.names.index('sep_conv_3x3'), edge.names.index('max_pool_3x3'))
        edge.paths = pair
        prepare_arch_update([edge])
        if mode == 'two':
            torch.testing.assert_close(edge.alpha_before, edge.alpha.detach()[list(pair)])
        else:
            assert edge.alpha_before is None
