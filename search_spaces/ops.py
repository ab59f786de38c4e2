"""The DARTS candidate operations (Liu et al., ICLR 2019), for search and for retraining.

The same classes build both networks. The search network of the official code uses non-affine batch norm inside
cells and follows each pooling with a batch norm (``affine=False, pool_bn=True``); the evaluation network uses affine
batch norm and bare pools (``affine=True, pool_bn=False``).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'PRIMITIVES', 'OPS', 'build_op', 'Zero', 'FactorizedReduce', 'ReLUConvBN', 'SepConv', 'DilConv', 'PoolBN',
    'DepthwiseConv2d', 'MaxPool2d', 'nchw_on_cpu', 'outputs_sharing_relu',
]

#: The DARTS search-space operations, in the official order (``none`` first).
PRIMITIVES: tuple[str, ...] = (
    'none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect',
    'sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5',
)


class Zero(nn.Module):
    """The ``none`` operation: a zero tensor of the output shape (strided on reduction edges).

    ``is_zero`` tells the mixed edges that its weighted output can be left out of their sum.
    """

    is_zero = True

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


class _ReLUFirst(nn.Sequential):
    """A sequence whose first layer is a ReLU: ``forward_after_relu(relu(x)) == forward(x)``, so that the candidates
    of one edge can share the ReLU of their common input (:func:`outputs_sharing_relu`)."""

    @property
    def starts_with_relu(self) -> bool:
        """Whether the first layer is (still) a plain ReLU: one replaced by the user (e.g. a Tanh) runs itself."""
        return type(self[0]) is nn.ReLU

    def forward_after_relu(self, x: torch.Tensor) -> torch.Tensor:
        for layer in list(self._modules.values())[1:]:
            x = layer(x)
        return x


class ReLUConvBN(_ReLUFirst):
    """ReLU, convolution, batch norm: the cell input preprocessing (and NAS-Bench-201's convolutions)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


def _space_to_batch(t: torch.Tensor, d: int) -> torch.Tensor:
    """``(N, C, H, W) -> (N*d*d, C, H/d, W/d)``: the ``d x d`` phases of ``t`` as separate images (a dilated
    convolution of ``t`` is the undilated one of each phase), in ``t``'s memory format."""
    n, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        phases = t.permute(0, 2, 3, 1).reshape(n, h // d, d, w // d, d, c).permute(0, 2, 4, 5, 1, 3)
        return phases.reshape(n * d * d, c, h // d, w // d).contiguous(memory_format=torch.channels_last)
    return t.reshape(n, c, h // d, d, w // d, d).permute(0, 3, 5, 1, 2, 4).reshape(n * d * d, c, h // d, w // d)


class _DilatedDepthwise(torch.autograd.Function):
    """A stride-1 dilated depthwise convolution with "same" padding, whose backward avoids oneDNN's slow dilated
    backward on CPU: the input gradient is the convolution of the output gradient with the flipped kernel (same
    dilation and padding), the weight gradient the undilated weight gradient over the ``d x d`` phases.

    Both are the same sums as the native backward, in another order (float rounding)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int],
                dilation: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation = padding, dilation
        return F.conv2d(x, weight, None, 1, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        channels, d = weight.shape[0], ctx.dilation[0]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-1, -2), None, 1, ctx.padding, ctx.dilation, channels)
        if ctx.needs_input_grad[1]:
            half = ((weight.shape[-2] - 1) // 2, (weight.shape[-1] - 1) // 2)
            grad_w = torch.ops.aten.convolution_backward(
                _space_to_batch(grad, d), _space_to_batch(x, d), weight, None, (1, 1), half, (1, 1), False, (0, 0),
                channels, (False, True, False))[1]
        return grad_x, grad_w, None, None


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise convolution (``groups == in_channels == out_channels``, no bias), as ``nn.Conv2d``.

    Dilated ones are rewritten when they train on CPU, where oneDNN's dilated depthwise backward is 5-20x slower than
    the forward (``benchmarks/depthwise_backward.py``): at stride = dilation (DARTS's ``dil_conv`` on reduction edges)
    as the undilated convolution of the subsampled input (the same products and sums: bitwise the native result),
    at stride 1 with a custom backward (:class:`_DilatedDepthwise`, equal within float rounding). Forwards without
    gradient, on other devices, traced, scripted or compiled run ``nn.Conv2d``'s own. ``fast_backward = False``
    switches the rewrite off (the exactness tests compare both).
    """

    fast_backward: ClassVar[bool] = True

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=channels, bias=False)

    def _rewrite(self, x: torch.Tensor) -> str | None:
        if not (self.fast_backward and self.dilation != (1, 1) and x.device.type == 'cpu' and x.dim() == 4
                and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                and self.padding_mode == 'zeros' and isinstance(self.padding, tuple)):
            return None
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
            return None
        (dh, dw), (ph, pw), (kh, kw) = self.dilation, self.padding, self.kernel_size
        if dh != dw:
            return None
        if self.stride == (1, 1) and kh % 2 and kw % 2 and 2 * ph == dh * (kh - 1) and 2 * pw == dw * (kw - 1) \
                and x.shape[-2] % dh == 0 and x.shape[-1] % dw == 0:
            return 'phases'
        if self.stride == self.dilation and ph % dh == 0 and pw % dw == 0:
            return 'subsample'
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rewrite = self._rewrite(x)
        if rewrite == 'phases':
            return _DilatedDepthwise.apply(x, self.weight, self.padding, self.dilation)
        if rewrite == 'subsample':
            (dh, dw), (ph, pw) = self.dilation, self.padding
            return F.conv2d(x[:, :, ::dh, ::dw], self.weight, None, 1, (ph // dh, pw // dw), 1, self.groups)
        return super().forward(x)


def nchw_on_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a plain NCHW CPU tensor outside tracing, scripting and compilation (the condition of the
    channels-last rewrites: ``MaxPool2d`` here, the mixed edges of the strategies)."""
    return (x.device.type == 'cpu' and x.dim() == 4 and x.is_contiguous()
            and not x.is_contiguous(memory_format=torch.channels_last)
            and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()))


class DilConv(_ReLUFirst):
    """ReLU, depthwise (dilated) convolution, pointwise convolution, batch norm."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(c_in, kernel_size, stride=stride, padding=padding, dilation=dilation),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """The DARTS separable convolution: the depthwise-pointwise block applied twice (stride only in the first)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(c_in, c_in, kernel_size, stride, padding, 1, affine=affine),
            DilConv(c_in, c_out, kernel_size, 1, padding, 1, affine=affine),
        )

    @property
    def starts_with_relu(self) -> bool:
        return self[0].starts_with_relu

    def forward_after_relu(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](self[0].forward_after_relu(x))


class FactorizedReduce(nn.Module):
    """Halve the resolution with two offset stride-2 1x1 convolutions, concatenated (``skip_connect`` at stride 2)."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        if c_out % 2:
            raise ValueError(f'FactorizedReduce needs an even number of output channels, got {c_out}')
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    @property
    def starts_with_relu(self) -> bool:
        return type(self.relu) is nn.ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_after_relu(self.relu(x))

    def forward_after_relu(self, x: torch.Tensor) -> torch.Tensor:
        shifted = x[:, :, 1:, 1:]
        if x.shape[-1] % 2 or x.shape[-2] % 2:  # odd sizes: pad so both branches give ceil(size / 2)
            shifted = nn.functional.pad(shifted, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2))
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools an NCHW input on CPU in channels-last (and returns NCHW): oneDNN's NHWC max pool
    is several times faster there, and picks the same maxima, so output and gradient are bitwise those of the NCHW
    kernel (``tests/test_depthwise.py``). Traced, scripted, compiled and non-CPU forwards run the plain pool;
    ``via_channels_last = False`` switches it off."""

    via_channels_last: ClassVar[bool] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.via_channels_last and not self.return_indices and nchw_on_cpu(x):
            return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return super().forward(x)


def _profile_as_parent(cls: type[nn.Module], parent: nn.Module) -> None:
    """Give ``cls`` the shape-inference and FLOPs formulas NNI's profilers hold for the module ``parent`` stands for:
    they look formulas up by exact type, so a subclass would otherwise fail shape inference (and count no FLOPs)."""
    from nni.nas.profiler.pytorch.flops import find_flops_formula, register_flops_formula
    from nni.nas.profiler.pytorch.utils.shape_formula import (find_shape_inference_formula,
                                                              register_shape_inference_formula)
    register_shape_inference_formula(cls, find_shape_inference_formula(parent))
    flops = find_flops_formula(parent)
    if flops is not None:  # NNI has none for pools: they count nothing, as an unregistered type does
        register_flops_formula(cls, flops)


_profile_as_parent(DepthwiseConv2d, nn.Conv2d(1, 1, 1))
_profile_as_parent(MaxPool2d, nn.MaxPool2d(1))


class PoolBN(nn.Sequential):
    """3x3 max or average pooling, followed by a batch norm in the search network."""

    def __init__(self, kind: str, channels: int, stride: int, affine: bool = True, bn: bool = True):
        if kind == 'max':
            pool: nn.Module = MaxPool2d(3, stride=stride, padding=1)
        elif kind == 'avg':
            pool = nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
        else:
            raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")
        layers = [pool] + ([nn.BatchNorm2d(channels, affine=affine)] if bn else [])
        super().__init__(*layers)


def _hooked(module: nn.Module) -> bool:
    """Whether a forward hook would see the module or one of its layers (its own, or a global one): such a module
    runs through its own ``__call__`` (profilers, counters and users' hooks keep working), unshared."""
    from torch.nn.modules import module as torch_module
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def outputs_sharing_relu(modules: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """``[m(x) for m in modules]``, with one ``relu(x)`` for all the modules that start with a ReLU
    (``starts_with_relu``: the sep and dil convs, ``FactorizedReduce``, ``ReLUConvBN``).

    The outputs are bitwise those of the modules; the gradient to ``x`` is the same sum, in float rounding
    (the ReLU's mask is applied once to the sum of the candidates' gradients instead of to each). A module with a
    forward hook on it or on one of its layers runs whole, so that the hook fires.
    """
    relu: torch.Tensor | None = None
    outputs = []
    for module in modules:
        if getattr(module, 'starts_with_relu', False) and not _hooked(module):
            if relu is None:
                relu = F.relu(x)
            outputs.append(module.forward_after_relu(relu))
        else:
            outputs.append(module(x))
    return outputs


OpFactory = Callable[[int, int, bool, bool], nn.Module]

#: Factories ``(channels, stride, affine, pool_bn) -> module`` for every DARTS primitive and NAS-Bench-201 op.
OPS: dict[str, OpFactory] = {
    'none': lambda c, s, affine, pool_bn: Zero(s),
    'max_pool_3x3': lambda c, s, affine, pool_bn: PoolBN('max', c, s, affine, pool_bn),
    'avg_pool_3x3': lambda c, s, affine, pool_bn: PoolBN('avg', c, s, affine, pool_bn),
    'skip_connect': lambda c, s, affine, pool_bn: nn.Identity() if s == 1 else FactorizedReduce(c, c, affine),
    'sep_conv_3x3': lambda c, s, affine, pool_bn: SepConv(c, c, 3, s, 1, affine),
    'sep_conv_5x5': lambda c, s, affine, pool_bn: SepConv(c, c, 5, s, 2, affine),
    'dil_conv_3x3': lambda c, s, affine, pool_bn: DilConv(c, c, 3, s, 2, 2, affine),
    'dil_conv_5x5': lambda c, s, affine, pool_bn: DilConv(c, c, 5, s, 4, 2, affine),
    # NAS-Bench-201's convolutions (ReLU-Conv-BN, dense); its none, skip_connect and avg_pool_3x3 (pool_bn=False)
    # are the entries above. The official conv has a bias when BN is not affine: BN removes it, so it is left out.
    'nor_conv_1x1': lambda c, s, affine, pool_bn: ReLUConvBN(c, c, 1, s, 0, affine),
    'nor_conv_3x3': lambda c, s, affine, pool_bn: ReLUConvBN(c, c, 3, s, 1, affine),
}


def build_op(name: str, channels: int, stride: int, affine: bool, pool_bn: bool = False) -> nn.Module:
    """Build one DARTS operation by name; an unknown name lists the valid ones."""
    if name not in OPS:
        raise ValueError(f'unknown operation {name!r}; valid operations: {", ".join(OPS)}')
    return OPS[name](channels, stride, affine, pool_bn)
