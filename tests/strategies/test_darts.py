"""DARTS invariants (algorithms.md §1): mixed edge, order 1 vs 2, the finite-difference HVP, optimizer separation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from nni_darts_variants import create_strategy
from nni_darts_variants.strategies.darts import Darts, virtual_step
from nni_darts_variants.testing import tiny_evaluator, tiny_loaders, tiny_space


def test_mixed_edge_is_softmax_weighted_sum_of_all_candidates(supernet):
    module, space = supernet.lightning(create_strategy('darts'))
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


def test_large_logit_selects_its_op(supernet):
    module, space = supernet.lightning(create_strategy('darts'))
    edge = space.cells[0].edges['2_0']
    with torch.no_grad():
        edge.alpha.zero_()
        edge.alpha[edge.names.index('avg_pool_3x3')] = 50.0
    x = torch.randn(2, 8, 8, 8)
    assert torch.allclose(edge(x), edge['avg_pool_3x3'](x), atol=1e-5)


def test_alphas_shared_per_cell_type_and_shapes(supernet):
    module, space = supernet.lightning(create_strategy('darts'))
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


def test_second_order_with_zero_xi_equals_first_order_exactly(supernet):
    first, _ = supernet.lightning(Darts(order=1), dtype=torch.float64)
    second = copy.deepcopy(first)
    second.strategy = Darts(order=2, unrolled_lr=0.0)
    for m in (first, second):
        _no_log(m)
        _attach_optimizer(m)
    trn, val = _batches(torch.float64)
    g1 = _arch_grads(first, trn, val)
    g2 = _arch_grads(second, trn, val)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_second_order_restores_weights_exactly(supernet):
    module, _ = supernet.lightning(Darts(order=2, unrolled_lr=0.5), dtype=torch.float64)
    _no_log(module)
    _attach_optimizer(module)
    before = [w.detach().clone() for w in module.weight_parameters()]
    trn, val = _batches(torch.float64)
    _arch_grads(module, trn, val)
    assert all(torch.equal(a, b) for a, b in zip(before, module.weight_parameters()))


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


def test_unknown_order_is_rejected():
    with pytest.raises(ValueError, match='order must be 1 or 2'):
        create_strategy('darts', order=3)


# ----- independent oracles for second order (float64, smooth network) -----

def _smooth_supernet(strategy, seed=0):
    """A tiny space on smooth ops with ReLU -> tanh in float64, wrapped in the strategy's module, in eval mode: with
    the batch statistics frozen the losses are smooth enough for the central differences to be accurate."""
    torch.manual_seed(seed)
    space = tiny_space(operations=SMOOTH_OPS)
    for parent in list(space.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Tanh())
    strategy.mutate_model(space)
    module = strategy.configure_oneshot_module(tiny_evaluator().module)
    module.set_model(space)
    module.to(torch.float64)
    _no_log(module)
    return module.eval()


def _warm_optimizer(module, trn, lr, momentum, weight_decay, steps=2):
    """A real SGD weight optimizer with a non-zero momentum buffer (two real steps on ``trn``)."""
    opt = _attach_optimizer(module, lr=lr, momentum=momentum, weight_decay=weight_decay)
    x, y = trn
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(module.training_module(x), y).backward()
        opt.step()
    for a in module.arch_parameters():
        a.grad = None
    return opt


def _exact_unrolled_gradient(module, opt, trn, val, xi, momentum, weight_decay):
    """``d/d alpha L_val(w'(alpha), alpha)`` with ``w' = w - xi (mu buf + grad_w L_train + lambda w)``, by autograd
    through the virtual step (``create_graph=True``); written from the paper's equation, not from the strategy."""
    net = module.training_module
    alphas = module.arch_parameters()
    alpha_ids = {id(a) for a in alphas}
    names = [(n, p) for n, p in net.named_parameters() if id(p) not in alpha_ids]
    weights = [p for _, p in names]
    x, y = trn
    train_loss = nn.functional.cross_entropy(net(x), y)
    grads = torch.autograd.grad(train_loss, weights, create_graph=True, allow_unused=True)
    unrolled = {}
    for (name, w), g in zip(names, grads):
        g = torch.zeros_like(w) if g is None else g
        buf = opt.state[w].get('momentum_buffer', torch.zeros_like(w))
        unrolled[name] = w - xi * (momentum * buf + g + weight_decay * w)
    xv, yv = val
    val_loss = nn.functional.cross_entropy(torch.func.functional_call(net, unrolled, (xv,)), yv)
    exact = torch.autograd.grad(val_loss, alphas, allow_unused=True)
    first = torch.autograd.grad(nn.functional.cross_entropy(net(xv), yv), alphas, allow_unused=True)
    zero = [torch.zeros_like(a) for a in alphas]
    return ([z if g is None else g for g, z in zip(exact, zero)], [z if g is None else g for g, z in zip(first, zero)])


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def test_second_order_gradient_equals_autograd_through_the_virtual_step():
    """Catches a flipped correction sign (``d + xi h``), a dropped virtual step, a missing momentum or decay term."""
    lr, momentum, weight_decay = 0.2, 0.9, 3e-2
    module = _smooth_supernet(Darts(order=2))
    trn, val = _batches(torch.float64)
    opt = _warm_optimizer(module, trn, lr, momentum, weight_decay)
    state = copy.deepcopy(module.training_module.state_dict())
    exact, first = _exact_unrolled_gradient(module, opt, trn, val, lr, momentum, weight_decay)
    module.training_module.load_state_dict(state)  # BN running stats back to where they were
    strategy = _arch_grads(module, trn, val)
    exact, first, strategy = _flat(exact), _flat(first), _flat(strategy)
    correction, expected_correction = strategy - first, exact - first
    assert expected_correction.norm() > 0.05 * exact.norm(), 'the test needs a visible second-order term'
    assert (strategy - exact).norm() / exact.norm() < 1e-5  # seen: 8e-7 (finite-difference error)
    assert (correction - expected_correction).norm() / expected_correction.norm() < 1e-4  # seen: 2e-6


def test_second_order_step_moves_weights_to_the_virtual_step_and_back():
    """The in-place weight changes of the second-order step: ``w'`` while the validation loss is taken, then
    ``w +- eps v`` (``eps |v| = 0.01``) for the finite differences, then exactly ``w`` again."""
    lr, momentum, weight_decay = 0.2, 0.9, 3e-2
    module = _smooth_supernet(Darts(order=2))
    trn, val = _batches(torch.float64)
    opt = _warm_optimizer(module, trn, lr, momentum, weight_decay)
    weights = module.weight_parameters()
    center = [w.detach().clone() for w in weights]
    x, y = trn
    grads = torch.autograd.grad(nn.functional.cross_entropy(module.training_module(x), y), weights,
                                allow_unused=True)
    buffers = [opt.state[w].get('momentum_buffer', torch.zeros_like(w)) for w in weights]
    expected_unrolled = [c - lr * (momentum * b + (0 if g is None else g) + weight_decay * c)
                         for c, b, g in zip(center, buffers, grads)]
    seen = {'arch': [], 'loss': []}
    arch_loss, loss = module.architecture_loss, module._loss

    def record_arch(*args, **kwargs):
        seen['arch'].append([w.detach().clone() for w in weights])
        return arch_loss(*args, **kwargs)

    def record_loss(*args, **kwargs):
        seen['loss'].append([w.detach().clone() for w in weights])
        return loss(*args, **kwargs)

    module.architecture_loss, module._loss = record_arch, record_loss
    _arch_grads(module, trn, val)
    assert len(seen['arch']) == 1 and len(seen['loss']) == 3  # train loss at w, then w + eps v and w - eps v
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(seen['arch'][0], expected_unrolled))
    assert all(torch.equal(a, b) for a, b in zip(seen['loss'][0], center))
    plus, minus = seen['loss'][1], seen['loss'][2]
    assert all(torch.allclose((p + m) / 2, c, atol=1e-12) for p, m, c in zip(plus, minus, center))
    step = _flat([(p - m) / 2 for p, m in zip(plus, minus)])
    assert step.norm().item() == pytest.approx(0.01, rel=1e-6)
    assert all(torch.equal(w, c) for w, c in zip(weights, center))


class _StepWatch:
    """Wraps a Lightning module's ``architecture_step`` and ``weight_step``: which parameters each one changed."""

    def __init__(self, module):
        self.alphas = module.arch_parameters()
        self.weights = module.weight_parameters()
        self.calls: list[tuple[str, bool, bool]] = []  # (step, changed every alpha, changed any weight)
        self.alpha_changes: list[tuple[str, bool]] = []
        for name in ('architecture_step', 'weight_step'):
            setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, step):
        def wrapped(*args, **kwargs):
            alphas = [a.detach().clone() for a in self.alphas]
            weights = [w.detach().clone() for w in self.weights]
            out = step(*args, **kwargs)
            alpha_moved = [not torch.equal(a, b) for a, b in zip(alphas, self.alphas)]
            weight_moved = [not torch.equal(w, b) for w, b in zip(weights, self.weights)]
            self.calls.append((name, alpha_moved, weight_moved))
            return out
        return wrapped


@pytest.mark.parametrize('order', [1, 2])
def test_arch_step_changes_every_alpha_and_no_weight_weight_step_the_reverse(order, search_with):
    """Wraps the steps themselves (not the optimizers): both run, arch first; each changes only its own parameters."""
    import pytorch_lightning as pl

    watches = []

    class Watch(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            watches.append(_StepWatch(pl_module))

    search_with(Darts(order=order), [Watch()], loaders=tiny_loaders(n=8, batch_size=4))
    calls = watches[0].calls
    assert [c[0] for c in calls] == ['architecture_step', 'weight_step'] * 2
    for name, alpha_moved, weight_moved in calls:
        if name == 'architecture_step':
            assert all(alpha_moved) and not any(weight_moved)
        else:
            assert not any(alpha_moved) and sum(weight_moved) > 0.9 * len(weight_moved)


def test_second_order_updates_batch_norm_statistics_as_the_official_code(supernet):
    """Official ``architect.py``: the train forward at ``w`` and the two finite-difference forwards update the model's
    running statistics; the validation forward at ``w'`` runs on a copy. Three updates, and the running mean is
    that of the three training forwards (the first BN of the stem sees the raw input, whatever the weights)."""
    module, _ = supernet.lightning(Darts(order=2), dtype=torch.float64)
    _no_log(module)
    _attach_optimizer(module)
    trn, val = _batches(torch.float64)
    stem_bn = module.training_module.model.stem0[1]
    stem_conv = module.training_module.model.stem0[0]
    with torch.no_grad():
        conv_out = stem_conv(trn[0])
    _arch_grads(module, trn, val)
    assert int(stem_bn.num_batches_tracked) == 3
    m = stem_bn.momentum
    # w, w + eps v, w - eps v: the stem conv moves by +-eps v, its mean output is linear in it, so the three batch
    # means average to the mean at w: running = (1 - (1 - m)^3) * mean(conv(x) at w), to rounding of eps v terms
    expected = (1 - (1 - m) ** 3) * conv_out.mean((0, 2, 3))
    torch.testing.assert_close(stem_bn.running_mean, expected, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize('option', [{'nesterov': True}, {'dampening': 0.1}])
def test_second_order_rejects_nesterov_or_dampened_sgd(option, supernet):
    from nni_darts_variants.strategies.darts import check_virtual_step
    module, _ = supernet.lightning(Darts(order=2))
    opt = torch.optim.SGD(module.weight_parameters(), lr=0.1, momentum=0.9, **option)
    with pytest.raises(ValueError, match='second-order DARTS unrolls plain momentum SGD.*order=1'):
        check_virtual_step(opt)
    check_virtual_step(torch.optim.SGD(module.weight_parameters(), lr=0.1, momentum=0.9))


@pytest.mark.parametrize('name', ['darts', 'mergenas'])
def test_second_order_with_nesterov_is_refused_when_the_config_resolves(name, tmp_path, capsys):
    """Refused by ``resolve_config`` (the strategy's ``check_trainer`` sees the ``train`` section), so the CLI exits 2
    with one line before any run folder exists; first order with Nesterov and second order without it resolve."""
    import yaml

    from nni_darts_variants.cli import main
    from nni_darts_variants.config import ConfigError
    from nni_darts_variants.search.config import resolve_config

    def config(order: int, nesterov: bool) -> dict:
        return {'strategy': {'name': name, 'args': {'order': order}}, 'train': {'nesterov': nesterov}}
    with pytest.raises(ConfigError, match=r'^strategy\.args: second-order DARTS unrolls plain momentum SGD.*'
                                          r'nesterov=True.*train\.nesterov: false.*order=1$'):
        resolve_config(config(2, True))
    resolve_config(config(1, True))
    resolve_config(config(2, False))
    accepted = config(2, True)  # the explicit approximation of NAS-Bench-201's DARTS-V2 (AutoDL-Projects)
    accepted['strategy']['args']['unroll_nesterov'] = True
    resolve_config(accepted)
    path = tmp_path / 'c.yml'
    path.write_text(yaml.safe_dump(config(2, True)))
    assert main(['search', str(path), '-o', str(tmp_path / 'run')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('nni-darts search: error: strategy.args: second-order DARTS'), err
    assert not (tmp_path / 'run').exists()


def test_unused_input_choice_alphas_are_not_weights(supernet):
    """NNI's memo alpha of each ``InputChoice`` is unused by DARTS' plain-sum nodes: not in ``weight_parameters``
    (the SGD optimizer and the virtual step), not in the state dict; PC-DARTS' beta stays a parameter."""
    from nni_darts_variants.strategies.pcdarts import PCDarts
    module, _ = supernet.lightning(Darts(order=2))
    weights = {id(w) for w in module.weight_parameters()}
    memo = module.strategy._arch_parameters
    inputs = [a for label, a in memo.items() if '/input_' in label]
    assert len(inputs) == 8 and not any(id(a) in weights for a in inputs)
    assert not any('_memo_alpha' in key for key in module.training_module.state_dict())
    pc, _ = supernet.lightning(PCDarts())
    assert sum('_memo_alpha' in name for name, _ in pc.training_module.named_parameters()) == 8


def _arch_step_gradients(module, trn, val, scaler=None):
    """The architecture gradients as the optimizer step sees them, through the module's own ``architecture_step``;
    with ``scaler``, as Lightning's fp16 loop drives it: ``manual_backward`` scales the loss, the step unscales."""
    seen = []
    opt = torch.optim.SGD(module.arch_parameters(), lr=0.0)
    original = opt.step

    def step(*args, **kwargs):
        if scaler is not None:
            scaler.unscale_(opt)
        seen.append([a.grad.detach().clone() for a in module.arch_parameters()])
        opt.step = original  # scaler.step calls optimizer.step
        return scaler.step(opt) if scaler is not None else original(*args, **kwargs)

    opt.step = step
    module.architecture_optimizers = lambda: opt
    module.resample = lambda: {}
    if scaler is not None:
        module.loss_scaler = lambda: scaler
        module.manual_backward = lambda loss, **kwargs: scaler.scale(loss).backward(**kwargs)
    module.architecture_step(trn, val, 0)
    return seen[0]


@pytest.mark.parametrize('order,clip', [(2, None), (1, 1e-3), (2, 1e-3)])
def test_architecture_step_is_aware_of_the_loss_scaler(order, clip, supernet):
    """With ``torch.amp.GradScaler('cpu')`` at 2**16 the gradients the architecture optimizer steps on equal the
    unscaled fp32 ones: second-order alphas set by hand carry the scale, and the clip (P-DARTS's
    ``arc_gradient_clip_val``) acts on the true norm."""
    grads = []
    for scaler in (None, torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)):
        module, _ = supernet.lightning(Darts(order=order, arc_gradient_clip_val=clip))
        _no_log(module)
        _attach_optimizer(module)
        trn, val = _batches(torch.float32)
        grads.append(_flat(_arch_step_gradients(module, trn, val, scaler)))
    unscaled, scaled = grads
    if clip:
        assert unscaled.norm() == pytest.approx(clip, rel=1e-5)
    torch.testing.assert_close(scaled, unscaled, rtol=1e-4, atol=1e-7)
