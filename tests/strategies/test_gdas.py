"""GDAS: one Gumbel-max sampled candidate per edge, shared per cell type, straight-through gradients, tau schedule."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from nni_darts_variants.memory import saved_tensor_bytes
from nni_darts_variants.strategies import gdas
from nni_darts_variants.strategies.darts import Darts
from nni_darts_variants.strategies.gdas import Gdas, GdasLightning, GumbelMaxEdge, gumbel_noise, linear_temperature
from nni_darts_variants.testing import run_tiny_search, tiny_loaders, tiny_space

CONV_OPS = ('sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')


def resample(edges: list[GumbelMaxEdge]) -> dict:
    """Draw a fresh sample on every edge, one per label (as the strategy does before a step)."""
    memo: dict = {}
    for edge in edges:
        memo.update(edge.resample(memo))
    return memo


def _candidate_calls_per_edge(net, edges) -> list[int]:
    """How many candidates each of ``edges`` (modules of ``net``) runs in one forward."""
    calls: dict[int, int] = defaultdict(int)
    for edge in edges:
        for name in edge.names:
            edge[name].register_forward_hook(lambda m, i, o, e=id(edge): calls.__setitem__(e, calls[e] + 1))
    net(torch.randn(2, 1, 8, 8))
    return [calls[id(e)] for e in edges]


def test_gdas_runs_one_candidate_per_edge_where_nni_gumbel_darts_runs_all(supernet, edges_of):
    from nni.nas.oneshot.pytorch.supermodule.differentiable import DifferentiableMixedLayer
    from nni.nas.strategy import GumbelDARTS
    torch.manual_seed(0)
    nni_net = GumbelDARTS().mutate_model(tiny_space())
    assert set(_candidate_calls_per_edge(nni_net, edges_of(nni_net, DifferentiableMixedLayer))) == {8}
    net = supernet(Gdas())
    resample(edges_of(net, GumbelMaxEdge))
    assert set(_candidate_calls_per_edge(net, edges_of(net, GumbelMaxEdge))) == {1}


def test_exactly_one_candidate_per_edge_shared_by_cells_of_a_type(supernet, edges_of):
    net = supernet(Gdas(), num_cells=5)  # normal cells 0, 2, 4; reduction cells 1, 3
    edges = edges_of(net, GumbelMaxEdge)
    calls: dict[int, list[str]] = defaultdict(list)
    for edge in edges:
        for name in edge.names:
            edge[name].register_forward_hook(lambda m, i, o, e=edge, n=name: calls[id(e)].append(n))
    for _ in range(5):
        calls.clear()
        resample(edges)
        net(torch.randn(2, 1, 8, 8))
        ran_by_label: dict[str, set[str]] = defaultdict(set)
        for edge in edges:
            assert calls[id(edge)] == [edge.names[edge.sampled_index]]
            ran_by_label[edge.label].update(calls[id(edge)])
        assert len(ran_by_label) == 28 and all(len(v) == 1 for v in ran_by_label.values())


def test_forward_value_is_the_sampled_candidate_output(supernet):
    net = supernet(Gdas()).double().eval()
    for edge in (net.cells[0].edges['4_1'], net.cells[1].edges['2_0']):
        x = torch.randn(2, 8 if edge is net.cells[0].edges['4_1'] else 16, 8, 8, dtype=torch.float64)
        for _ in range(10):
            edge.resample({})
            expected = edge[edge.names[edge.sampled_index]](x)
            assert torch.allclose(edge(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('tau', [10.0, 0.1])
def test_selection_frequencies_follow_softmax_alpha(tau, supernet):
    torch.manual_seed(0)
    edge = supernet(Gdas()).cells[0].edges['2_0']
    with torch.no_grad():
        edge.alpha.copy_(torch.tensor([0.5, -1.0, 0.0, 1.0, 1.5, -0.5, 0.2, 0.8]))
    edge.temperature = tau
    n = 8000
    counts = torch.zeros(8)
    for _ in range(n):
        edge.resample({})
        counts[edge.sampled_index] += 1
    expected = torch.softmax(edge.alpha.detach(), -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32  # the 0.999 quantile of chi-square with 7 degrees of freedom


def _sample_a_conv(edge: GumbelMaxEdge) -> None:
    for _ in range(200):
        edge.resample({})
        if edge.names[edge.sampled_index] in CONV_OPS:
            return
    raise AssertionError('no convolution sampled')


def test_gradients_reach_only_the_sampled_op_and_every_alpha(supernet):
    net = supernet(Gdas()).double()
    edge = net.cells[0].edges['3_1']
    edge.temperature = 1.0
    _sample_a_conv(edge)
    sampled = edge.names[edge.sampled_index]
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    (edge(x) * torch.randn(2, 8, 8, 8, dtype=torch.float64)).sum().backward()
    for name in edge.names:
        grads = [p.grad for p in edge[name].parameters()]
        if name == sampled:
            assert grads and all(g is not None and torch.count_nonzero(g) > 0 for g in grads)
        else:
            assert all(g is None for g in grads), f'{name} was not sampled but got a gradient'
    alpha_grad = edge.alpha.grad
    assert torch.all(alpha_grad != 0)
    assert abs(float(alpha_grad.sum())) < 1e-10 * float(alpha_grad.abs().sum())


def test_gumbel_noise_is_drawn_again_when_infinite(monkeypatch):
    draws = iter([torch.tensor([0.5, 0.0]), torch.tensor([0.5, 2.0])])
    monkeypatch.setattr(gdas, '_exponential', lambda like: next(draws))
    noise = gumbel_noise(torch.zeros(2))
    assert torch.isfinite(noise).all()
    assert torch.allclose(noise, -torch.log(torch.tensor([0.5, 2.0])))


def test_linear_temperature_schedule():
    assert linear_temperature(0, 250, 10.0, 0.1) == 10.0
    assert linear_temperature(249, 250, 10.0, 0.1) == pytest.approx(0.1)
    assert linear_temperature(1, 3, 10.0, 0.1) == pytest.approx(5.05)
    assert linear_temperature(0, 1, 10.0, 0.1) == 10.0
    with pytest.raises(ValueError, match='tau_min'):
        Gdas(tau_max=0.1, tau_min=1.0)


class _Recording(GdasLightning):
    events: list = []

    def weight_step(self, trn_batch, batch_idx):
        self.events.append(('weight', self.trainer.current_epoch, self._temperatures()))
        return super().weight_step(trn_batch, batch_idx)

    def architecture_step(self, trn_batch, val_batch, batch_idx):
        self.events.append(('arch', self.trainer.current_epoch, self._temperatures()))
        return super().architecture_step(trn_batch, val_batch, batch_idx)

    def resample(self):
        sample = super().resample()
        self.events.append(('resample', all('/op_' in k and 'gumbel' not in k for k in sample)))
        return sample

    def _temperatures(self) -> set[float]:
        return {m.temperature for m in self.supernet_modules() if isinstance(m, GumbelMaxEdge)}


class _RecordingGdas(Gdas):
    module_class = _Recording


def test_search_order_fresh_samples_and_annealing():
    _Recording.events = []
    run_tiny_search(_RecordingGdas(), max_epochs=2, loaders=tiny_loaders(n=8, batch_size=4))
    steps = [e for e in _Recording.events if e[0] != 'resample']
    assert [e[0] for e in steps] == ['weight', 'arch'] * 4  # weight step first, as in the official GDAS
    temperatures = {e[1]: e[2] for e in steps}
    assert temperatures[0] == {10.0} and len(temperatures[1]) == 1
    assert temperatures[1].pop() == pytest.approx(0.1)  # tau(last) = tau_min
    kinds = [e[0] for e in _Recording.events]
    assert all(kinds[i - 1] == 'resample' for i, k in enumerate(kinds) if k != 'resample')  # a fresh sample each
    assert all(e[1] for e in _Recording.events if e[0] == 'resample')  # a clean NNI sample, no private noise keys


def test_defaults():
    strategy = Gdas()
    assert (strategy.tau_max, strategy.tau_min, strategy.arc_learning_rate) == (10.0, 0.1, 3e-4)
    assert strategy.arc_betas == (0.5, 0.999) and strategy.arc_weight_decay == 1e-3 and strategy.warmup_epochs == 0


def test_activation_memory_is_that_of_the_sampled_path(supernet, edges_of):
    """With every edge's sample forced to ``sep_conv_3x3`` (logit +50), a GDAS forward saves what a DARTS supernet
    with ``sep_conv_3x3`` as its only candidate saves (one path and its weight), not the 8-candidate mixture."""
    x = torch.randn(8, 1, 8, 8)
    net = supernet(Gdas())
    edges = edges_of(net, GumbelMaxEdge)
    for edge in edges:
        with torch.no_grad():
            edge.alpha[edge.names.index('sep_conv_3x3')] = 50.0
    resample(edges)
    assert {edge.names[edge.sampled_index] for edge in edges} == {'sep_conv_3x3'}
    single = supernet(Darts(), operations=['sep_conv_3x3'])
    full = supernet(Darts())
    gdas_bytes = saved_tensor_bytes(lambda: net(x).sum(), net.parameters())
    single_bytes = saved_tensor_bytes(lambda: single(x).sum(), single.parameters())
    assert gdas_bytes == pytest.approx(single_bytes, rel=0.01)
    assert gdas_bytes < 0.5 * saved_tensor_bytes(lambda: full(x).sum(), full.parameters())


def test_final_bn_relu_option_of_the_space(supernet):
    """The official GDAS network's ``lastact``: the classifier sees ``pool(relu(bn(last cell)))``; by default
    ``pool(last cell)``; the option adds no state to the default network."""
    from search_spaces import DartsSpace
    for final in (False, True):
        space = DartsSpace(width=8, num_cells=3, dataset='digits', final_bn_relu=final)
        net = supernet(Darts(), space=space)
        seen = {}
        net.cells[-1].register_forward_hook(lambda m, i, o: seen.__setitem__('cell', o.detach()))
        net.classifier.register_forward_hook(lambda m, i, o: seen.__setitem__('pooled', i[0].detach()))
        net(torch.randn(4, 1, 8, 8))
        cell = seen['cell']
        if final:
            mean, var = cell.mean((0, 2, 3), keepdim=True), cell.var((0, 2, 3), unbiased=False, keepdim=True)
            cell = torch.relu((cell - mean) / torch.sqrt(var + 1e-5))
        torch.testing.assert_close(seen['pooled'], cell.mean((2, 3)), rtol=1e-4, atol=1e-5)
    assert DartsSpace(width=8, num_cells=3, dataset='digits').state_dict().keys() == \
        DartsSpace(width=8, num_cells=3, dataset='digits', final_bn_relu=False).state_dict().keys()


@pytest.mark.parametrize('reset', ['zeros', 'none'])
def test_unsampled_weights_keep_momentum_only_with_zero_gradients(reset, search_with, edges_of):
    """Official GDAS ran on PyTorch 1.x, whose ``zero_grad`` filled zeros: the weights of an op used in an earlier
    weight step keep moving by momentum in a step where it is not sampled. ``weight_grad_reset='none'``: they stay."""
    import pytorch_lightning as pl
    steps = []  # per weight step: (ids of params without gradient, ids of params that moved)
    all_ids: list[int] = []

    class Watch(pl.Callback):
        def on_train_start(self, trainer, module):
            params = [p for e in edges_of(module.training_module, GumbelMaxEdge) for op in CONV_OPS for p in e[op].parameters()]
            all_ids.extend(id(p) for p in params)
            opt = next(o for o in trainer.optimizers if not getattr(o, 'is_arch_optimizer', False))
            for group in opt.param_groups:  # the official weight optimizer: SGD with momentum and decay
                group.update(momentum=0.9, weight_decay=5e-4)

            def step(*args, _step=opt.step, **kwargs):
                unused = {id(p) for p in params if p.grad is None or not bool(p.grad.ne(0).any())}
                before = [p.detach().clone() for p in params]
                out = _step(*args, **kwargs)
                steps.append((unused, {id(p) for p, b in zip(params, before) if not torch.equal(p, b)}))
                return out
            opt.step = step

    search_with(Gdas(weight_grad_reset=reset), [Watch()], loaders=tiny_loaders(n=16, batch_size=8))
    used_before: set[int] = set()
    stale = stale_moved = 0
    for unused, moved in steps:
        for i in unused & used_before:
            stale += 1
            stale_moved += i in moved
        used_before |= set(all_ids) - unused
    assert stale > 0, 'no op used in an earlier step was unsampled later'
    assert stale_moved == (stale if reset == 'zeros' else 0)


def test_edge_gradient_is_the_straight_through_gumbel_softmax_at_the_temperature(supernet, edges_of):
    """Value: the sampled candidate's output (one-hot weight 1). Gradient (straight-through): ``<dL/dout, o_k(x)> *
    d h_k / d alpha`` with ``h = softmax((log_softmax(alpha) + g) / tau)`` (official ``GDAS.py``), at tau = 3. An edge
    used before any resample draws its own sample."""
    import torch.nn.functional as F
    net = supernet(Gdas(), dtype=torch.float64)
    edge = edges_of(net, GumbelMaxEdge)[0]
    assert edge.label == 'normal/op_2_0'  # stride 1, width 8 in the tiny space
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    out = edge(x)  # before any resample
    assert edge.sampled_index is not None
    edge.temperature = 3.0
    resample(edges_of(net, GumbelMaxEdge))
    k, noise = edge.sampled_index, edge._noise.detach().clone()
    out = edge(x)
    reference_out = edge[edge.names[k]](x).detach()
    torch.testing.assert_close(out.detach(), reference_out, rtol=1e-12, atol=1e-12)
    c = torch.randn_like(out)
    edge.alpha.grad = None
    (c * out).sum().backward()
    alpha = edge.alpha.detach().clone().requires_grad_()
    h = F.softmax((F.log_softmax(alpha, -1) + noise) / 3.0, -1)
    (h[k] * (c * reference_out).sum()).backward()
    torch.testing.assert_close(edge.alpha.grad, alpha.grad, rtol=1e-9, atol=1e-12)
    assert float(alpha.grad.abs().max()) > 0


def _free_input(n_candidates: int, n_chosen: int | None, reduction: str, alpha: torch.Tensor):
    from nni.mutable import frozen_context
    from torch import nn

    from nni_darts_variants.strategies.gdas import GumbelMaxInput
    with frozen_context():  # NNI's mixed input checks its choice's context when built outside a model space
        module = GumbelMaxInput(n_candidates, n_chosen, nn.Parameter(alpha.clone()), nn.Softmax(-1), 'pick')
    module.reduction = reduction
    return module


@pytest.mark.parametrize('reduction', ['sum', 'mean'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_free_input_choice_is_gumbel_top_k_with_straight_through_weights(reduction, seed):
    """GDAS on a free ``InputChoice``: the ``n_chosen`` largest ``log_softmax(alpha) + g`` are taken (Gumbel-top-k),
    the value is their plain sum (or mean), and alpha's gradient is that of ``sum_k <c, x_k> h_k`` with
    ``h = softmax((log_softmax(alpha) + g) / tau)`` (straight-through), at tau = 3; computed here from the formula."""
    import torch.nn.functional as F
    torch.manual_seed(seed)
    alpha = torch.randn(5, dtype=torch.float64)
    module = _free_input(5, 2, reduction, alpha)
    module.temperature = 3.0
    module.resample({})
    noise = module._noise.detach().clone()
    expected_chosen = sorted(torch.topk(F.log_softmax(alpha, -1) + noise, 2).indices.tolist())
    assert module.chosen == expected_chosen
    xs = [torch.randn(2, 3, dtype=torch.float64) for _ in range(5)]
    out = module(xs)
    value = sum(xs[j] for j in expected_chosen)
    value = value / 2 if reduction == 'mean' else value
    torch.testing.assert_close(out.detach(), value, rtol=1e-12, atol=1e-12)
    c = torch.randn_like(out)
    (c * out).sum().backward()
    reference = alpha.clone().requires_grad_()
    h = F.softmax((F.log_softmax(reference, -1) + noise) / 3.0, -1)
    total = sum((c * xs[j]).sum() * h[j] for j in expected_chosen)
    (total / 2 if reduction == 'mean' else total).backward()
    torch.testing.assert_close(module._arch_alpha.grad, reference.grad, rtol=1e-9, atol=1e-12)
    assert float(reference.grad.abs().max()) > 0


def test_free_input_choice_without_n_chosen_takes_one_input():
    module = _free_input(4, None, 'sum', torch.zeros(4, dtype=torch.float64))
    module.resample({})
    assert len(module.chosen) == 1
