"""DARTS invariants (algorithms.md §1): mixed edge, order 1 vs 2, the finite-difference HVP, optimizer separation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from nni_darts_variants import create_strategy
from nni_darts_variants.strategies.darts import Darts, DartsLightning, virtual_step
from nni_darts_variants.testing import tiny_evaluator, tiny_loaders, tiny_space


def _supernet(strategy, dtype=torch.float32, seed=0):
    """A mutated tiny space wrapped in the strategy's Lightning module (no trainer)."""
    torch.manual_seed(seed)
    space = tiny_space()
    strategy.mutate_model(space)
    evaluator = tiny_evaluator()
    module = strategy.configure_oneshot_module(evaluator.module)
    module.set_model(space)
    module.to(dtype)
    return module, space


def test_mixed_edge_is_softmax_weighted_sum_of_all_candidates():
    module, space = _supernet(create_strategy('darts'))
    edge = space.cells[0].edges['3_1']
    calls = []
    hooks = [edge[name].register_forward_hook(lambda m, i, o, n=name: calls.append(n)) for name in edge.names]
    x = torch.randn(2, 8, 8, 8)
    out = edge(x)
    for h in hooks:
        h.remove()
    assert len(edge.names) == 8 and edge.zero_names == {'none'}  # a zero output is left out of the sum
    assert sorted(calls) == sorted(n for n in edge.names if n != 'none')
    weights = torch.softmax(edge.alpha, -1)
    expected = sum(w * edge[n](x) for w, n in zip(weights, edge.names))
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.isclose(edge.op_weights().sum(), torch.tensor(1.0))


def test_large_logit_selects_its_op():
    module, space = _supernet(create_strategy('darts'))
    edge = space.cells[0].edges['2_0']
    with torch.no_grad():
        edge.alpha.zero_()
        edge.alpha[edge.names.index('avg_pool_3x3')] = 50.0
    x = torch.randn(2, 8, 8, 8)
    assert torch.allclose(edge(x), edge['avg_pool_3x3'](x), atol=1e-5)


def test_alphas_shared_per_cell_type_and_shapes():
    module, space = _supernet(create_strategy('darts'))
    normal = [c for c in space.cells if not c.reduction]
    reduce = [c for c in space.cells if c.reduction]
    assert len(reduce) == 2 and len(normal) == 1
    labels = {e.label for c in space.cells for e in c.edges.values()}
    assert len(labels) == 28  # 14 edges x 2 cell types
    alphas = module.arch_parameters()
    assert len(alphas) == 28 and all(a.shape == (8,) for a in alphas)
    assert reduce[0].edges['4_2'].alpha is reduce[1].edges['4_2'].alpha


def _batches(dtype):
    (x, y), = [next(iter(tiny_loaders(n=8, batch_size=8)[0]))]
    (xv, yv), = [next(iter(tiny_loaders(n=8, batch_size=8, seed=5)[1]))]
    return (x.to(dtype), y), (xv.to(dtype), yv)


class _FakeTrainer:
    current_epoch = 0


def _attach_optimizer(module, lr=0.1, momentum=0.9, weight_decay=3e-4):
    """Give the module a real SGD weight optimizer without a Lightning trainer."""
    opt = torch.optim.SGD(module.weight_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    module.weight_optimizer = lambda: opt
    return opt


def _arch_grads(module, trn, val):
    for a in module.arch_parameters():
        a.grad = None
    module.compute_arch_gradients(trn, val, 0)
    return [a.grad.clone() for a in module.arch_parameters()]


def _no_log(module):
    """Run the module's hooks without a Lightning trainer: no logging, plain backward."""
    module.log = lambda *a, **k: None
    module.training_module.log = lambda *a, **k: None
    module.manual_backward = lambda loss, **kwargs: loss.backward(**kwargs)


def test_second_order_with_zero_xi_equals_first_order_exactly():
    first, _ = _supernet(Darts(order=1), torch.float64)
    second = copy.deepcopy(first)
    second.strategy = Darts(order=2, unrolled_lr=0.0)
    for m in (first, second):
        _no_log(m)
        _attach_optimizer(m)
    trn, val = _batches(torch.float64)
    g1 = _arch_grads(first, trn, val)
    g2 = _arch_grads(second, trn, val)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_second_order_restores_weights_exactly_and_differs_from_first_order():
    module, _ = _supernet(Darts(order=2, unrolled_lr=0.5), torch.float64)
    _no_log(module)
    _attach_optimizer(module)
    before = [w.detach().clone() for w in module.weight_parameters()]
    trn, val = _batches(torch.float64)
    g2 = _arch_grads(module, trn, val)
    assert all(torch.equal(a, b) for a, b in zip(before, module.weight_parameters()))
    module.strategy = Darts(order=1)
    g1 = _arch_grads(module, trn, val)
    assert any(not torch.allclose(a, b) for a, b in zip(g1, g2))


SMOOTH_OPS = ['none', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3', 'dil_conv_3x3']


def test_finite_difference_hvp_matches_exact_double_backward():
    """On a smooth network (ReLU -> tanh, no max-pool, frozen batch statistics) the finite differences with
    ``eps = 0.01/|v|`` agree with the exact mixed second derivative; ReLU kinks would make any FD estimate rough."""
    torch.manual_seed(0)
    space = tiny_space(operations=SMOOTH_OPS)
    for parent in list(space.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Tanh())
    strategy = Darts(order=2)
    strategy.mutate_model(space)
    module = strategy.configure_oneshot_module(tiny_evaluator().module)
    module.set_model(space)
    module.to(torch.float64)
    _no_log(module)
    module.eval()  # batch statistics frozen: the loss is a smooth function of the weights
    weights = module.weight_parameters()
    alphas = module.arch_parameters()
    trn, _ = _batches(torch.float64)
    torch.manual_seed(1)
    v = [torch.randn_like(w) * 1e-2 for w in weights]
    center = [w.detach().clone() for w in weights]
    approx = module.finite_difference_hvp(trn, 0, weights, center, alphas, v)
    with torch.no_grad():
        for w, c in zip(weights, center):
            w.copy_(c)
    loss = module._loss(trn, 0)
    g_alpha = torch.autograd.grad(loss, alphas, create_graph=True)
    dot = sum((g.unsqueeze(0) * 0).sum() for g in g_alpha)  # keep graph alive
    grad_w = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
    inner = sum((g * d).sum() for g, d in zip(grad_w, v) if g is not None) + dot
    exact = torch.autograd.grad(inner, alphas, allow_unused=True)
    exact = [torch.zeros_like(a) if e is None else e for e, a in zip(exact, alphas)]
    num = torch.cat([(a - e).flatten() for a, e in zip(approx, exact)]).norm()
    den = torch.cat([e.flatten() for e in exact]).norm()
    assert den > 0
    assert num / den < 1e-4


def test_virtual_step_equals_real_sgd_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    for _ in range(2):  # build a momentum buffer first
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    params = list(net.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(net(x), y), params)
    predicted = virtual_step(params, list(grads), opt, 0.1)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, q in zip(params, predicted):
        assert torch.allclose(p, q, atol=1e-12)


def test_arch_step_changes_no_weight_and_weight_step_no_alpha():
    from nni_darts_variants.testing import run_tiny_search
    import pytorch_lightning as pl

    class Watch(pl.Callback):
        """Checks each optimizer's step in isolation by wrapping them."""
        violations: list = []

        def on_train_start(self, trainer, pl_module):
            alphas = pl_module.arch_parameters()
            weights = pl_module.weight_parameters()
            for opt in trainer.optimizers:
                is_arch = getattr(opt, 'is_arch_optimizer', False)
                original = opt.step
                others = weights if is_arch else alphas

                def step(*args, _orig=original, _others=others, **kwargs):
                    before = [p.detach().clone() for p in _others]
                    out = _orig(*args, **kwargs)
                    if any(not torch.equal(b, p) for b, p in zip(before, _others)):
                        Watch.violations.append(opt)
                    return out
                opt.step = step

    watch = Watch()
    space = tiny_space()
    evaluator = tiny_evaluator(callbacks=[watch])
    from nni.nas.experiment import NasExperiment
    import tempfile
    exp = NasExperiment(space, evaluator, create_strategy('darts', order=2))
    exp.config.experiment_working_directory = tempfile.mkdtemp()
    exp.run()
    assert Watch.violations == []


def test_unknown_order_is_rejected():
    with pytest.raises(ValueError, match='order must be 1 or 2'):
        create_strategy('darts', order=3)
