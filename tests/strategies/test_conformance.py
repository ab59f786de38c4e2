"""The conformance suite, generated from the registry: every registered strategy gets every check here."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from nni_darts_variants import create_strategy, get_strategy, list_strategies
from nni_darts_variants.testing import ArchSnapshot, run_tiny_search, tiny_space

STRATEGIES = sorted(list_strategies())
#: Strategies whose step may leave a choice without a gradient by design (checked over the whole search instead):
#: PARSEC's score ``grad log p(a_k)`` leaves out the op choices of edges that no sampled child uses
#: (``parsec.log_prior``); ProxylessNAS skips an edge whose active path is the zero op (official
#: ``set_arch_param_grad``: ``AP_path_alpha.grad = None``).
SPARSE_STEP = {'parsec', 'proxyless'}


def _quick(name: str):
    return create_strategy(name, **get_strategy(name).smoke_kwargs())


@pytest.mark.parametrize('name', STRATEGIES)
def test_builds_from_defaults(name):
    strategy = create_strategy(name)
    assert strategy.name == name
    from nni.nas.strategy import DARTS
    assert isinstance(strategy, DARTS), 'every strategy must stay an NNI DARTS strategy'


def _GradientSnapshot():
    """``ArchSnapshot`` that also records, at each architecture-optimizer step, which architecture parameters have a
    gradient (``None`` means the step cannot move them)."""
    snapshot = ArchSnapshot()
    snapshot.has_grad = []
    on_train_start = snapshot.on_train_start

    def start(trainer, pl_module):
        on_train_start(trainer, pl_module)
        for opt in trainer.optimizers:
            if getattr(opt, 'is_arch_optimizer', False):
                def step(*args, _step=opt.step, **kwargs):
                    snapshot.has_grad.append([p.grad is not None for p in pl_module.arch_parameters()])
                    return _step(*args, **kwargs)
                opt.step = step
    snapshot.on_train_start = start
    return snapshot


class _LazySearches(dict):
    """One tiny NasExperiment per strategy, run on first use (so ``-k name`` runs only that strategy's search)."""

    def __init__(self, home):
        super().__init__()
        self.home = home

    def __missing__(self, name):
        import os
        old = os.environ.get('HOME')
        os.environ['HOME'] = str(self.home)
        try:
            with mock.patch('nni_darts_variants.testing.ArchSnapshot', _GradientSnapshot):
                self[name] = run_tiny_search(_quick(name), seed=0, workdir=str(self.home / name))
        finally:
            if old is not None:
                os.environ['HOME'] = old
        return self[name]


@pytest.fixture(scope='module')
def searches(tmp_path_factory):
    """Tiny searches shared by the checks below (module-scoped, one per strategy)."""
    return _LazySearches(tmp_path_factory.mktemp('home'))


@pytest.mark.parametrize('name', STRATEGIES)
def test_search_step_has_finite_loss(searches, name):
    losses = searches[name].snapshot.losses
    assert losses, 'no training step ran'
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize('name', STRATEGIES)
def test_architecture_parameters_move(searches, name):
    snap = searches[name].snapshot
    assert snap.before, 'the strategy has no architecture parameters'
    moved = [not torch.equal(a, b) for a, b in zip(snap.before, snap.after)]
    assert all(moved), f'{moved.count(False)} of {len(moved)} architecture parameters never changed'


@pytest.mark.parametrize('name', STRATEGIES)
def test_every_architecture_parameter_gets_a_gradient_in_one_step(searches, name):
    """Alphas of both cell types and PC-DARTS' betas: a frozen group (``None`` gradient) fails here."""
    has_grad = searches[name].snapshot.has_grad
    assert has_grad, 'the architecture optimizer never stepped'
    if name in SPARSE_STEP:  # every parameter in some step of the search instead
        has_grad = [[any(step) for step in zip(*has_grad)]]
    missing = [i for i, ok in enumerate(has_grad[0]) if not ok]
    assert not missing, f'no gradient at the first architecture step for parameters {missing}'


@pytest.mark.parametrize('name', STRATEGIES)
def test_each_optimizer_owns_its_parameters(searches, name):
    snap = searches[name].snapshot
    assert snap.arch_ids and snap.arch_ids <= snap.arch_optimizer_params
    assert not snap.arch_ids & snap.weight_optimizer_params, 'alphas must not be in the weight optimizer'
    assert not snap.weight_optimizer_params & snap.arch_optimizer_params
    memo = {id(p) for p in searches[name].strategy._arch_parameters.values()}  # NNI's alpha of every choice label
    assert not memo & snap.weight_optimizer_params, 'an unused NNI alpha (e.g. an InputChoice) is in the SGD optimizer'


@pytest.mark.parametrize('name', STRATEGIES)
def test_export_is_a_valid_sample(searches, name):
    sample = searches[name].sample
    space = tiny_space()
    assert space.check_contains(sample) is None
    model = space.freeze(sample)
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 10)
    for key, value in sample.items():
        if '/op_' in key:
            assert value != 'none' or not any(
                key.endswith(f'op_{n}_{j}') for n in range(2, 6)
                for j in sample.get(key.split('/')[0] + f'/input_{n}', [])), f'{key}: a chosen edge is none'


@pytest.mark.parametrize('name', STRATEGIES)
def test_genotype_matches_sample(searches, name):
    from nni_darts_variants.genotype import Genotype
    result = searches[name]
    genotype = result.strategy.export_genotype()
    assert genotype == Genotype.from_sample(result.sample)
    for cell in ('normal', 'reduce'):
        pairs = getattr(genotype, cell)
        assert len(pairs) == 8 and all(op != 'none' for op, _ in pairs)
        for k in range(0, 8, 2):
            assert pairs[k][1] != pairs[k + 1][1], 'two inputs of a node must differ'


@pytest.mark.parametrize('name', STRATEGIES)
def test_same_seed_same_export(searches, name, tmp_path):
    again = run_tiny_search(_quick(name), seed=0, workdir=str(tmp_path / 'again'))
    assert again.sample == searches[name].sample
    for a, b in zip(again.snapshot.after, searches[name].snapshot.after):
        assert torch.equal(a, b)
