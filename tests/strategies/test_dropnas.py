"""DropNAS: grouped operation dropout and the one-level loop (algorithms.md section 6, invariants (8))."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.mutable import frozen_context

from search_spaces.ops import PRIMITIVES
from nni_darts_variants.strategies import dropnas
from nni_darts_variants.strategies.base import MixedEdge
from nni_darts_variants.strategies.dropnas import (DropEdge, DropNAS, adjust_kept_alphas, kept_share,
                                                   partial_decay_loss, sample_group_mask)
from nni_darts_variants.testing import run_tiny_search, tiny_loaders

PARAMETRIC = ['sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5']


def _edge(label: str = 'edge_a', drop_rate: float = 3e-5, alpha: nn.Parameter | None = None) -> DropEdge:
    candidates = {name: nn.Conv2d(2, 2, 1) if name in PARAMETRIC else nn.Identity() for name in PRIMITIVES}
    alpha = alpha if alpha is not None else nn.Parameter(torch.randn(len(PRIMITIVES)))
    with frozen_context():  # supermodules are built inside NNI's frozen context (as mutate_model does)
        return DropEdge(candidates, alpha, label, drop_rate=drop_rate)


def _masks(edge: DropEdge, n: int) -> torch.Tensor:
    masks = []
    for _ in range(n):
        edge.resample({})
        masks.append(edge.kept.clone())
    return torch.stack(masks)


def test_groups_follow_the_official_split():
    edge = _edge()
    assert [[edge.names[i] for i in g] for g in edge.groups] == [
        PARAMETRIC, ['none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect']]


def test_each_group_keeps_at_least_one_op():
    torch.manual_seed(0)
    masks = _masks(_edge(drop_rate=0.9), 2000)  # per-op drop probability 0.97: groups are often emptied
    groups = _edge().groups
    for group in groups:
        assert torch.all(masks[:, group].any(1))
    assert not torch.all(masks)  # and ops were dropped
    assert torch.all(sample_group_mask(1, 0.99))


def test_empirical_drop_rate_is_r_to_the_quarter():
    torch.manual_seed(0)
    for r in (3e-5, 0.2):
        p = r ** 0.25
        expected = (p - r) / (1 - r)  # P(op dropped | its group not entirely dropped): the resampling rule
        rate = 1 - _masks(_edge(drop_rate=r), 4000).float().mean()
        assert abs(float(rate) - expected) < 4.5 * (expected * (1 - expected) / 32000) ** 0.5 + 1e-4
    assert abs((3e-5) ** 0.25 - 0.074) < 1e-3


def test_mask_is_shared_by_a_label_through_the_memo():
    torch.manual_seed(0)
    alpha = nn.Parameter(torch.zeros(8))
    first, second, other = _edge(alpha=alpha, drop_rate=0.5), _edge(alpha=alpha, drop_rate=0.5), _edge(
        'edge_b', drop_rate=0.5)
    for _ in range(20):
        memo: dict = {}
        for edge in (first, second, other):
            memo.update(edge.resample(memo))
        assert torch.equal(first.kept, second.kept)
        assert set(memo) == {first.label, other.label}


def test_kept_weights_renormalize_and_dropped_ops_do_not_run():
    torch.manual_seed(1)
    edge = _edge(drop_rate=0.5)
    calls = {name: 0 for name in edge.names}
    for name in edge.names:
        edge[name].register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    x = torch.randn(3, 2, 4, 4)
    for _ in range(10):
        edge.resample({})
        kept = edge.kept
        weights = edge.op_weights()
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
        assert torch.all(weights[~kept] == 0)
        expected = torch.exp(edge.alpha[kept]) / torch.exp(edge.alpha[kept]).sum()
        torch.testing.assert_close(weights[kept], expected)
        before = dict(calls)
        out = edge(x)
        ran = {name for name in edge.names if calls[name] > before[name]}
        assert ran == {name for name, k in zip(edge.names, kept.tolist()) if k}
        reference = sum(w * edge[n](x) for w, n, k in zip(weights, edge.names, kept.tolist()) if k)
        torch.testing.assert_close(out, reference)


def test_zero_drop_rate_is_darts_mixing():
    torch.manual_seed(0)
    edge = _edge(drop_rate=0.0)
    with frozen_context():
        plain = MixedEdge(edge.candidates, edge.alpha, edge.label)
    x = torch.randn(2, 2, 4, 4)
    for _ in range(50):
        edge.resample({})
        assert bool(edge.kept.all()) and not edge.has_drops()
    torch.testing.assert_close(edge.op_weights(), F.softmax(edge.alpha, -1))
    torch.testing.assert_close(edge(x), plain(x))


def test_adjustment_restores_the_kept_share_and_leaves_dropped_alphas():
    torch.manual_seed(0)
    for _ in range(20):
        alpha = torch.randn(8, dtype=torch.float64)
        kept = torch.rand(8) > 0.4
        kept[0], kept[7] = True, False
        share = kept_share(alpha, kept)
        updated = alpha.clone()
        updated[kept] += torch.randn(int(kept.sum()), dtype=torch.float64)  # an update of the kept alphas
        adjust_kept_alphas(updated, kept, share)
        torch.testing.assert_close(kept_share(updated, kept), share, rtol=1e-6, atol=0)
        assert torch.equal(updated[~kept], alpha[~kept])
    alpha = torch.randn(8)
    unchanged = alpha.clone()
    adjust_kept_alphas(alpha, torch.ones(8, dtype=torch.bool), 0.3)  # nothing dropped: no adjustment
    assert torch.equal(alpha, unchanged)


def test_partial_decay_reaches_only_used_parameters():
    used, unused, no_grad = (nn.Parameter(torch.randn(3)) for _ in range(3))
    used.grad, unused.grad = torch.randn(3), torch.zeros(3)
    alpha = nn.Parameter(torch.randn(4))
    alpha.grad = torch.tensor([0.1, 0.0, 1e-9, -0.2])
    loss = partial_decay_loss([used, unused, no_grad], [alpha], 3e-4, 1e-3)
    grads = torch.autograd.grad(loss, [used, unused, no_grad, alpha], allow_unused=True)
    torch.testing.assert_close(grads[0], 2 * 3e-4 * used.detach())
    assert grads[1] is None and grads[2] is None
    torch.testing.assert_close(grads[3], 2 * 1e-3 * alpha.detach() * torch.tensor([1., 0, 0, 1]))
    assert partial_decay_loss([unused], [], 3e-4, 1e-3) is None


class _Probe:
    """Lightning callback: per batch, the alphas before/after, which candidates ran, what batches the loss saw."""

    def __new__(cls):
        import pytorch_lightning as pl

        class Probe(pl.Callback):
            def __init__(self):
                self.records, self.calls, self.seen, self.train_inputs = [], {}, [], []

            def on_train_start(self, trainer, module):
                for edge in module.drop_edges().values():
                    for name in edge.names:
                        key = (edge.label, name)
                        edge[name].register_forward_hook(
                            lambda m, i, o, key=key: self.calls.__setitem__(key, self.calls.get(key, 0) + 1))
                inner = module.training_module.training_step
                module.training_module.training_step = lambda b, i: (self.seen.append(b[0]), inner(b, i))[1]

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self.calls.clear()
                self.train_inputs.append(batch['train'][0])
                self.before = {label: e.alpha.detach().clone() for label, e in module.drop_edges().items()}

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                for label, edge in module.drop_edges().items():
                    ran = {name for name in edge.names if self.calls.get((label, name), 0)}
                    self.records.append((label, edge.kept.clone(), self.before[label], edge.alpha.detach().clone(),
                                         ran))

        return Probe()


def _search(monkeypatch, drop_rate: float):
    from nni_darts_variants import testing
    probe = _Probe()
    monkeypatch.setattr(testing, 'ArchSnapshot', lambda: probe)  # run_tiny_search installs the probe as callback
    result = run_tiny_search(DropNAS(drop_rate=drop_rate), loaders=tiny_loaders(n=16, batch_size=8))
    return probe, result


def test_search_step_drops_adjusts_and_masks_adam(monkeypatch):
    probe, result = _search(monkeypatch, drop_rate=0.3)
    assert probe.records and any(not bool(kept.all()) for _, kept, *_ in probe.records)
    # one level: one forward per step, on the training batch (the 'val' batch is never used)
    assert len(probe.seen) == len(probe.train_inputs)
    assert all(torch.equal(x, t) for x, t in zip(probe.seen, probe.train_inputs))
    for label, kept, before, after, ran in probe.records:
        labels_ops = {name for name, k in zip(PRIMITIVES, kept.tolist()) if k}
        assert ran == labels_ops, f'{label}: dropped ops ran or kept ops did not'
        assert torch.equal(after[~kept], before[~kept]), f'{label}: a dropped alpha moved'
        torch.testing.assert_close(kept_share(after.double(), kept), kept_share(before.double(), kept),
                                   rtol=1e-5, atol=0)
    assert any(not torch.equal(a, b) for _, _, b, a, _ in probe.records), 'no alpha moved'
    # the share adjustment shifts every kept alpha of an edge by one constant; only the Adam step moves them apart
    assert any(int(kept.sum()) > 1 and float((a - b)[kept].max() - (a - b)[kept].min()) > 1e-7
               for _, kept, b, a, _ in probe.records), 'the alpha optimizer never stepped'
    assert result.strategy.export_genotype() is not None


def test_zero_drop_rate_never_adjusts(monkeypatch):
    adjusted = []
    monkeypatch.setattr(dropnas, 'adjust_kept_alphas', lambda *args: adjusted.append(args))
    probe, _ = _search(monkeypatch, drop_rate=0.0)
    assert not adjusted
    assert all(ran == set(PRIMITIVES) for *_, ran in probe.records)


def test_genotype_ranks_raw_alphas():
    edge = _edge()
    with torch.no_grad():
        edge.alpha.copy_(torch.arange(8.0))
    assert torch.equal(edge.ranking_weights(), torch.arange(8.0))


def test_defaults_and_bad_input():
    strategy = DropNAS()
    assert (strategy.drop_rate, strategy.weight_decay, strategy.alpha_decay) == (3e-5, 3e-4, 1e-3)
    assert strategy.arc_weight_decay == 0 and strategy.gradient_clip_val == 3.0
    assert strategy.arc_learning_rate == 3e-4 and strategy.arc_betas == (0.5, 0.999)
    with pytest.raises(ValueError, match='drop_rate'):
        DropNAS(drop_rate=1.0)
    with pytest.raises(ValueError, match='arc_weight_decay'):
        DropNAS(arc_weight_decay=1e-3)


def test_two_weight_steps_per_batch_the_second_is_the_partial_decay(search_with):
    """The weight optimizer steps twice per batch: on the loss, then on the partial decay, whose gradient on every
    weight used in the batch is ``2 lambda_w w`` (official ``train_search.py``); a no-op decay step fails here."""
    import pytorch_lightning as pl
    weight_decay, alpha_decay = 3e-4, 1e-3
    steps, arch_steps = [], []

    class Watch(pl.Callback):
        def on_train_start(self, trainer, module):
            weights, alphas = module.weight_parameters(), module.arch_parameters()
            for opt in trainer.optimizers:
                if getattr(opt, 'is_arch_optimizer', False):
                    def arch_step(*args, _step=opt.step, **kwargs):
                        arch_steps.append(([None if a.grad is None else a.grad.clone() for a in alphas],
                                           [a.detach().clone() for a in alphas]))
                        return _step(*args, **kwargs)
                    opt.step = arch_step
                else:
                    def step(*args, _step=opt.step, **kwargs):
                        steps.append((trainer.global_step, [None if w.grad is None else w.grad.clone() for w in weights],
                                      [w.detach().clone() for w in weights]))
                        out = _step(*args, **kwargs)
                        steps[-1] += ([w.detach().clone() for w in weights],)
                        return out
                    opt.step = step

    search_with(DropNAS(drop_rate=0.3, weight_decay=weight_decay, alpha_decay=alpha_decay, gradient_clip_val=None,
                        warmup_epochs=0), [Watch()], loaders=tiny_loaders(n=16, batch_size=8))
    assert len(steps) == 4  # 2 batches x (loss step, decay step)
    assert len(arch_steps) == 4  # the alpha optimizer too: its decay step sees only 2 lambda_a alpha on used alphas
    for (loss_grads, _), (decay_grads, before_decay) in (arch_steps[0:2], arch_steps[2:4]):
        for g, d, a in zip(loss_grads, decay_grads, before_decay):
            used = torch.zeros_like(a, dtype=torch.bool) if g is None else g.abs() > 1e-7
            torch.testing.assert_close(torch.zeros_like(a) if d is None else d, 2 * alpha_decay * a * used)
    for (_, loss_grads, _, after_loss), (_, decay_grads, before_decay, after_decay) in (steps[0:2], steps[2:4]):
        used = [i for i, g in enumerate(loss_grads) if g is not None and bool(g.ne(0).any())]
        assert len(used) > 0.2 * len(loss_grads)  # per-op drop probability 0.3 ** (1/4) = 0.74
        for i in used:
            assert torch.equal(before_decay[i], after_loss[i])
            torch.testing.assert_close(decay_grads[i], 2 * weight_decay * before_decay[i])
            assert not torch.equal(after_decay[i], before_decay[i]), 'a kept weight missed its decay update'
        for i, g in enumerate(loss_grads):
            if i not in used:
                assert decay_grads[i] is None or not bool(decay_grads[i].ne(0).any()), 'an unused weight was decayed'


def test_weight_grad_reset_defaults_to_the_official_zeros():
    assert DropNAS().weight_grad_reset == 'zeros' and DropNAS(weight_grad_reset='none').weight_grad_reset == 'none'
    with pytest.raises(ValueError, match="weight_grad_reset must be one of"):
        DropNAS(weight_grad_reset='zero')
