"""SNAS's own invariants: sampled weights, annealing, the resource term and the export rule."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.mutable import frozen_context

from nni_darts_variants.genotype import darts_rule
from nni_darts_variants.strategies.snas import (Snas, SnasEdge, exponential_temperature,
                                                expected_parametric_ops)

OPS = ['none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3', 'dil_conv_5x5']


def _edge(alpha, temperature=1.0):
    candidates = {name: nn.Conv2d(1, 1, 1) if 'conv' in name else nn.Identity() for name in OPS}
    with frozen_context():  # supermodules are built inside NNI's frozen context (as mutate_model does)
        return SnasEdge(candidates, nn.Parameter(torch.tensor(alpha)), 'op_2_0', temperature=temperature)


def test_sampled_weights_sum_to_one_and_harden_as_the_temperature_falls():
    torch.manual_seed(0)
    edge = _edge([0.1, -0.3, 0.2, 0.5, 0.0])
    max_weight = {}
    for tau in (1.0, 0.3, 0.03):
        edge.temperature = tau
        tops = []
        for _ in range(200):
            edge.resample({})
            z = edge.op_weights()
            assert float(z.sum()) == pytest.approx(1.0, abs=1e-6)
            tops.append(float(z.max()))
        max_weight[tau] = sum(tops) / len(tops)
    assert max_weight[1.0] < max_weight[0.3] < max_weight[0.03]
    assert max_weight[0.03] > 0.97  # nearly one-hot


def test_argmax_of_z_is_a_sample_of_softmax_alpha():
    """Gumbel-max: the index of the largest ``Z`` follows ``Categorical(softmax(alpha))``, whatever lambda."""
    torch.manual_seed(1)
    alpha = [1.0, 0.0, -1.0, 0.5, 0.2]
    edge = _edge(alpha, temperature=0.5)
    counts = torch.zeros(len(OPS))
    n = 4000
    for _ in range(n):
        edge.resample({})
        counts[int(torch.argmax(edge.op_weights()))] += 1
    expected = torch.exp(torch.tensor(alpha)) / torch.exp(torch.tensor(alpha)).sum()
    assert torch.allclose(counts / n, expected, atol=0.03)


def test_forward_mixes_every_candidate_with_z():
    torch.manual_seed(2)
    edge = _edge([0.3, 0.1, -0.2, 0.4, 0.0], temperature=0.7)
    edge.resample({})
    x = torch.randn(2, 1, 4, 4)
    z = edge.op_weights()
    expected = sum(z[i] * edge[name](x) for i, name in enumerate(OPS))
    torch.testing.assert_close(edge(x), expected)
    edge(x).sum().backward()
    assert edge.alpha.grad is not None and float(edge.alpha.grad.abs().sum()) > 0


def test_cells_of_a_type_share_the_noise():
    a, b = _edge([0.0] * 5), _edge([0.0] * 5)
    memo = a.resample({})
    b.resample(memo)
    torch.testing.assert_close(a.op_weights(), b.op_weights())


def test_exponential_temperature_endpoints():
    assert exponential_temperature(0, 150, 1.0, 0.03) == 1.0
    assert exponential_temperature(149, 150, 1.0, 0.03) == pytest.approx(0.03)
    assert exponential_temperature(74.5, 150, 1.0, 0.03) == pytest.approx(math.sqrt(0.03))
    assert exponential_temperature(3, 1, 1.0, 0.03) == 1.0


def test_expected_parametric_ops_is_the_sum_of_parametric_probabilities():
    alpha = [0.2, 0.1, -0.5, 1.0, 0.3]
    edges = {'e1': _edge(alpha), 'e2': _edge([0.0] * 5)}
    p = torch.exp(torch.tensor(alpha)) / torch.exp(torch.tensor(alpha)).sum()
    expected = float(p[3] + p[4]) + 2 / 5  # sep_conv_3x3, dil_conv_5x5; uniform edge: 2 of 5
    assert float(expected_parametric_ops(edges)) == pytest.approx(expected, rel=1e-6)


def test_export_is_the_darts_rule_on_softmax_alpha(tmp_path, monkeypatch):
    from nni_darts_variants.testing import run_tiny_search, tiny_loaders
    monkeypatch.setenv('HOME', str(tmp_path))
    strategy = Snas(**Snas.smoke_kwargs())
    run_tiny_search(strategy, max_epochs=1, loaders=tiny_loaders(n=16), workdir=str(tmp_path / 'run'))
    module = strategy.oneshot_module
    for cell in module.darts_cells().values():
        weights = {(node, j): dict(zip(edge.names, F.softmax(edge.alpha.detach(), -1).tolist()))
                   for node, j, edge in cell.iter_edges()}
        assert module.discretize(module.edge_weights(cell), cell) == darts_rule(weights)
    assert module.strategy.resource_weight == 1e-2
