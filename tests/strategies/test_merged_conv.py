"""MergeNAS's merged convolution: the invariants of algorithms.md section 7 (float64 where exactness matters)."""
from __future__ import annotations

import pytest
import torch

from nni_darts_variants.testing import count_depthwise_convs
import torch.nn as nn
import torch.nn.functional as F

from nni_darts_variants.merged_conv import (MERGEABLE_CONVS, MergedConv, MergedEdgeOp, linear_op_kernel,
                                            receptive_field_mask)
from search_spaces.ops import PRIMITIVES, DilConv, FactorizedReduce, PoolBN

CONVS = list(MERGEABLE_CONVS)
C = 4


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def _x(size: int = 11, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, C, size, size)


def _count_depthwise(monkeypatch) -> list[int]:
    return count_depthwise_convs(monkeypatch)


def test_masks_have_the_receptive_fields():
    sizes = {'sep_conv_3x3': (9, 3), 'sep_conv_5x5': (25, 5), 'dil_conv_3x3': (9, 5), 'dil_conv_5x5': (25, 9)}
    for name, (taps, field) in sizes.items():
        mask = receptive_field_mask(*MERGEABLE_CONVS[name], 9)
        assert int(mask.sum()) == taps
        rows = mask.sum(1).nonzero().flatten()
        assert int(rows.max() - rows.min()) + 1 == field and int(rows.min() + rows.max()) == 8  # centred
    assert MergedConv(C, 1, CONVS).kernel_size == 9
    assert MergedConv(C, 1, ['sep_conv_3x3', 'dil_conv_3x3']).kernel_size == 5
    with pytest.raises(ValueError, match='kernel_size'):
        MergedConv(C, 1, CONVS, kernel_size=7)


def test_merged_kernel_is_the_weighted_sum_of_masked_convolutions():
    conv = MergedConv(C, 1, CONVS)
    coefficients = torch.tensor([0.1, -0.7, 0.25, 1.3])
    x = _x()
    merged = F.conv2d(x, conv.mixed_depthwise_kernel(coefficients), padding=4, groups=C)
    separate = sum(c * F.conv2d(x, conv.masked_kernel(name), padding=4, groups=C)
                   for c, name in zip(coefficients, CONVS))
    torch.testing.assert_close(merged, separate, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('name', CONVS)
def test_masked_kernel_reproduces_the_small_convolution(name, stride):
    conv = MergedConv(C, stride, CONVS)
    kernel, dilation = MERGEABLE_CONVS[name]
    field = dilation * (kernel - 1) + 1
    start = (9 - field) // 2
    taps = conv.weight.detach()[:, :, start:start + field:dilation, start:start + field:dilation]
    reference = nn.Conv2d(C, C, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation, groups=C,
                          bias=False)
    reference.weight.data.copy_(taps)
    x = _x()
    merged = F.conv2d(x, conv.masked_kernel(name), stride=stride, padding=4, groups=C)
    torch.testing.assert_close(merged, reference(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('stride', [1, 2])
def test_linear_kernels_reproduce_identity_and_average_pooling(stride):
    x = _x()
    if stride == 1:
        torch.testing.assert_close(MergedConv(C, 1, ['skip_connect'])(x, [1.0]), x, rtol=0, atol=1e-15)
    avg = MergedConv(C, stride, ['avg_pool_3x3'])(x, [1.0])
    torch.testing.assert_close(avg, nn.AvgPool2d(3, stride, 1, count_include_pad=True)(x), rtol=1e-12, atol=1e-12)
    # DARTS's pooling excludes the padding: the same inside, different on the border (documented deviation).
    darts = nn.AvgPool2d(3, stride, 1, count_include_pad=False)(x)
    torch.testing.assert_close(avg[..., 1:-1, 1:-1], darts[..., 1:-1, 1:-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(avg[..., 0, 0], darts[..., 0, 0] * 4 / 9, rtol=1e-12, atol=1e-12)
    assert torch.equal(linear_op_kernel('skip_connect', 3), torch.tensor([[0., 0, 0], [0, 1, 0], [0, 0, 0]]))


@pytest.mark.parametrize('name', ['sep_conv_3x3', 'dil_conv_3x3', 'dil_conv_5x5'])
def test_single_convolution_is_one_relu_dw_pw_bn_block(name):
    """With one-hot weights a convolution candidate is DARTS's DilConv block on the masked taps (sep: one block)."""
    merged = MergedConv(C, 2, CONVS + ['avg_pool_3x3'])
    kernel, dilation = MERGEABLE_CONVS[name]
    block = DilConv(C, C, kernel, 2, dilation * (kernel // 2), dilation, affine=False)
    field = dilation * (kernel - 1) + 1
    start = (9 - field) // 2
    block[1].weight.data.copy_(merged.weight.detach()[:, :, start:start + field:dilation, start:start + field:dilation])
    block[2].weight.data.copy_(merged.pointwise.weight.detach())
    weights = torch.tensor([float(n == name) for n in merged.candidates])
    x = _x()
    torch.testing.assert_close(merged(x, weights), block(x), rtol=1e-10, atol=1e-10)


def test_edge_with_one_hot_weights_is_each_candidate():
    x = _x(size=10)
    for stride in (1, 2):
        edge = MergedEdgeOp(C, stride, PRIMITIVES)
        expected = {
            'none': torch.zeros_like(x[:, :, ::stride, ::stride]),
            'max_pool_3x3': PoolBN('max', C, stride, affine=False, bn=True)(x),
            'avg_pool_3x3': nn.AvgPool2d(3, stride, 1, count_include_pad=True)(x),
        }
        if stride == 1:
            expected['skip_connect'] = x
        else:
            reduce = FactorizedReduce(C, C, affine=False)
            reduce.load_state_dict(edge.branches['skip_connect'].state_dict())
            expected['skip_connect'] = reduce(x)
        for name, value in expected.items():
            weights = torch.tensor([float(n == name) for n in PRIMITIVES])
            torch.testing.assert_close(edge(x, weights), value, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize('stride', [1, 2])
def test_one_depthwise_convolution_per_forward(monkeypatch, stride):
    edge = MergedEdgeOp(C, stride, PRIMITIVES)
    calls = _count_depthwise(monkeypatch)
    edge(_x(), torch.softmax(torch.randn(len(PRIMITIVES)), 0))
    assert len(calls) == 1
    assert calls[0] == 2 * C  # conv taps on relu(x) and the linear taps on x share the call


def test_gradient_reaches_only_taps_of_weighted_masks():
    conv = MergedConv(C, 1, CONVS + ['skip_connect'])
    for active in (['sep_conv_3x3'], ['dil_conv_3x3', 'sep_conv_3x3'], ['dil_conv_5x5']):
        conv.zero_grad()
        weights = torch.tensor([0.5 if n in active else 0.0 for n in conv.candidates])
        weights[-1] = 0.3  # skip carries weight but has no taps in W
        conv(_x(), weights).pow(2).sum().backward()
        union = sum(receptive_field_mask(*MERGEABLE_CONVS[n], 9) for n in active).clamp(max=1).bool()
        grad = conv.weight.grad.abs().sum((0, 1))
        assert torch.all(grad[~union] == 0)
        assert torch.all(grad[union] > 0)


def test_convolution_mass_scales_the_convolution_part():
    """Scaling all convolution weights scales their contribution (BN would otherwise remove a common scale)."""
    conv = MergedConv(C, 1, ['sep_conv_3x3', 'dil_conv_5x5'])
    x = _x()
    base = conv(x, [0.2, 0.3])
    torch.testing.assert_close(conv(x, [0.4, 0.6]), 2 * base, rtol=1e-10, atol=1e-12)
    assert torch.all(conv(x, [0.0, 0.0]) == 0)


def test_fewer_parameters_than_the_darts_edge():
    from search_spaces.ops import build_op
    channels = 16
    merged = sum(p.numel() for p in MergedEdgeOp(channels, 1, PRIMITIVES).parameters())
    darts = sum(p.numel() for n in PRIMITIVES for p in build_op(n, channels, 1, False, True).parameters())
    assert merged == 81 * channels + channels * channels  # one 9x9 depthwise kernel and one pointwise conv
    assert darts == 6 * channels * channels + 2 * (9 + 25) * channels + 9 * channels + 25 * channels


def test_bad_input_raises():
    with pytest.raises(ValueError, match='cannot be merged'):
        MergedConv(C, 2, ['skip_connect'])
    with pytest.raises(ValueError, match='cannot be merged'):
        MergedConv(C, 1, ['max_pool_3x3'])
    with pytest.raises(ValueError, match='unknown operation'):
        MergedEdgeOp(C, 1, ['conv_7x7'])
    with pytest.raises(ValueError, match='stride'):
        MergedEdgeOp(C, 3, ['none'])
    with pytest.raises(ValueError, match='weights'):
        MergedEdgeOp(C, 1, ['none', 'sep_conv_3x3'])(_x(), [1.0])


@pytest.mark.parametrize('kernel_size,dilation,size', [(3, 1, 4), (3, 2, 3), (5, 2, 8)])
def test_receptive_field_mask_refuses_an_even_or_too_small_size(kernel_size, dilation, size):
    """A centred mask needs an odd size at least the receptive field ``d (k - 1) + 1`` (each alone is refused)."""
    with pytest.raises(ValueError, match='mask size must be odd'):
        receptive_field_mask(kernel_size, dilation, size)
