"""MergeNAS's merged convolution: the candidate operations of an edge run as ONE depthwise convolution.

`Wang, Xue, Yan, Yang, Hu, Sun. MergeNAS: Merge Operations into One for Differentiable Architecture Search.
IJCAI 2020 <https://www.ijcai.org/proceedings/2020/424>`__. No code was published; this module is a reconstruction
from the abstract and the authors' patent (US 12,141,681 B2, "merge operations for DARTS": candidate convolutions
merged into one larger convolution whose kernel is a weighted average of theirs, depthwise and pointwise weights
reused). What follows the paper and what is reconstructed:

* Shared kernel (paper): the depthwise convolutions of an edge share one ``m x m`` kernel ``W`` per channel
  (``m = 9`` covers ``dil_conv_5x5``; ``m`` is the smallest size covering the candidates). Each candidate's kernel is
  ``W`` times its receptive-field mask: ``sep_conv_3x3`` the centre 3x3, ``sep_conv_5x5`` the centre 5x5,
  ``dil_conv_3x3`` 9 taps two apart in 5x5, ``dil_conv_5x5`` 25 taps two apart in 9x9. By linearity the mixture of
  the candidates is a convolution with ``W * sum_o w_o M_o``; one shared pointwise convolution and batch norm follow.
* One separable block (reconstructed): DARTS's ``sep_conv`` applies the depthwise-pointwise block twice. A merged
  edge runs one block (ReLU, merged depthwise, pointwise, BN), so during the search ``sep_conv_kxk`` is a single
  block; the exported genotype names DARTS's ops, which are retrained as DARTS builds them (two blocks).
* Mixture scale (reconstructed): BN removes any common scale of the mixed kernel, so the convolution part is
  ``s * BN(pw(dw(relu(x), W * sum_o (w_o / s) M_o))`` with ``s`` the summed weight of the convolution candidates:
  the weight that the alphas give to "convolution" versus the other candidates is kept.
* Parameter-free linear ops (reconstructed): ``skip_connect`` (stride 1) is a centre delta and ``avg_pool_3x3`` a
  1/9 box kernel. They act on the input without ReLU, pointwise convolution or BN, so their kernel
  ``w_skip * delta + w_avg * box`` is applied to ``x`` in the SAME depthwise call: the call's input is
  ``cat([relu(x), x])`` and its weight ``cat([W * mask_mix, linear kernel])`` (``groups = 2C``). Zero padding makes
  the box kernel ``AvgPool2d(3, stride, 1, count_include_pad=True)``; DARTS uses ``count_include_pad=False``, so
  the two differ on the border pixels (the corner is 4/9 of DARTS's value). DARTS's search network follows each
  pooling with a non-affine BN; a folded average pooling has none (BN depends on the batch, it is not a kernel).
* Not merged (as the paper's "operations that are convolutions"): ``max_pool_3x3`` (with its BN) and
  ``skip_connect`` on a stride-2 edge (``FactorizedReduce``, which is not a depthwise kernel) stay separate branches
  of :class:`MergedEdgeOp`; ``none`` contributes 0 (its weight only shrinks the others).

:class:`MergedConv` is the merged convolution; :class:`MergedEdgeOp` a complete DARTS edge built around it. Both take
the candidate names at construction and the weights vector at call time, so they fit any user space.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from search_spaces.ops import FactorizedReduce, PoolBN, Zero

__all__ = ['MergedConv', 'MergedEdgeOp', 'MergedDenseEdgeOp', 'MERGEABLE_CONVS', 'DENSE_CONVS', 'LINEAR_OPS',
           'is_mergeable', 'receptive_field_mask', 'linear_op_kernel']

#: Convolution candidates that share the merged kernel: name -> (kernel size, dilation).
MERGEABLE_CONVS: dict[str, tuple[int, int]] = {
    'sep_conv_3x3': (3, 1), 'sep_conv_5x5': (5, 1), 'dil_conv_3x3': (3, 2), 'dil_conv_5x5': (5, 2),
}
#: NAS-Bench-201's dense ReLU-Conv-BN candidates that share one merged 3x3 kernel: name -> kernel size.
DENSE_CONVS: dict[str, int] = {'nor_conv_1x1': 1, 'nor_conv_3x3': 3}
#: Parameter-free linear candidates folded into the same depthwise call (``skip_connect`` at stride 1 only).
LINEAR_OPS: tuple[str, ...] = ('skip_connect', 'avg_pool_3x3')
_LINEAR_FIELD = {'skip_connect': 1, 'avg_pool_3x3': 3}


def is_mergeable(name: str, stride: int) -> bool:
    """Whether candidate ``name`` runs inside :class:`MergedConv` on an edge of this stride."""
    return name in MERGEABLE_CONVS or name == 'avg_pool_3x3' or (name == 'skip_connect' and stride == 1)


def _field(name: str) -> int:
    if name in MERGEABLE_CONVS:
        kernel, dilation = MERGEABLE_CONVS[name]
        return dilation * (kernel - 1) + 1
    return _LINEAR_FIELD[name]


def receptive_field_mask(kernel_size: int, dilation: int, size: int) -> torch.Tensor:
    """``size x size`` 0/1 mask of the taps of a ``kernel_size`` convolution with ``dilation``, centred."""
    field = dilation * (kernel_size - 1) + 1
    if size % 2 == 0 or field > size:
        raise ValueError(f'mask size must be odd and >= the receptive field {field}, got {size}')
    offsets = torch.arange(kernel_size) * dilation + (size - field) // 2
    mask = torch.zeros(size, size)
    mask[offsets[:, None], offsets[None, :]] = 1.0
    return mask


def linear_op_kernel(name: str, size: int) -> torch.Tensor:
    """The ``size x size`` kernel of a parameter-free linear op: a centre delta (skip) or a 1/9 box (avg pool)."""
    if name == 'skip_connect':
        return receptive_field_mask(1, 1, size)
    if name == 'avg_pool_3x3':
        return receptive_field_mask(3, 1, size) / 9.0
    raise ValueError(f'{name!r} is not a linear op; linear ops: {", ".join(LINEAR_OPS)}')


def _as_weights(weights: torch.Tensor | Sequence[float], n: int, like: torch.Tensor) -> torch.Tensor:
    weights = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if weights.shape != (n,):
        raise ValueError(f'expected {n} candidate weights, got shape {tuple(weights.shape)}')
    return weights


class MergedConv(nn.Module):
    """The merged convolution of MergeNAS: every mergeable candidate of an edge in one depthwise convolution.

    ``forward(x, weights)`` computes ``s * BN(pw(dw(relu(x), W * sum_o (w_o / s) M_o))) + dw(x, K_linear)`` with a
    single ``F.conv2d`` call (see the module docstring for what is reconstructed), where ``s`` sums the weights of the
    convolution candidates and ``K_linear = w_skip * delta + w_avg * box``.

    Parameters
    ----------
    channels
        Input and output channels.
    stride
        1, or 2 on reduction edges (the merged convolution is strided; ``skip_connect`` is then not allowed here).
    candidates
        Names from :data:`MERGEABLE_CONVS` and :data:`LINEAR_OPS`; ``weights`` follow this order.
    affine
        Affine batch norm (``False`` in the DARTS search network).
    kernel_size
        Size ``m`` of the shared kernel; default the smallest odd size covering every candidate (9 with
        ``dil_conv_5x5``).
    """

    def __init__(self, channels: int, stride: int, candidates: Sequence[str], *, affine: bool = False,
                 kernel_size: int | None = None):
        super().__init__()
        candidates = list(candidates)
        _check_common(channels, stride, candidates)
        bad = [n for n in candidates if not is_mergeable(n, stride)]
        if bad:
            raise ValueError(f'{bad} cannot be merged on a stride-{stride} edge; mergeable: '
                             f'{", ".join(MERGEABLE_CONVS)}, avg_pool_3x3, skip_connect (stride 1); use MergedEdgeOp '
                             'for the others')
        needed = max(_field(n) for n in candidates)
        size = needed if kernel_size is None else kernel_size
        if size < needed or size % 2 == 0:
            raise ValueError(f'kernel_size must be odd and >= {needed} for {candidates}, got {kernel_size}')
        self.channels, self.stride, self.kernel_size = channels, stride, size
        self.candidates = candidates
        self.conv_names = [n for n in candidates if n in MERGEABLE_CONVS]
        self.linear_names = [n for n in candidates if n not in MERGEABLE_CONVS]
        self.register_buffer('conv_index', torch.tensor([candidates.index(n) for n in self.conv_names]),
                             persistent=False)
        self.register_buffer('linear_index', torch.tensor([candidates.index(n) for n in self.linear_names]),
                             persistent=False)
        masks = [receptive_field_mask(*MERGEABLE_CONVS[n], size) for n in self.conv_names]
        self.register_buffer('conv_masks', torch.stack(masks) if masks else torch.zeros(0, size, size),
                             persistent=False)
        linear = [linear_op_kernel(n, size) for n in self.linear_names]
        self.register_buffer('linear_kernels', torch.stack(linear) if linear else torch.zeros(0, size, size),
                             persistent=False)
        if self.conv_names:
            self.weight = nn.Parameter(torch.empty(channels, 1, size, size))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
            self.bn = nn.BatchNorm2d(channels, affine=affine)

    def masked_kernel(self, name: str) -> torch.Tensor:
        """``W * M_name``: the depthwise kernel of one convolution candidate, shape ``(C, 1, m, m)``."""
        return self.weight * self.conv_masks[self.conv_names.index(name)]

    def mixed_depthwise_kernel(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``W * sum_o c_o M_o`` over the convolution candidates (``coefficients`` in ``conv_names`` order)."""
        mask = torch.einsum('o,oij->ij', coefficients.to(self.conv_masks.dtype), self.conv_masks)
        return self.weight * mask

    def linear_kernel(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``sum_o c_o K_o`` over the linear candidates, shape ``(m, m)``."""
        return torch.einsum('o,oij->ij', coefficients.to(self.linear_kernels.dtype), self.linear_kernels)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
        weights = _as_weights(weights, len(self.candidates), x)
        inputs, kernels = [], []
        c, m = self.channels, self.kernel_size
        if self.conv_names:
            conv_weights = weights[self.conv_index]
            conv_mass = conv_weights.sum()
            coefficients = conv_weights / conv_mass.clamp_min(torch.finfo(x.dtype).tiny)
            inputs.append(F.relu(x))
            kernels.append(self.mixed_depthwise_kernel(coefficients))
        if self.linear_names:
            inputs.append(x)
            kernels.append(self.linear_kernel(weights[self.linear_index]).expand(c, 1, m, m))
        source = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=1)
        merged = F.conv2d(source, torch.cat(kernels), stride=self.stride, padding=m // 2, groups=source.shape[1])
        if not self.conv_names:
            return merged
        out = conv_mass * self.bn(self.pointwise(merged[:, :c]))
        return out + merged[:, c:] if self.linear_names else out


class MergedEdgeOp(nn.Module):
    """A whole DARTS edge the MergeNAS way: :class:`MergedConv` for the mergeable candidates, branches for the rest.

    ``forward(x, weights) = MergedConv(x, w[mergeable]) + sum_b w_b * branch_b(x)``: the branches are
    ``max_pool_3x3`` (pooling, plus BN when ``pool_bn``) and, on a stride-2 edge, ``skip_connect``
    (``FactorizedReduce``); ``none`` adds nothing. Exactly one depthwise convolution runs per call.

    Parameters
    ----------
    channels
        Input and output channels.
    stride
        1 or 2.
    candidates
        DARTS operation names (any subset of ``ops.PRIMITIVES``); ``weights`` follow this order.
    affine
        Affine batch norms (``False`` in the DARTS search network).
    pool_bn
        Batch norm after max pooling (``True`` in the DARTS search network).
    """

    def __init__(self, channels: int, stride: int, candidates: Sequence[str], *, affine: bool = False,
                 pool_bn: bool = True):
        super().__init__()
        candidates = list(candidates)
        _check_common(channels, stride, candidates)
        unknown = [n for n in candidates if n not in MERGEABLE_CONVS and n not in ('none', 'max_pool_3x3',
                                                                                   'avg_pool_3x3', 'skip_connect')]
        if unknown:
            raise ValueError(f'unknown operation(s) {unknown} for a merged edge; valid: none, max_pool_3x3, '
                             f'avg_pool_3x3, skip_connect, {", ".join(MERGEABLE_CONVS)}')
        self.channels, self.stride, self.candidates = channels, stride, candidates
        merged_names = [n for n in candidates if is_mergeable(n, stride)]
        self.merged = MergedConv(channels, stride, merged_names, affine=affine) if merged_names else None
        self.register_buffer('merged_index', torch.tensor([candidates.index(n) for n in merged_names]),
                             persistent=False)
        self.branches = nn.ModuleDict()
        for name in candidates:
            if name == 'max_pool_3x3':
                self.branches[name] = PoolBN('max', channels, stride, affine, pool_bn)
            elif name == 'skip_connect' and stride != 1:
                self.branches[name] = FactorizedReduce(channels, channels, affine)
        self.zero = Zero(stride)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
        weights = _as_weights(weights, len(self.candidates), x)
        outputs = [] if self.merged is None else [self.merged(x, weights[self.merged_index])]
        for name, branch in self.branches.items():
            outputs.append(weights[self.candidates.index(name)] * branch(x))
        return sum(outputs) if outputs else self.zero(x)


def _check_common(channels: int, stride: int, candidates: list[str]) -> None:
    if channels < 1:
        raise ValueError(f'channels must be positive, got {channels}')
    if stride not in (1, 2):
        raise ValueError(f'stride must be 1 or 2, got {stride}')
    if not candidates:
        raise ValueError('candidates is empty; give at least one operation name')
    if len(set(candidates)) != len(candidates):
        raise ValueError(f'duplicate candidates in {candidates}')


class MergedDenseEdgeOp(nn.Module):
    """A NAS-Bench-201 edge the MergeNAS way: ``nor_conv_1x1`` and ``nor_conv_3x3`` as ONE dense 3x3 convolution.

    The two dense convolutions share one kernel ``W`` (``C x C x 3 x 3``): ``nor_conv_1x1`` is ``W`` times the centre
    mask, ``nor_conv_3x3`` the whole of ``W``, so their mixture is ``s * BN(conv(relu(x), W * sum_o (w_o / s) M_o))``
    with ``s`` their summed weight (the same reconstruction as :class:`MergedConv`, dense instead of depthwise).
    ``skip_connect`` and ``avg_pool_3x3`` (bare in NAS-Bench-201: no BN) fold into one depthwise kernel
    ``w_skip * delta + w_avg * box`` on ``x`` (zero padding, so the average counts the border's zeros, unlike the
    benchmark's ``count_include_pad=False``); ``none`` adds nothing. Two convolution calls per edge instead of four ops.

    Parameters
    ----------
    channels
        Input and output channels.
    candidates
        Names from ``none``, ``skip_connect``, ``nor_conv_1x1``, ``nor_conv_3x3``, ``avg_pool_3x3``; ``weights``
        follow this order.
    affine
        Affine batch norm (``False`` in the NAS-Bench-201 search network).
    """

    def __init__(self, channels: int, candidates: Sequence[str], *, affine: bool = False):
        super().__init__()
        candidates = list(candidates)
        _check_common(channels, 1, candidates)
        unknown = [n for n in candidates if n not in DENSE_CONVS and n not in ('none', *LINEAR_OPS)]
        if unknown:
            raise ValueError(f'unknown operation(s) {unknown} for a merged NAS-Bench-201 edge; valid: none, '
                             f'{", ".join(LINEAR_OPS)}, {", ".join(DENSE_CONVS)}')
        self.channels, self.candidates = channels, candidates
        self.conv_names = [n for n in candidates if n in DENSE_CONVS]
        self.linear_names = [n for n in candidates if n in LINEAR_OPS]
        self.register_buffer('conv_index', torch.tensor([candidates.index(n) for n in self.conv_names],
                                                        dtype=torch.long), persistent=False)
        self.register_buffer('linear_index', torch.tensor([candidates.index(n) for n in self.linear_names],
                                                          dtype=torch.long), persistent=False)
        masks = [receptive_field_mask(DENSE_CONVS[n], 1, 3) for n in self.conv_names]
        self.register_buffer('conv_masks', torch.stack(masks) if masks else torch.zeros(0, 3, 3), persistent=False)
        linear = [linear_op_kernel(n, 3) for n in self.linear_names]
        self.register_buffer('linear_kernels', torch.stack(linear) if linear else torch.zeros(0, 3, 3),
                             persistent=False)
        if self.conv_names:
            self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            self.bn = nn.BatchNorm2d(channels, affine=affine)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
        weights = _as_weights(weights, len(self.candidates), x)
        out = x.new_zeros(())
        if self.conv_names:
            conv_weights = weights[self.conv_index]
            conv_mass = conv_weights.sum()
            coefficients = conv_weights / conv_mass.clamp_min(torch.finfo(x.dtype).tiny)
            mask = torch.einsum('o,oij->ij', coefficients, self.conv_masks)
            out = out + conv_mass * self.bn(F.conv2d(F.relu(x), self.weight * mask, padding=1))
        if self.linear_names:
            kernel = torch.einsum('o,oij->ij', weights[self.linear_index], self.linear_kernels)
            out = out + F.conv2d(x, kernel.expand(self.channels, 1, 3, 3), padding=1, groups=self.channels)
        return out if self.conv_names or self.linear_names else x.mul(0.)
