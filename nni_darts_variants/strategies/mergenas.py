"""MergeNAS (Wang et al., IJCAI 2020): the convolutions of an edge merged into one masked kernel."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn as nn
from nni.nas.nn.pytorch import LayerChoice

from search_spaces.cell import EdgeSpec
from ..merged_conv import DENSE_CONVS, MergedDenseEdgeOp, MergedEdgeOp
from search_spaces.ops import build_op
from ..registry import register_strategy
from .base import MixedEdge
from .darts import Darts
from .nni_spaces import darts_edge_spec, note_fallback

__all__ = ['MergeNAS', 'MergedEdge', 'MergedCandidate']

_logger = logging.getLogger(__name__)


class MergedCandidate(nn.Module):
    """One candidate of a :class:`MergedEdge`: the shared merged op with a one-hot weight (it owns no parameter).

    The real operation of a candidate only exists after ``freeze``: :meth:`MergedEdge.freeze` builds the ordinary
    DARTS op.
    """

    def __init__(self, name: str, index: int, num_candidates: int):
        super().__init__()
        self.name, self.index, self.num_candidates = name, index, num_candidates
        self._owner: tuple[MergedEdgeOp, ...] = ()

    def bind(self, op: MergedEdgeOp) -> None:
        self._owner = (op,)  # a tuple, so that the shared op is not registered (and saved) once per candidate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._owner:
            raise RuntimeError(f'candidate {self.name!r} is not bound to a merged edge')
        weights = torch.zeros(self.num_candidates, dtype=x.dtype, device=x.device)
        weights[self.index] = 1.0
        return self._owner[0](x, weights)


class MergedEdge(MixedEdge):
    """A DARTS cell edge whose candidates run as one :class:`~nni_darts_variants.merged_conv.MergedEdgeOp`.

    The forward is ``MergedEdgeOp(x, softmax(alpha))``: one depthwise convolution for the four convolutions,
    ``skip_connect`` (stride 1) and ``avg_pool_3x3``, plus separate ``max_pool_3x3`` and stride-2 ``skip_connect``
    branches; ``none`` adds nothing. Alphas, the ranking and the export are DARTS's, on the original op names;
    :meth:`freeze` builds the chosen op as DARTS does (``sep_conv`` with its two blocks), so the searched cell is
    retrained with ordinary DARTS ops.

    Parameters
    ----------
    spec
        The edge's :class:`~search_spaces.cell.EdgeSpec` (channels, stride, affine, pool_bn).
    names
        Candidate operation names (DARTS primitives).
    alpha
        The architecture parameter of the label (shared by the cells of a type).
    label
        The choice label.
    """

    def __init__(self, spec: EdgeSpec, names: Sequence[str], alpha: nn.Parameter, label: str):
        names = [str(n) for n in names]
        views = {name: MergedCandidate(name, i, len(names)) for i, name in enumerate(names)}
        super().__init__(views, alpha, label, spec=spec)
        self.spec = spec
        if any(n in DENSE_CONVS for n in names):  # a NAS-Bench-201 edge: dense convolutions
            self.merged: nn.Module = MergedDenseEdgeOp(spec.channels, names, affine=spec.affine)
        else:
            self.merged = MergedEdgeOp(spec.channels, spec.stride, names, affine=spec.affine, pool_bn=spec.pool_bn)
        for view in views.values():
            view.bind(self.merged)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merged(x, self.op_weights())

    def freeze(self, sample: dict[str, Any]) -> nn.Module:
        """The chosen operation, built fresh as an ordinary DARTS op (the merged weights are not carried over)."""
        self.validate(sample)
        chosen = self.choice.freeze(sample)
        return build_op(str(chosen), self.spec.channels, self.spec.stride, self.spec.affine, self.spec.pool_bn)

    @classmethod
    def from_layer_choice(cls, module: LayerChoice, alpha: nn.Parameter, mutate_kwargs: dict[str, Any]) -> MixedEdge:
        """A merged edge wherever the candidates are the DARTS operation family (a ``DartsCell`` edge's ``darts_edge``,
        or recognised by :func:`~.nni_spaces.darts_edge_spec`, e.g. NNI's hub DARTS ops); a plain DARTS mixed edge
        elsewhere, listed in the strategy's one fallback warning."""
        spec = getattr(module, 'darts_edge', None)
        if not isinstance(spec, EdgeSpec):
            spec = darts_edge_spec(module.label, dict(zip(map(str, module.names), module.candidates.values())))
        if spec is None:
            note_fallback(mutate_kwargs, 'MergeNAS: candidates outside the DARTS operation family', module.label)
            return MixedEdge(module.candidates, alpha, module.label)
        return cls(spec, module.names, alpha, module.label)


@register_strategy
class MergeNAS(Darts):
    """MergeNAS: the convolutions of every cell edge merged into one masked depthwise kernel.

    `Wang, Xue, Yan, Yang, Hu, Sun. MergeNAS: Merge Operations into One for Differentiable Architecture Search.
    IJCAI 2020 <https://www.ijcai.org/proceedings/2020/424>`__.

    Each DARTS cell edge becomes a :class:`MergedEdge`: its four convolutions share one ``9 x 9`` depthwise kernel
    per channel, each the kernel times its receptive-field mask, and ``skip_connect``/``avg_pool_3x3`` fold in as
    fixed kernels, so an edge runs one depthwise convolution, one pointwise convolution and one BN instead of six
    separable blocks (see :mod:`nni_darts_variants.merged_conv` for what is reconstructed: no code was published).

    The search loop is not described beyond "DARTS" in what could be verified; this class keeps DARTS's bilevel
    loop (first order by default, ``order=2`` available) and hyper-parameters, and the DARTS derivation rule on the
    merged edges' alphas. The genotype names ordinary DARTS ops and retrains with them.

    Parameters
    ----------
    order, unrolled_lr
        As :class:`~nni_darts_variants.strategies.darts.Darts` (default first order).
    **kwargs
        See :class:`~nni_darts_variants.strategies.base.DartsVariant` (arch Adam lr 3e-4, betas (0.5, 0.999),
        weight decay 1e-3; weight gradients clipped at 5).
    """

    edge_class = MergedEdge
    darts_fallback_for = ('value choice',)
