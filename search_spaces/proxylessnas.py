"""The ProxylessNAS MobileNetV2-style search space (Cai, Zhu, Han, ICLR 2019) as an NNI model space."""
from __future__ import annotations

import torch
import torch.nn as nn
from nni.nas.nn.pytorch import LayerChoice, ModelSpace, MutableModule
from nni.nas.nn.pytorch.base import recursive_freeze

__all__ = ['ProxylessSpace', 'MBConv', 'ZeroOp', 'SearchBlock', 'DATASET_PRESETS', 'CANDIDATES', 'STAGES',
           'make_divisible', 'candidate_name']

#: Per dataset: input channels, classes and stem stride (1 keeps 32x32 / 8x8 inputs from vanishing).
DATASET_PRESETS: dict[str, dict] = {
    'imagenet': {'in_channels': 3, 'num_classes': 1000, 'stem_stride': 2},
    'cifar10': {'in_channels': 3, 'num_classes': 10, 'stem_stride': 1},
    'digits': {'in_channels': 1, 'num_classes': 10, 'stem_stride': 1},
}

#: ``(width, blocks, stride of the first block)`` of each searchable stage (official ``imagenet_arch_search.py``).
STAGES: tuple[tuple[int, int, int], ...] = ((24, 4, 2), (40, 4, 2), (80, 4, 2), (96, 4, 1), (192, 4, 2), (320, 1, 1))

#: ``(expand ratio, kernel)`` of the MBConv candidates, in the official order (3x3_MBConv3, 3x3_MBConv6, 5x5_...).
CANDIDATES: tuple[tuple[int, int], ...] = tuple((e, k) for k in (3, 5, 7) for e in (3, 6))

_BN_EPS = 1e-3  # official bn_param (momentum 0.1, eps 1e-3)


def candidate_name(expand: int, kernel: int) -> str:
    """``'mb{expand}_k{kernel}'``, e.g. ``'mb6_k5'``."""
    return f'mb{expand}_k{kernel}'


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below 90 % of it (MobileNetV2's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out, eps=_BN_EPS)]
    if relu6:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Sequential):
    """Mobile inverted bottleneck: 1x1 expand + BN + ReLU6 (left out when ``expand == 1``), ``kernel``x``kernel``
    depthwise (stride ``stride``) + BN + ReLU6, 1x1 linear projection + BN. No residual: that belongs to the block."""

    def __init__(self, c_in: int, c_out: int, *, expand: int, kernel: int, stride: int):
        mid = c_in * expand
        layers = [_conv_bn(c_in, mid, 1)] if expand != 1 else []
        layers += [_conv_bn(mid, mid, kernel, stride, groups=mid), _conv_bn(mid, c_out, 1, relu6=False)]
        super().__init__(*layers)
        self.expand, self.kernel, self.stride = expand, kernel, stride


class ZeroOp(nn.Module):
    """The ``zero`` candidate: zeros of the input's shape, so that the block reduces to its identity shortcut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.)


class SearchBlock(MutableModule):
    """One searchable block: a ``LayerChoice`` over the MBConv candidates (plus ``zero`` where the block keeps the
    shape), with an identity shortcut on stride-1 same-width blocks. Frozen to ``zero``, the block is the identity."""

    def __init__(self, label: str, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.residual = stride == 1 and c_in == c_out
        candidates: dict[str, nn.Module] = {
            candidate_name(e, k): MBConv(c_in, c_out, expand=e, kernel=k, stride=stride) for e, k in CANDIDATES}
        if self.residual:
            candidates['zero'] = ZeroOp()
        self.op = LayerChoice(candidates, label=label)
        if isinstance(self.op, ZeroOp):  # built inside a frozen context (``model_context``)
            self._drop_op()

    def _drop_op(self) -> None:
        self.op, self.residual = nn.Identity(), False

    def freeze(self, sample: dict) -> nn.Module:
        """The block of ``sample``: its chosen ``MBConv`` (weights kept), or the identity if ``zero`` was chosen."""
        block = recursive_freeze(self, sample, include_root=False)[0]
        if isinstance(block.op, ZeroOp):
            block._drop_op()
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.op(x)
        return out + x if self.residual else out


class ProxylessSpace(ModelSpace):
    """The ProxylessNAS search space: MobileNetV2 backbone with 21 searchable blocks.

    `Cai, Zhu, Han. ProxylessNAS: Direct Neural Architecture Search on Target Task and Hardware. ICLR 2019
    <https://arxiv.org/abs/1812.00332>`__; layout of the official ``SuperProxylessNASNets`` with the arguments of
    ``imagenet_arch_search.py``: stem 3x3 conv stride 2 -> 32 (BN, ReLU6); a fixed MBConv1 3x3 block -> 16; stages of
    widths 24, 40, 80, 96, 192, 320 with 4, 4, 4, 4, 4, 1 blocks and first-block strides 2, 2, 2, 1, 2, 1; each
    block a ``LayerChoice`` (label ``'block_{i}'``, ``i`` = 0..20) over MBConv expand {3, 6} x kernel {3, 5, 7}
    (``'mb3_k3'``, ``'mb6_k3'``, ``'mb3_k5'``, ..., the official order), plus ``'zero'`` on the 15 blocks with stride
    1 and equal input/output width, which also carry an identity shortcut (``zero`` leaves just the shortcut);
    1x1 conv -> 1280 (BN, ReLU6), global average pooling, dropout, linear classifier. Batch norm eps 1e-3, He
    fan-out initialization, as in the official code.

    Differences from NNI's hub ``ProxylessNAS`` space: the first searchable stage is 24 channels wide (NNI: 32),
    and skipping a block is the ``zero`` candidate of that block, as in the paper (NNI: a ``Repeat`` depth choice of
    1-4 blocks per stage, so only trailing blocks can be skipped). The ``'cifar10'`` and ``'digits'`` presets are
    this package's own (stem stride 1 for 32x32 and 8x8 inputs), not from the paper.

    ``freeze(sample)`` builds the discrete network: each block holds its chosen ``MBConv``; a block frozen to
    ``zero`` is the identity. In the supernet the ``zero`` candidate (a :class:`ZeroOp`, named ``'zero'`` as in the
    paper, not DARTS's ``'none'``) outputs zeros, so the block returns its shortcut.

    Parameters
    ----------
    num_classes
        Output classes (default: the preset's, 1000 for ImageNet).
    in_channels
        Input channels (default: the preset's, 3).
    width_multiplier
        Scales every width (rounded to a multiple of 8); the last conv stays 1280 unless the multiplier exceeds 1.
    dropout
        Dropout before the classifier (official search: 0).
    dataset
        ``'imagenet'`` (stem stride 2, 224x224 inputs), ``'cifar10'`` (stem stride 1, 32x32) or ``'digits'``
        (1 channel, stem stride 1, 8x8).
    """

    def __init__(self, num_classes: int | None = None, in_channels: int | None = None, width_multiplier: float = 1.0,
                 dropout: float = 0.0, dataset: str = 'imagenet'):
        super().__init__()
        if dataset not in DATASET_PRESETS:
            raise ValueError(f'unknown dataset {dataset!r} for ProxylessSpace; valid: {", ".join(DATASET_PRESETS)}')
        if width_multiplier <= 0:
            raise ValueError(f'width_multiplier must be positive, got {width_multiplier}')
        if not 0 <= dropout < 1:
            raise ValueError(f'dropout must be in [0, 1), got {dropout}')
        preset = DATASET_PRESETS[dataset]
        num_classes = num_classes or preset['num_classes']
        in_channels = in_channels or preset['in_channels']
        self.dataset = dataset
        c_stem, c_first = make_divisible(32 * width_multiplier), make_divisible(16 * width_multiplier)
        self.stem = _conv_bn(in_channels, c_stem, 3, preset['stem_stride'])
        self.first_block = MBConv(c_stem, c_first, expand=1, kernel=3, stride=1)
        self.blocks = nn.Sequential(*self._build_blocks(c_first, width_multiplier))
        c_last = make_divisible(1280 * width_multiplier) if width_multiplier > 1 else 1280
        self.feature_mix = _conv_bn(make_divisible(STAGES[-1][0] * width_multiplier), c_last, 1)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(c_last, num_classes)
        self._init_weights()

    @staticmethod
    def _build_blocks(c_in: int, width_multiplier: float) -> list[SearchBlock]:
        blocks = []
        for width, depth, first_stride in STAGES:
            c_out = make_divisible(width * width_multiplier)
            for j in range(depth):
                blocks.append(SearchBlock(f'block_{len(blocks)}', c_in, c_out, first_stride if j == 0 else 1))
                c_in = c_out
        return blocks

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.first_block(self.stem(x)))
        x = self.global_pooling(self.feature_mix(x)).flatten(1)
        return self.classifier(self.dropout(x))
