"""PC-DARTS (Xu et al., ICLR 2020): partial channel connections and edge normalization."""
from __future__ import annotations

import logging
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.nas.nn.pytorch import InputChoice, LayerChoice

from search_spaces.cell import DartsCell, EdgeSpec
from search_spaces.ops import build_op
from ..registry import register_strategy
from .base import DartsVariant, MixedEdge, MixedNode, VariantLightningModule
from .nni_spaces import note_fallback, partial_candidates

__all__ = ['PCDarts', 'PartialChannelEdge', 'EdgeNormalizedNode', 'PCDartsLightning', 'channel_shuffle',
           'IMAGENET_PRESET']

_logger = logging.getLogger(__name__)

#: The official ImageNet search settings (``train_search_imagenet.py``): K=2, alphas frozen for 35 epochs, arch Adam
#: lr 6e-3, arch gradients clipped at 5. Use :meth:`PCDarts.imagenet`.
IMAGENET_PRESET: dict[str, Any] = {
    'partial_channels_k': 2, 'warmup_epochs': 35, 'arc_learning_rate': 6e-3, 'arc_gradient_clip_val': 5.0,
}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: view ``(B, groups, C/groups, H, W)``, swap the two channel axes, flatten.

    A permutation of the channels: ``channel_shuffle(channel_shuffle(x, g), C // g) == x``. In PC-DARTS the processed
    chunk (the first ``C/groups`` channels) lands on channels ``0, groups, 2 * groups, ...``.
    """
    batch, channels, height, width = x.shape
    if channels % groups:
        raise ValueError(f'channel_shuffle: {channels} channels cannot be split into {groups} groups')
    return x.view(batch, groups, channels // groups, height, width).transpose(1, 2).reshape(x.shape)


def check_partial_channels(spec: EdgeSpec, names: list[str], k: int) -> None:
    """Raise ``ValueError`` when an edge of width ``spec.channels`` cannot be split into ``k`` partial channels."""
    where = f'{spec.cell}/op_{spec.node}_{spec.input}'
    if spec.channels % k:
        raise ValueError(f'{where}: the edge has {spec.channels} channels, not divisible by partial_channels_k={k}; '
                         'choose a K that divides every cell width (the width and its doublings)')
    if spec.stride == 2 and 'skip_connect' in names and (spec.channels // k) % 2:
        raise ValueError(f'{where}: {spec.channels} // partial_channels_k={k} = {spec.channels // k} channels is odd, '
                         'but FactorizedReduce (skip_connect at stride 2) needs an even number; use a smaller K or a '
                         'larger width')


class PartialChannelEdge(MixedEdge):
    """A PC-DARTS mixed edge: the first ``C/K`` channels go through every candidate, the rest bypass the edge.

    ``out = channel_shuffle(cat([sum_o softmax(alpha)_o * o(x[:, :C/K]), bypass(x[:, C/K:])]), K)``, where the
    candidates are rebuilt at ``C/K`` channels from the edge's :class:`~search_spaces.cell.EdgeSpec` and
    ``bypass`` is ``MaxPool2d(2, 2)`` on stride-2 edges and the identity otherwise (official ``MixedOp``). The slice
    is fixed; the shuffle moves other channels into it in the next cell. Other choices (NNI cells, hub spaces) get
    the same treatment wherever their candidates keep the channel count: they are rebuilt at ``C/K`` channels
    (:meth:`from_candidates`); the rest are mixed over all channels (K=1) and listed in one warning.
    """

    #: Kept NCHW: in the tiny conformance search a channel slice of a channels-last edge input crashed the process
    #: inside a oneDNN backward (glibc "free(): invalid next size"; torch 2.14.1, CPU), and PC-DARTS gained least
    #: from channels-last anyway (its candidates see C/K channels).
    channels_last_inside: ClassVar[bool] = False

    def __init__(self, candidates: dict[str, nn.Module], alpha: nn.Parameter, label: str, *,
                 partial_channels_k: int = 1, stride: int = 1):
        super().__init__(candidates, alpha, label)
        self.partial_channels_k = partial_channels_k
        self.bypass: nn.Module = nn.MaxPool2d(2, 2) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        k = self.partial_channels_k
        if k == 1:
            return super().forward(x)
        processed_width = x.shape[1] // k
        processed = super().forward(x[:, :processed_width])
        bypassed = self.bypass(x[:, processed_width:])
        return channel_shuffle(torch.cat([processed, bypassed], dim=1), k)

    @classmethod
    def from_layer_choice(cls, module: LayerChoice, alpha: nn.Parameter,
                          mutate_kwargs: dict[str, Any]) -> 'PartialChannelEdge':
        spec: EdgeSpec | None = getattr(module, 'darts_edge', None)
        k = int(mutate_kwargs.get('partial_channels_k', 1))
        if spec is None:
            return cls.from_candidates(module, alpha, k, mutate_kwargs)
        names = [str(n) for n in module.names]
        check_partial_channels(spec, names, k)
        candidates = {n: build_op(n, spec.channels // k, spec.stride, spec.affine, spec.pool_bn) for n in names}
        return cls(candidates, alpha, module.label, partial_channels_k=k, stride=spec.stride)

    @classmethod
    def from_candidates(cls, module: LayerChoice, alpha: nn.Parameter, k: int,
                        mutate_kwargs: dict[str, Any]) -> 'PartialChannelEdge':
        """Any other choice: its candidates rebuilt at ``C/K`` channels where they keep the channel count
        (:func:`~.nni_spaces.partial_candidates`); otherwise mixed over all channels, listed in the one warning."""
        candidates = dict(zip(map(str, module.names), module.candidates.values()))
        partial = partial_candidates(candidates, k) if k > 1 else None
        if partial is None:
            if k > 1:
                note_fallback(mutate_kwargs, 'PC-DARTS: candidates that change the channel count or cannot be '
                              f'rebuilt at C/{k} channels (mixed over all channels)', module.label)
            return cls(module.candidates, alpha, module.label)
        slim, stride = partial
        edge = cls(slim, alpha, module.label, partial_channels_k=k, stride=stride)
        if stride == 2:
            edge.bypass = nn.MaxPool2d(2, 2, ceil_mode=True)  # as the candidates' padded stride-2 convs on odd sizes
        return edge


class EdgeNormalizedNode(MixedNode):
    """A node with PC-DARTS edge normalization: ``sum_j softmax(beta)_j * edge_j(h_j)`` over its incoming edges.

    ``beta`` is NNI's architecture parameter of the node's ``InputChoice`` (one entry per incoming edge, shared by
    all cells of a type). Without edge normalization the node is the plain DARTS sum and ``beta`` is not searched.
    """

    def input_weights(self) -> torch.Tensor | None:
        if not self.config.get('edge_normalization') or self._memo_alpha is None:
            return None
        return F.softmax(self._memo_alpha, dim=-1)

    @property
    def beta(self) -> nn.Parameter | None:
        """The edge-normalization logits (``None`` when edge normalization is off)."""
        return self._memo_alpha if self.config.get('edge_normalization') else None

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        if self.beta is not None:
            yield self.beta

    @classmethod
    def from_input_choice(cls, module: InputChoice, alpha: nn.Parameter | None,
                          mutate_kwargs: dict[str, Any]) -> 'EdgeNormalizedNode':
        enabled = bool(mutate_kwargs.get('edge_normalization', False))
        if enabled and (alpha is None or len(alpha) != module.n_candidates):
            raise ValueError(f'{module.label}: edge normalization needs one beta per incoming edge '
                             f'({module.n_candidates}); the strategy memo has '
                             f'{"none" if alpha is None else len(alpha)}')
        return cls(module.n_candidates, module.n_chosen, module.label, alpha, edge_normalization=enabled)


class PCDartsLightning(VariantLightningModule):
    """PC-DARTS search loop: the DARTS loop; the genotype ranks ``softmax(alpha) * softmax(beta)_j``."""

    def edge_weights(self, cell: DartsCell) -> dict[tuple[int, int], dict[str, float]]:
        weights = super().edge_weights(cell)
        betas = {int(node): choice.input_weights() for node, choice in cell.inputs.items()}
        betas = {node: beta.detach().cpu().tolist() for node, beta in betas.items() if beta is not None}
        for node, j, _ in cell.iter_edges():
            if node in betas:
                weights[(node, j)] = {op: w * betas[node][j] for op, w in weights[(node, j)].items()}
        return weights


@register_strategy
class PCDarts(DartsVariant):
    """PC-DARTS: partial channel connections with channel shuffle, and edge normalization.

    `Xu, Xie, Zhang, Chen, Qi, Tian, Xiong. PC-DARTS: Partial Channel Connections for Memory-Efficient Architecture
    Search. ICLR 2020 <https://arxiv.org/abs/1907.05737>`__.

    Each edge sends a fixed ``1/K`` of its channels through the candidates (built at ``C/K`` channels) and lets the
    rest bypass, then shuffles the channels (:class:`PartialChannelEdge`); mixed-op activations shrink to about
    ``1/K`` of DARTS. Each node weights its incoming edges by ``softmax(beta)`` (:class:`EdgeNormalizedNode`); the
    genotype applies the DARTS rule to ``softmax(alpha) * softmax(beta)_j``. Alphas and betas share one Adam optimizer,
    first order, updated on the validation half after ``warmup_epochs`` (official ``train_search.py``).

    Defaults are the official CIFAR-10 search; :meth:`imagenet` gives the ImageNet preset (:data:`IMAGENET_PRESET`:
    K=2, warm-up 35, arch lr 6e-3, arch gradients clipped at 5). The official CIFAR-10 weight optimizer (SGD lr 0.1
    cosine to 0, batch 256) belongs to the evaluator.

    Parameters
    ----------
    partial_channels_k
        K: the edge processes ``C // K`` channels (4; 2 on ImageNet). Every cell width must be divisible by K, and
        ``C // K`` even on reduction edges (``FactorizedReduce``). ``K=1`` without edge normalization is DARTS.
    edge_normalization
        Weight the incoming edges of each node by ``softmax(beta)`` in the forward pass and the genotype (True).
    arc_learning_rate
        Adam learning rate of alphas and betas (6e-4).
    warmup_epochs
        Epochs with weight steps only (15).
    **kwargs
        See :class:`~nni_darts_variants.strategies.base.DartsVariant` (arch Adam betas (0.5, 0.999), weight decay
        1e-3; weight gradients clipped at 5).
    """

    edge_class = PartialChannelEdge
    node_class = EdgeNormalizedNode
    darts_fallback_for = ('value choice',)
    module_class = PCDartsLightning

    def __init__(self, *, partial_channels_k: int = 4, edge_normalization: bool = True,
                 arc_learning_rate: float = 6e-4, warmup_epochs: int = 15, **kwargs: Any):
        if isinstance(partial_channels_k, bool) or not isinstance(partial_channels_k, int) or partial_channels_k < 1:
            raise ValueError(f'partial_channels_k must be a positive integer, got {partial_channels_k!r}')
        super().__init__(arc_learning_rate=arc_learning_rate, warmup_epochs=warmup_epochs, **kwargs)
        self.partial_channels_k = partial_channels_k
        self.edge_normalization = bool(edge_normalization)

    @classmethod
    def imagenet(cls, **overrides: Any) -> 'PCDarts':
        """The official ImageNet search settings (:data:`IMAGENET_PRESET`), with ``overrides`` on top."""
        return cls(**{**IMAGENET_PRESET, **overrides})

    @classmethod
    def smoke_kwargs(cls) -> dict[str, Any]:
        """A one-epoch smoke search: no warm-up, so that alphas and betas move."""
        return {'warmup_epochs': 0}

    @classmethod
    def full_step_kwargs(cls) -> dict[str, Any]:
        return {'warmup_epochs': 0}

    def mutate_kwargs(self) -> dict[str, Any]:
        return {'partial_channels_k': self.partial_channels_k, 'edge_normalization': self.edge_normalization}
