"""``DepthwiseConv2d``'s rewrite of dilated depthwise convolutions against torch's own convolution.

The expectation is ``torch.nn.functional.conv2d`` with the same weight (torch's native forward and backward, an
implementation independent of the rewrite), in float64: forward and both gradients within float64 rounding, and
bitwise where the rewrite does the same products and sums (stride = dilation: the subsampled input).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from search_spaces.ops import DepthwiseConv2d

# (kernel, stride, padding, dilation, rewrite taken): DARTS's dil convs in cells (stride 1) and on reduction edges
CASES = [(3, 1, 2, 2, 'phases'), (5, 1, 4, 2, 'phases'), (3, 2, 2, 2, 'subsample'), (5, 2, 4, 2, 'subsample'),
         (3, 1, 3, 3, 'phases'), (3, 1, 1, 1, None), (5, 2, 2, 1, None), (3, 1, 1, 2, None)]


def _pair(kernel, stride, padding, dilation, channels_last, size=8):
    torch.manual_seed(0)
    conv = DepthwiseConv2d(6, kernel, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(3, 6, size, size, dtype=torch.float64)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return conv, x.requires_grad_()


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('kernel, stride, padding, dilation, rewrite', CASES)
def test_rewrite_equals_native_convolution(kernel, stride, padding, dilation, rewrite, channels_last):
    size = 9 if dilation == 3 else 8
    conv, x = _pair(kernel, stride, padding, dilation, channels_last, size)
    assert conv._rewrite(x) == rewrite
    out = conv(x)
    upstream = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, [x, conv.weight], upstream)
    ref = F.conv2d(x, conv.weight, None, stride, padding, dilation, 6)
    ref_gx, ref_gw = torch.autograd.grad(ref, [x, conv.weight], upstream)
    assert out.shape == ref.shape
    if rewrite == 'phases':  # the gradients sum the same terms in another order
        assert torch.equal(out, ref)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(gw, ref_gw, rtol=1e-12, atol=1e-13)
    else:
        assert torch.equal(out, ref) and torch.equal(gx, ref_gx) and torch.equal(gw, ref_gw)
    if channels_last and rewrite:
        assert gx.is_contiguous(memory_format=torch.channels_last) or gx.is_contiguous()


def test_input_gradient_only_when_the_weight_is_frozen():
    conv, x = _pair(5, 1, 4, 2, False)
    conv.weight.requires_grad_(False)
    out = conv(x)
    gx, = torch.autograd.grad(out.square().sum(), [x])
    ref_gx, = torch.autograd.grad(F.conv2d(x, conv.weight, None, 1, 4, 2, 6).square().sum(), [x])
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize('why', ['no_grad', 'odd_size', 'switched_off'])
def test_native_convolution_where_the_rewrite_does_not_apply(why, monkeypatch):
    conv, x = _pair(3, 1, 2, 2, False, size=7 if why == 'odd_size' else 8)
    if why == 'switched_off':
        monkeypatch.setattr(DepthwiseConv2d, 'fast_backward', False)
    with torch.set_grad_enabled(why != 'no_grad'):
        assert conv._rewrite(x) is None
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, None, 1, 2, 2, 6))


def test_state_dict_is_that_of_a_conv2d():
    """Checkpoints and retrain weights written before the rewrite load unchanged: the same keys and shapes."""
    conv = DepthwiseConv2d(4, 3, padding=2, dilation=2)
    plain = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False)
    assert {k: v.shape for k, v in conv.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    conv.load_state_dict(plain.state_dict())


@pytest.mark.parametrize('stride', [1, 2])
def test_max_pool_through_channels_last_is_bitwise_the_nchw_pool(stride, monkeypatch):
    """The NCHW max pool, computed in NHWC: the same maxima (ties included: ReLU'd inputs have many zeros), the
    same gradient, an NCHW result."""
    from search_spaces.ops import MaxPool2d
    monkeypatch.setattr(MaxPool2d, 'via_channels_last', True)  # an option, off by default
    torch.manual_seed(0)
    x = torch.randn(3, 5, 9, 9, dtype=torch.float64).relu().requires_grad_()
    pool = MaxPool2d(3, stride=stride, padding=1)
    out = pool(x)
    upstream = torch.randn_like(out)
    gx, = torch.autograd.grad(out, [x], upstream)
    ref = F.max_pool2d(x, 3, stride, 1)
    ref_gx, = torch.autograd.grad(ref, [x], upstream)
    assert out.is_contiguous() and torch.equal(out, ref) and torch.equal(gx, ref_gx)


def test_mixed_edge_runs_its_candidates_in_channels_last_and_returns_nchw(monkeypatch):
    """A DARTS mixed edge on an NCHW CPU input: every candidate convolution and pool sees a channels-last input, the
    edge gives NCHW back, equal to the edge run in NCHW throughout (torch's kernels) within float64 rounding, the
    input, alpha and weight gradients included."""
    from nni.mutable import frozen_context

    from nni_darts_variants.strategies.base import MixedEdge
    from search_spaces import ops
    monkeypatch.setattr(MixedEdge, 'channels_last_inside', True)  # options, off by default
    monkeypatch.setattr(ops.MaxPool2d, 'via_channels_last', True)
    torch.manual_seed(0)
    candidates = {name: ops.build_op(name, 6, 1, affine=False, pool_bn=True) for name in ops.PRIMITIVES}
    alpha = torch.nn.Parameter(torch.randn(len(ops.PRIMITIVES), dtype=torch.float64))
    with frozen_context():
        edge = MixedEdge(candidates, alpha, 'e').double()
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64, requires_grad=True)
    formats = []
    hooks = [m.register_forward_pre_hook(lambda m, a: formats.append(a[0].is_contiguous(
        memory_format=torch.channels_last))) for m in edge.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d))]
    out = edge(x)
    for h in hooks:
        h.remove()
    assert len(formats) == 4 * 3 + 2 and all(formats) and out.is_contiguous()
    params = [x, *edge.parameters()]
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, upstream)
    monkeypatch.setattr(MixedEdge, 'channels_last_inside', False)
    monkeypatch.setattr(ops.MaxPool2d, 'via_channels_last', False)
    monkeypatch.setattr(DepthwiseConv2d, 'fast_backward', False)
    ref = edge(x)
    ref_grads = torch.autograd.grad(ref, params, upstream)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-13)
