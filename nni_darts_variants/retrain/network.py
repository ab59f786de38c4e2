"""The DARTS evaluation network: a discrete cell repeated, for retraining a searched genotype.

Follows the official evaluation code of DARTS (Liu et al., ICLR 2019; ``cnn/model.py`` of quark0/darts), which
PC-DARTS, P-DARTS and DropNAS reuse:

* each cell preprocesses its two inputs (``FactorizedReduce`` after a reduction cell, else ReLU-conv1x1-BN), runs the
  two operations of every intermediate node on the inputs the genotype names, sums them, and concatenates the nodes
  in ``concat``; operations on the cell inputs of a reduction cell have stride 2;
* operations have affine batch norm and pools have no batch norm (``build_op(..., affine=True, pool_bn=False)``);
* drop-path (per-sample Bernoulli mask, scaled by ``1 / keep``) is applied in training to every operation output
  except :class:`torch.nn.Identity`, with the probability ``drop_path_prob`` set by the trainer each epoch;
* reductions (channels doubled) at cells ``layers // 3`` and ``2 * layers // 3``; the auxiliary head reads the
  output of cell ``2 * layers // 3``;
* ``network='cifar'``: stem conv3x3 3 -> 3C + BN; ``network='imagenet'``: the mobile stem (two stride-2 convs, then
  a third stride-2 conv), the first cell treats its inputs as coming after a reduction.

:func:`build_network` builds what a :class:`~.target.RetrainTarget` names: this network for a genotype, or
``space.freeze(sample)`` of the searched space (ProxylessNAS, NAS-Bench-201, NNI hub spaces) for RGB inputs.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..genotype import CELL_TYPES, Genotype
from ..counting import count_parameters as _count_parameters
from search_spaces.ops import OPS, FactorizedReduce, ReLUConvBN, build_op

__all__ = ['EvalNetwork', 'EvalCell', 'AuxiliaryHead', 'drop_path', 'validate_genotype', 'count_parameters',
           'NETWORKS', 'build_network', 'frozen_space_network', 'parameter_groups']

NETWORKS = ('cifar', 'imagenet')


def validate_genotype(genotype: Genotype) -> None:
    """Reject a genotype the evaluation network cannot build, with a one-line ``ValueError`` naming the problem.

    :class:`Genotype` itself checks the pair count (two per node) and that every input exists; this adds unknown
    operations, a normal and a reduction cell of different sizes, and ``concat`` entries that name no node.
    """
    for cell in CELL_TYPES:
        pairs = getattr(genotype, cell)
        for k, (op, j) in enumerate(pairs):
            if op not in OPS:
                raise ValueError(f'genotype.{cell}: pair {k} uses unknown operation {op!r}; valid operations: '
                                 f'{", ".join(OPS)}')
        nodes = range(2, 2 + len(pairs) // 2)
        concat = getattr(genotype, f'{cell}_concat')
        bad = [c for c in concat if c not in nodes]
        if bad or not concat:
            raise ValueError(f'genotype.{cell}_concat {concat} must list nodes among {list(nodes)}')
    if len(genotype.normal) != len(genotype.reduce):
        raise ValueError(f'genotype has {len(genotype.normal)} normal and {len(genotype.reduce)} reduce pairs; '
                         'both cells need two pairs per node and the same number of nodes')


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples with probability ``drop_prob`` and scale the survivors by ``1 / (1 - drop_prob)``."""
    if drop_prob <= 0.:
        return x
    keep = 1. - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    """One discrete cell of the evaluation network (see the module docstring)."""

    def __init__(self, pairs: Sequence[tuple[str, int]], concat: Sequence[int], c_prev_prev: int, c_prev: int,
                 channels: int, *, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(c_prev_prev, channels) if reduction_prev
                            else ReLUConvBN(c_prev_prev, channels, 1, 1, 0))
        self.preprocess1 = ReLUConvBN(c_prev, channels, 1, 1, 0)
        self.inputs = [j for _, j in pairs]
        self.ops = nn.ModuleList(build_op(op, channels, 2 if reduction and j < 2 else 1, affine=True, pool_bn=False)
                                 for op, j in pairs)
        self.concat = list(concat)
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for k in range(0, len(self.ops), 2):
            node = 0
            for op, j in zip(self.ops[k:k + 2], self.inputs[k:k + 2]):
                h = op(states[j])
                if self.training and drop_prob > 0. and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """The auxiliary classifier on the output of cell ``2 * layers // 3`` (8x8 for CIFAR, 7x7 for ImageNet)."""

    def __init__(self, channels: int, num_classes: int, *, network: str = 'cifar'):
        super().__init__()
        stride = 3 if network == 'cifar' else 2
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),  # its input also feeds the next cells
            nn.AvgPool2d(5, stride=stride, padding=0, count_include_pad=False),
            nn.Conv2d(channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),  # 1x1 already at the paper's input sizes; makes other sizes work
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class EvalNetwork(nn.Module):
    """The evaluation network of a genotype (Liu et al. 2019, ``NetworkCIFAR`` / ``NetworkImageNet``).

    Parameters
    ----------
    genotype
        The cell to repeat.
    channels
        Initial channels C (36 for CIFAR-10, 48 for ImageNet).
    layers
        Number of cells (20 for CIFAR-10, 14 for ImageNet).
    num_classes
        Output classes.
    auxiliary
        Build the auxiliary head; in training ``forward`` then returns ``(logits, aux_logits)``.
    network
        ``'cifar'`` (3x3 stem, 32x32 inputs) or ``'imagenet'`` (mobile stem, 224x224 inputs).

    Attributes
    ----------
    drop_path_prob
        Drop-path probability used in training; the trainer ramps it each epoch (0 at construction).
    """

    def __init__(self, genotype: Genotype, *, channels: int = 36, layers: int = 20, num_classes: int = 10,
                 auxiliary: bool = True, network: str = 'cifar'):
        super().__init__()
        validate_genotype(genotype)
        if network not in NETWORKS:
            raise ValueError(f'network must be one of {NETWORKS}, got {network!r}')
        if layers < 3 or channels < 2 or channels % 2:
            raise ValueError(f'need layers >= 3 and an even channels >= 2, got layers={layers}, channels={channels}')
        self.drop_path_prob = 0.
        self.aux_position = 2 * layers // 3
        self.stem, c_prev_prev, c_prev, reduction_prev = self._stem(network, channels)
        self.cells = nn.ModuleList()
        c_curr, c_aux = channels, None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            c_curr = c_curr * 2 if reduction else c_curr
            kind = 'reduce' if reduction else 'normal'
            cell = EvalCell(getattr(genotype, kind), getattr(genotype, f'{kind}_concat'), c_prev_prev, c_prev,
                            c_curr, reduction=reduction, reduction_prev=reduction_prev)
            self.cells.append(cell)
            c_prev_prev, c_prev, reduction_prev = c_prev, cell.multiplier * c_curr, reduction
            if i == self.aux_position:
                c_aux = c_prev
        self.auxiliary_head = AuxiliaryHead(c_aux, num_classes, network=network) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    @staticmethod
    def _stem(network: str, channels: int) -> tuple[nn.Module, int, int, bool]:
        if network == 'cifar':
            stem = nn.Sequential(nn.Conv2d(3, 3 * channels, 3, padding=1, bias=False), nn.BatchNorm2d(3 * channels))
            return stem, 3 * channels, 3 * channels, False
        stem = nn.ModuleDict({
            'stem0': nn.Sequential(
                nn.Conv2d(3, channels // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels // 2),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels // 2, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels)),
            'stem1': nn.Sequential(
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(channels)),
        })
        return stem, channels, channels, True

    def _stem_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.stem, nn.ModuleDict):
            s0 = self.stem['stem0'](x)
            return s0, self.stem['stem1'](s0)
        s = self.stem(x)
        return s, s

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        s0, s1 = self._stem_forward(x)
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_position and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return (logits, logits_aux) if logits_aux is not None else logits


#: Number of parameters; like the official ``count_parameters_in_MB``, the auxiliary head is left out by default.
count_parameters = functools.partial(_count_parameters, include_auxiliary=False)


def frozen_space_network(space: Mapping[str, Any], sample: Mapping[str, Any], *, num_classes: int,
                         in_channels: int = 3, dataset_hint: str | None = None,
                         space_args: Mapping[str, Any] | None = None) -> nn.Module:
    """``space.freeze(sample)`` of the space ``{'name', 'args'}`` (as in a search config), rebuilt for
    ``in_channels`` x ``num_classes`` data; ``space_args`` override the searched arguments (e.g. the ProxylessNAS
    ``dataset`` preset and ``dropout`` of a retrain recipe). A sample the space cannot take is a one-line
    ``ValueError``."""
    from ..registry import build_space
    args = {**dict(space.get('args') or {}), **dict(space_args or {})}
    model_space = build_space(space['name'], in_channels=in_channels, num_classes=num_classes,
                              dataset_hint=dataset_hint, **args)
    try:
        return model_space.freeze(dict(sample))
    except (KeyError, ValueError, TypeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f'the sample does not freeze space {space["name"]!r} ({message}); give the sample.json of '
                         'a search in that space') from None


def build_network(target: Any, model: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The network to retrain for a :class:`~.target.RetrainTarget` and the ``model`` section of a retrain config.

    A genotype gives :class:`EvalNetwork` (``channels``, ``layers``, ``auxiliary_weight > 0``, ``network``); another
    space gives :func:`frozen_space_network` for RGB data, with ``model.space_args`` on top of the searched arguments
    and the dataset preset of ``model.network`` (``cifar10`` or ``imagenet``) where the search named none.
    """
    if target.genotype is not None:
        return EvalNetwork(target.genotype, channels=model['channels'], layers=model['layers'],
                           num_classes=num_classes, auxiliary=model['auxiliary_weight'] > 0, network=model['network'])
    hint = 'imagenet' if model['network'] == 'imagenet' else 'cifar10'
    return frozen_space_network(target.space, target.sample, num_classes=num_classes, dataset_hint=hint,
                                space_args=model.get('space_args'))


def parameter_groups(model: nn.Module, weight_decay: float, weight_decay_bn: bool = True) -> list[dict[str, Any]]:
    """SGD parameter groups: all parameters with ``weight_decay``, or, with ``weight_decay_bn=False``, the
    batch-norm weights and biases in a group without decay (ProxylessNAS' ``no_decay_keys='bn'``)."""
    norm = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)]
    if weight_decay_bn or not norm:
        return [{'params': list(model.parameters()), 'weight_decay': weight_decay}]
    ids = {id(p) for p in norm}
    rest: Iterable[nn.Parameter] = [p for p in model.parameters() if id(p) not in ids]
    return [{'params': list(rest), 'weight_decay': weight_decay}, {'params': norm, 'weight_decay': 0.0}]
