"""PARSEC: invariants of algorithms.md section 8 (importance weights, prior gradient, sampling, single-child memory)."""
from __future__ import annotations

import itertools
import weakref
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

from nni_darts_variants import create_strategy
from nni_darts_variants.strategies.parsec import (
    Parsec,
    ParsecEdge,
    ParsecLightning,
    ParsecNode,
    importance_weighted_backward,
    importance_weights,
    log_prior,
    sample_architecture,
)
from nni_darts_variants.testing import tiny_loaders, tiny_space


@pytest.fixture
def supernet(supernet):
    """``supernet(seed=0, scale=0.5, **kwargs)``: the shared fixture's PARSEC net, logits ~ N(0, scale)."""
    def build(seed: int = 0, scale: float = 0.5, **kwargs):
        strategy = create_strategy('parsec', **kwargs)
        model = supernet(strategy, seed=seed)
        with torch.no_grad():
            for alpha in strategy._arch_parameters.values():
                alpha.normal_(0, scale)
        return strategy, model
    return build


def choices(model, kind):
    found = {}
    for m in model.modules():
        if isinstance(m, kind):
            found.setdefault(m.label, m)
    return found


def batch(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class PeakSavedTensors:
    """Peak live bytes of activations saved for backward (a graph freed by backward releases its tensors)."""

    def __init__(self, parameters=()):
        self._params = {p.untyped_storage().data_ptr() for p in parameters}
        self._live: dict = {}
        self.live = self.peak = self.total = 0

    def _release(self, key):
        self._live[key][1] -= 1
        if self._live[key][1] == 0:
            self.live -= self._live.pop(key)[0]

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] in self._params:
            return tensor
        holder = _Holder(tensor)
        if key in self._live:
            self._live[key][1] += 1
        else:
            self._live[key] = [key[1], 1]
            self.live += key[1]
            self.total += key[1]
            self.peak = max(self.peak, self.live)
        weakref.finalize(holder, self._release, key)
        return holder

    @contextmanager
    def active(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.tensor if isinstance(h, _Holder) else h):
            yield self


class _Holder:
    __slots__ = ('tensor', '__weakref__')

    def __init__(self, tensor):
        self.tensor = tensor


# ----- importance weights and the prior gradient -----

def test_importance_weights_normalized_and_shift_invariant():
    log_lik = torch.tensor([-1200.0, -1195.5, -1210.0, -1199.0], dtype=torch.float64)
    omega = importance_weights(log_lik)
    assert torch.all(omega >= 0) and torch.isclose(omega.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(importance_weights(log_lik + 1e4), omega, rtol=1e-12)
    assert torch.allclose(importance_weights(log_lik - 3.7), omega, rtol=1e-12)
    assert int(omega.argmax()) == 1


def test_op_choice_gradient_is_weighted_onehot_minus_softmax(supernet):
    _, model = supernet()
    sampled, log_priors = [], []
    for _ in range(4):
        sample_architecture(model)
        sampled.append({label: c.sampled for label, c in choices(model, ParsecEdge).items() if c.enabled})
        log_priors.append(log_prior(model))
    omega = importance_weights(torch.tensor([-3.0, -1.0, -2.0, -1.5]))
    (-(omega * torch.stack(log_priors)).sum()).backward()
    for label, edge in choices(model, ParsecEdge).items():
        expected = torch.zeros_like(edge.alpha)
        probs = F.softmax(edge.prior_logits().detach(), -1)
        for w, s in zip(omega, sampled):
            if label in s:
                expected -= w * (F.one_hot(torch.tensor(s[label]), len(probs)).to(probs) - probs)
        grad = edge.alpha.grad if edge.alpha.grad is not None else torch.zeros_like(edge.alpha)
        assert torch.allclose(grad, expected, atol=1e-6), label


@pytest.mark.parametrize('equal', [True, False])
def test_prior_gradient_mean_zero_iff_likelihoods_equal(equal, supernet):
    _, model = supernet(seed=2, scale=1.0)
    edge = choices(model, ParsecEdge)['normal/op_2_0']
    node = choices(model, ParsecNode)['normal/input_5']
    favoured = edge.names.index('sep_conv_3x3')
    draws, k = 1000, 4
    total = 0.0
    torch.manual_seed(5)
    for _ in range(draws):
        log_liks, log_priors = [], []
        for _ in range(k):
            edge.resample({})
            node.resample({})
            log_liks.append(0.0 if equal else 5.0 * (edge.sampled == favoured))
            log_priors.append(edge.log_prob() + node.log_prob())
        total = total - (importance_weights(torch.tensor(log_liks)) * torch.stack(log_priors)).sum()
    (total / draws).backward()
    grads = torch.cat([edge.alpha.grad, node.alpha.grad])
    if equal:
        assert float(grads.abs().max()) < 0.04, 'equal likelihoods must give a zero-mean prior gradient'
    else:
        assert float(edge.alpha.grad[favoured]) < -0.1, 'a likelier op must get a descent direction'
        assert float(node.alpha.grad.abs().max()) < 0.04, 'inputs do not change the likelihood here'


# ----- sampling -----

def test_op_samples_follow_softmax_and_skip_none(supernet):
    _, model = supernet(seed=3)
    edge = choices(model, ParsecEdge)['normal/op_3_1']
    with torch.no_grad():
        edge.alpha[edge.names.index('none')] = 5.0
    torch.manual_seed(0)
    n = 4000
    counts = Counter(edge.names[int(torch.multinomial(edge.op_weights().detach(), 1))] for _ in range(n))
    assert 'none' not in counts
    logits = edge.alpha.detach().double().clone()
    logits[edge.names.index('none')] = float('-inf')
    probs = F.softmax(logits, -1)
    names = [name for name in edge.names if name != 'none']
    expected = [float(probs[edge.names.index(name)]) * n for name in names]
    assert stats.chisquare([counts.get(name, 0) for name in names], expected).pvalue > 1e-3
    _, with_none = supernet(seed=3, sample_none=True)
    e2 = choices(with_none, ParsecEdge)['normal/op_3_1']
    with torch.no_grad():
        e2.alpha[e2.names.index('none')] = 5.0
    assert sum(e2.names[int(torch.multinomial(e2.op_weights().detach(), 1))] == 'none' for _ in range(50)) > 30


def test_input_pairs_follow_sequential_draws_without_replacement(supernet):
    _, model = supernet(seed=4, scale=1.0)
    node = choices(model, ParsecNode)['normal/input_5']
    p = F.softmax(node.alpha.detach().double(), -1)
    torch.manual_seed(1)
    n = 4000
    counts: Counter = Counter()
    for _ in range(n):
        node.resample({})
        assert len(set(node.chosen)) == 2
        counts[tuple(sorted(node.chosen))] += 1
        expected_lp = torch.log(p[node.chosen[0]]) + torch.log(p[node.chosen[1]] / (1 - p[node.chosen[0]]))
        assert torch.isclose(node.log_prob().double(), expected_lp, atol=1e-5)
    pairs = list(itertools.combinations(range(len(p)), 2))
    expected = [float(p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])) * n for i, j in pairs]
    observed = [counts.get(pair, 0) for pair in pairs]
    assert stats.chisquare(observed, [e * n / sum(expected) for e in expected]).pvalue > 1e-3


def test_one_candidate_per_used_choice_and_unused_edges_skipped(supernet):
    _, model = supernet()
    calls: Counter = Counter()
    edges = [m for m in model.modules() if isinstance(m, ParsecEdge)]
    for edge in edges:
        for name in edge.names:
            edge[name].register_forward_hook(lambda *_, e=edge: calls.update([id(e)]))
    sample = sample_architecture(model)
    model(batch()[0])
    for edge in edges:
        node, j = map(int, edge.label.split('_')[-2:])
        used = j in sample[edge.label.split('/')[0] + f'/input_{node}']
        assert calls[id(edge)] == int(used), edge.label
    num_cells = sum(1 for _ in model.cells)
    assert sum(calls.values()) == num_cells * 8, 'a child runs 2 edges per node, 4 nodes per cell'


# ----- the weight step -----

def test_importance_weighted_backward_equals_weighted_sum_of_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    masks = [torch.rand(5, dtype=torch.float64) for _ in range(4)]
    losses = [F.cross_entropy(layer(x * m), y, reduction='sum') for m in masks]
    omega = importance_weights(-torch.stack([loss.detach() for loss in losses]))
    reference = torch.autograd.grad((omega * torch.stack(losses)).sum(), list(layer.parameters()))
    children = iter(masks)

    def run_sample():
        loss = F.cross_entropy(layer(x * next(children)), y, reduction='sum')
        return loss, -loss.detach()

    weighted = importance_weighted_backward(run_sample, 4, layer.parameters())
    for p, r in zip(layer.parameters(), reference):
        assert torch.allclose(p.grad, r, rtol=1e-10, atol=1e-12)
    assert torch.isclose(weighted, (omega * torch.stack(losses).detach()).sum())


def _peak_of_weight_step(model, num_samples: int):
    x, y = batch(8)
    counter = PeakSavedTensors(model.parameters())

    def run_sample():
        sample_architecture(model)
        loss = F.cross_entropy(model(x), y)
        return loss, -loss.detach() * len(y)

    with counter.active():
        importance_weighted_backward(run_sample, num_samples, model.parameters())
    return counter


def test_saved_activation_memory_does_not_grow_with_k(supernet):
    _, model = supernet()
    with torch.no_grad():  # a (nearly) deterministic prior: every child is the same network
        for choice in choices(model, (ParsecEdge, ParsecNode)).values():
            choice.alpha.zero_()
            if isinstance(choice, ParsecEdge):
                choice.alpha[choice.names.index('sep_conv_3x3')] = 60.0
            else:
                choice.alpha[:2] = 60.0
    one, four = _peak_of_weight_step(model, 1), _peak_of_weight_step(model, 4)
    assert four.total > 3.5 * one.total, 'four children must have been run'
    assert four.peak <= 1.05 * one.peak


# ----- export and configuration -----

def test_export_is_the_mode_of_the_prior(supernet):
    strategy, model = supernet(seed=6, scale=1.0)
    nodes = choices(model, ParsecNode)
    with torch.no_grad():
        nodes['normal/input_4'].alpha.copy_(torch.tensor([0.0, 3.0, -1.0, 2.0]))
        edge = choices(model, ParsecEdge)['normal/op_4_3']
        edge.alpha.zero_()
        edge.alpha[edge.names.index('none')] = 9.0
        edge.alpha[edge.names.index('dil_conv_5x5')] = 4.0
    sample = ParsecLightning(model, strategy).export()
    assert sample['normal/input_4'] == [1, 3]
    assert sample['normal/op_4_3'] == 'dil_conv_5x5'
    for label, node in nodes.items():
        top = sorted(range(len(node.alpha)), key=lambda j: -float(node.alpha[j]))[:2]
        assert sample[label] == sorted(top)
    assert tiny_space().check_contains(sample) is None


def test_validation():
    assert Parsec().num_samples == 4
    with pytest.raises(ValueError, match='num_samples'):
        Parsec(num_samples=0)


# ----- the strategy's own steps against the hand-computed estimators -----

def _current_child(model) -> dict:
    """The child the modules hold now: ``{label: op index}`` of used op choices, ``{label: [j1, j2]}`` of inputs."""
    child = {}
    for label, node in choices(model, ParsecNode).items():
        child[label] = list(node.chosen)
    for label, edge in choices(model, ParsecEdge).items():
        if edge.enabled:
            child[label] = edge.sampled
    return child


def _apply_child(model, child: dict) -> None:
    """Put a recorded child back into the modules (every edge of a label runs the op; unchosen inputs off)."""
    for module in model.modules():
        if isinstance(module, ParsecNode):
            module.chosen = list(child[module.label])
        elif isinstance(module, ParsecEdge):
            cell, name = module.label.split('/')
            node, j = (int(v) for v in name[len('op_'):].split('_'))
            module.enabled = j in child[f'{cell}/input_{node}']
            if module.enabled:
                module.sampled = child[module.label]


def _score(model, child: dict) -> dict:
    """``grad_pi log p(a | pi)`` by hand: ``onehot - softmax`` per used op choice (``none`` outside the prior) and
    ``(onehot(j1) - softmax(pi)) + (onehot(j2) - softmax(pi without j1))`` per input choice."""
    score = {}
    for label, edge in choices(model, ParsecEdge).items():
        logits = edge.alpha.detach().clone()
        logits[[n == 'none' for n in edge.names]] = float('-inf')
        score[label] = torch.zeros_like(logits)
        if label in child:
            score[label] = F.one_hot(torch.tensor(child[label]), len(logits)).to(logits) - logits.softmax(-1)
    for label, node in choices(model, ParsecNode).items():
        logits = node.alpha.detach().clone()
        total = torch.zeros_like(logits)
        for j in child[label]:
            total += F.one_hot(torch.tensor(j), len(logits)).to(logits) - logits.softmax(-1)
            logits[j] = float('-inf')
        score[label] = total
    return score


def test_strategy_steps_equal_the_hand_computed_estimators(search_with):
    """Drives ``ParsecLightning``'s own architecture and weight steps in a Lightning search, with fixed likelihoods
    for the architecture children: ``pi.grad = -sum_k omega_k grad log p(a_k)``, ``grad_w = sum_k omega_k grad_w
    CE(a_k)`` with ``omega = softmax(-B * CE)``; both compared when each optimizer steps. An ``add#linear`` cost
    adds ``lambda / target * p * (c - E)`` per op choice (``p`` the prior, ``none`` outside it), and the step returns
    ``sum_k omega_k CE_k + lambda (E - target) / target``. The K children are K fresh draws."""
    import pytorch_lightning as pl

    from nni_darts_variants.cost.penalty import HardwareCost
    from nni_darts_variants.cost.tables import CostTable
    probe = create_strategy('parsec').mutate_model(tiny_space())
    costs = {label: {n: float(k) for k, n in enumerate(e.names)} for label, e in choices(probe, ParsecEdge).items()}
    target, lam = 5.0, 0.4
    cost = HardwareCost('flops', target=target, form='add#linear', lambda_=lam,
                        table=CostTable(metric='flops', const=0.0, costs=costs))
    fixed_losses = iter([0.30, 0.25, 0.40])
    record = {'arch_children': [], 'arch_losses': [], 'weight_children': [], 'checked': [], 'returned': []}
    (x, y), = list(tiny_loaders(n=8, batch_size=8)[0])

    class Check(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            model = pl_module.training_module
            # the children's losses come from ``task_loss`` (the architecture loss without a hardware cost)
            arch_loss, training_step = pl_module.task_loss, model.training_step

            def fixed_arch_loss(batch, batch_idx):
                arch_loss(batch, batch_idx)
                record['arch_children'].append(_current_child(model))
                record['arch_losses'].append(next(fixed_losses))
                return torch.tensor(record['arch_losses'][-1])

            def recording_step(batch, batch_idx):
                record['weight_children'].append(_current_child(model))
                return training_step(batch, batch_idx)

            arch_gradients = pl_module.compute_arch_gradients

            def recording_arch_gradients(*args):
                loss = arch_gradients(*args)
                record['returned'].append(float(loss))
                return loss

            pl_module.task_loss = fixed_arch_loss
            pl_module.compute_arch_gradients = recording_arch_gradients
            model.training_step = recording_step
            for opt in trainer.optimizers:
                opt.step = self._checked(opt, pl_module, getattr(opt, 'is_arch_optimizer', False))

        def _checked(self, opt, pl_module, is_arch):
            original = opt.step

            def step(*args, **kwargs):
                (self._arch if is_arch else self._weights)(pl_module)
                record['checked'].append('arch' if is_arch else 'weight')
                record['weight_children'].clear()
                return original(*args, **kwargs)
            return step

        def _arch(self, pl_module):
            model = pl_module.training_module
            omega = torch.softmax(-8 * torch.tensor(record['arch_losses'], dtype=torch.float64), 0)
            scores = [_score(model, child) for child in record['arch_children']]
            expected_cost = 0.0
            for label, choice in {**choices(model, ParsecEdge), **choices(model, ParsecNode)}.items():
                expected = -sum(float(w) * s[label] for w, s in zip(omega, scores))
                if label in costs:
                    c = torch.tensor([costs[label][n] for n in choice.names], dtype=torch.float64)
                    p = F.softmax(choice.alpha.detach().double().masked_fill(
                        torch.tensor([n == 'none' for n in choice.names]), float('-inf')), -1)
                    expected = expected + lam / target * p * (c - (p * c).sum())
                    expected_cost += float((p * c).sum())
                grad = torch.zeros_like(choice.alpha) if choice.alpha.grad is None else choice.alpha.grad
                assert torch.allclose(grad, expected.to(grad), atol=1e-6), label
            record['expected_return'] = float((omega * torch.tensor(record['arch_losses'], dtype=torch.float64)).sum()
                                              + lam * (expected_cost - target) / target)

        def _weights(self, pl_module):
            model = pl_module.training_module
            weights = pl_module.weight_parameters()
            children = list(record['weight_children'])
            assert len(children) == 3
            losses, grads = [], []
            for child in children:
                _apply_child(model, child)
                loss = F.cross_entropy(model(x), y)
                losses.append(loss.detach())
                grads.append(torch.autograd.grad(loss, weights, allow_unused=True))
            omega = torch.softmax(-len(y) * torch.stack(losses), 0)
            for i, w in enumerate(weights):
                expected = sum(o * (torch.zeros_like(w) if g[i] is None else g[i]) for o, g in zip(omega, grads))
                actual = torch.zeros_like(w) if w.grad is None else w.grad
                assert torch.allclose(actual, expected, atol=1e-6, rtol=1e-4), i

    search_with(Parsec(num_samples=3, gradient_clip_val=None, cost=cost), [Check()],
                loaders=tiny_loaders(n=8, batch_size=8))
    assert record['checked'] == ['arch', 'weight'] and len(record['arch_children']) == 3
    assert record['returned'] == [pytest.approx(record['expected_return'], rel=1e-5)]
    children = [sorted((k, str(v)) for k, v in c.items()) for c in record['arch_children']]
    assert len({tuple(c) for c in children}) == 3, 'each of the K children must be a new sample'
