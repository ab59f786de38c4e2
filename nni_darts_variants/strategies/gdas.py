"""GDAS (Dong & Yang, CVPR 2019): one Gumbel-max sampled operation per edge, straight-through gradients."""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.nas.nn.pytorch import LayerChoice

from ..registry import register_strategy
from .base import (DartsVariant, MixedEdge, MixedInput, VariantLightningModule, check_weight_grad_reset,
                   keep_zero_gradients)
from .nni_spaces import InputSampler

__all__ = ['Gdas', 'GumbelMaxEdge', 'GumbelMaxInput', 'GdasLightning', 'gumbel_noise', 'linear_temperature']

_logger = logging.getLogger(__name__)

#: Suffix of the private memo entry that carries a label's Gumbel noise to every edge with that label.
_NOISE_KEY = '/gumbel_noise'


def _exponential(like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like).exponential_()


def gumbel_noise(like: torch.Tensor, max_tries: int = 100) -> torch.Tensor:
    """Standard Gumbel noise ``-log(Exp(1))`` of ``like``'s shape, drawn again while any entry is infinite.

    An exponential sample of exactly 0 gives ``+inf``; the official code resamples in that case.
    """
    for _ in range(max_tries):
        noise = -_exponential(like).log()
        if torch.isfinite(noise).all():
            return noise
    raise RuntimeError(f'no finite Gumbel sample in {max_tries} draws')


def linear_temperature(epoch: int, max_epochs: int | None, tau_max: float, tau_min: float) -> float:
    """``tau_max - (tau_max - tau_min) * epoch / (max_epochs - 1)``: ``tau_max`` at the first epoch, ``tau_min`` at
    the last (official ``GDAS.py``). With one epoch (or no known end) the temperature stays at ``tau_max``."""
    if max_epochs is None or max_epochs <= 1:
        return tau_max
    return tau_max - (tau_max - tau_min) * min(epoch, max_epochs - 1) / (max_epochs - 1)


class GumbelMaxEdge(MixedEdge):
    """A GDAS edge: one candidate, drawn by Gumbel-max, is executed; its output is scaled by a straight-through weight.

    ``probs = softmax((log_softmax(alpha) + g) / tau)``, ``k = argmax(probs)`` (distributed as
    ``Categorical(softmax(alpha))`` for any ``tau``), ``hardwts = one_hot(k) - probs.detach() + probs`` and the
    output is ``op_k(x) * hardwts[k]``: its value is ``op_k(x)``, its gradient reaches every alpha of the edge through
    the softmax. :meth:`resample` draws the noise once per label, so all cells of a type use the same operation on
    an edge; the search loop resamples before every weight and architecture step. ``temperature`` is set by the
    strategy's schedule.
    """

    def __init__(self, candidates: dict[str, nn.Module], alpha: nn.Parameter, label: str, *,
                 temperature: float = 10.0):
        super().__init__(candidates, alpha, label)
        self.temperature = temperature
        self._noise: torch.Tensor | None = None
        self._index: int | None = None

    @property
    def sampled_index(self) -> int | None:
        """Index of the candidate of the current sample (``None`` before the first sample)."""
        return self._index

    def _probs(self, noise: torch.Tensor) -> torch.Tensor:
        return F.softmax((F.log_softmax(self._arch_alpha, dim=-1) + noise) / self.temperature, dim=-1)

    def op_weights(self) -> torch.Tensor:
        """Straight-through weights of the current sample: one-hot in value, ``softmax`` in gradient.

        An edge used before any :meth:`resample` draws its own sample first.
        """
        if self._noise is None or self._index is None:
            self.resample({})
        probs = self._probs(self._noise)
        one_hot = F.one_hot(torch.tensor(self._index, device=probs.device), len(probs)).to(probs.dtype)
        return one_hot - probs.detach() + probs

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights = self.op_weights()
        index = int(self._index)  # type: ignore[arg-type]
        return self[self.names[index]](*args, **kwargs) * weights[index]

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        """Draw the Gumbel noise of this label (or reuse the one drawn for another edge with the same label)."""
        noise_key = self.label + _NOISE_KEY
        if noise_key in memo:
            self._noise = memo[noise_key]
        else:
            self._noise = gumbel_noise(self._arch_alpha.detach())
        with torch.no_grad():
            self._index = int(torch.argmax(self._probs(self._noise)))
        return {self.label: self.names[self._index], noise_key: self._noise}

    def export_probs(self, memo: dict[str, Any]) -> dict[str, Any]:
        """``softmax(alpha)``: the probability of each candidate being sampled (whatever the temperature)."""
        if self.label in memo:
            return {}
        return {self.label: dict(zip(self.names, self.ranking_weights().cpu().tolist()))}

    @classmethod
    def from_layer_choice(cls, module: LayerChoice, alpha: nn.Parameter,
                          mutate_kwargs: dict[str, Any]) -> 'GumbelMaxEdge':
        return cls(module.candidates, alpha, module.label, temperature=mutate_kwargs.get('temperature', 10.0))


class GumbelMaxInput(InputSampler, MixedInput):
    """GDAS on an input choice: ``n_chosen`` inputs drawn by Gumbel-top-k, straight-through weights.

    ``k_1..k_n`` are the ``n_chosen`` largest ``log_softmax(alpha) + g`` (sampling without replacement from
    ``softmax(alpha)``); only they enter the output, each scaled by ``1 - probs_k.detach() + probs_k`` with
    ``probs = softmax((log_softmax(alpha) + g) / tau)``: the value is the plain sum (or mean) of the chosen inputs and
    the gradient reaches every alpha. The noise is shared by all modules with the label.

    Used for free ``InputChoice`` and for the nodes of an NNI ``Cell`` (``num_ops_per_node`` of the node's incoming
    edges; the others are not computed, see :class:`~.nni_spaces.InputSampler`). Our ``DartsCell`` keeps the official
    GDAS node, the sum of all its edges.
    """

    temperature: float = 10.0
    _noise: torch.Tensor | None = None

    def _probs(self) -> torch.Tensor:
        return F.softmax((F.log_softmax(self._arch_alpha, dim=-1) + self._noise) / self.temperature, dim=-1)

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        noise_key = self.label + _NOISE_KEY
        self._noise = memo[noise_key] if noise_key in memo else gumbel_noise(self._arch_alpha.detach())
        with torch.no_grad():
            scores = F.log_softmax(self._arch_alpha, dim=-1) + self._noise
            self.chosen = sorted(torch.topk(scores, self.n_chosen or 1).indices.tolist())
        return {self.label: list(self.chosen), noise_key: self._noise}

    def forward(self, inputs: list[torch.Tensor | None]) -> torch.Tensor:
        chosen = self.sampled_inputs()
        probs = self._probs()
        out = sum(inputs[j] * (1 - probs[j].detach() + probs[j]) for j in chosen)
        return out / len(chosen) if self.reduction == 'mean' else out


class GdasLightning(VariantLightningModule):
    """GDAS search loop: weight step first, then the architecture step, each on a fresh sample; annealed ``tau``."""

    step_order = ('weight', 'arch')

    def resample(self) -> dict[str, Any]:
        """Draw one sample per label (shared by all cells of a type); returns it as an NNI sample."""
        sample = super().resample()
        return {k: v for k, v in sample.items() if not k.endswith(_NOISE_KEY)}

    def schedule(self, epoch: int, max_epochs: int | None) -> None:
        """Set the Gumbel temperature of every edge for this epoch (linear ``tau_max`` to ``tau_min``)."""
        tau = linear_temperature(epoch, max_epochs, self.strategy.tau_max, self.strategy.tau_min)
        for module in self.supernet_modules():
            if isinstance(module, (GumbelMaxEdge, GumbelMaxInput)):
                module.temperature = tau
        _logger.debug('epoch %d: Gumbel temperature %.4f', epoch, tau)
        self.log('gumbel_temperature', tau)

    def on_train_start(self) -> None:
        if self.strategy.weight_grad_reset == 'zeros':  # unsampled ops keep momentum and decay (official PyTorch 1.x)
            keep_zero_gradients(self.weight_optimizer(), self.weight_parameters())
        return super().on_train_start()


@register_strategy
class Gdas(DartsVariant):
    """GDAS: Gumbel-max sampling of one operation per edge, straight-through gradients to alpha.

    `Dong, Yang. Searching for A Robust Neural Architecture in Four GPU Hours. CVPR 2019
    <https://arxiv.org/abs/1910.04465>`__.

    NNI's ``GumbelDARTS`` is not GDAS: it mixes every operation with soft Gumbel-softmax weights (SNAS-like), while
    GDAS executes only the sampled operation per edge (:class:`GumbelMaxEdge`), so activation memory is close to a
    single path. As in the official code (``GDAS.py``), each batch runs the weight step first, then the architecture
    step, each with a fresh sample shared by all cells of a type; ``tau`` goes linearly from ``tau_max`` at the first
    epoch to ``tau_min`` at the last.

    Discretization deviates from the official NASNet-space rule, which keeps the two strongest ``(op, input)`` pairs
    of a node even when both come from the same input: a DARTS-space sample needs two distinct inputs per node, so
    the DARTS rule is applied to ``softmax(alpha)`` instead (identical whenever the official pairs use distinct
    inputs).

    On an NNI ``Cell`` (hub ``DARTS``, ``NASNet`` ...) each node also samples its inputs: ``num_ops_per_node`` of its
    incoming edges by Gumbel-top-k over the node's own alpha, straight-through (:class:`GumbelMaxInput`), and only
    those edges run, each its one sampled operation. The export takes each node's strongest inputs by that alpha,
    each with its edge's strongest operation (never ``none``), under NNI's labels ``op_{i}_{k}`` / ``input_{i}_{k}``.

    Parameters
    ----------
    tau_max, tau_min
        Gumbel temperature at the first and at the last epoch (10 and 0.1).
    weight_grad_reset
        ``'zeros'`` (default, the official code's PyTorch 1.x ``zero_grad``): the weights of unsampled operations get
        a zero gradient, so SGD's momentum and weight decay still move them; ``'none'`` (PyTorch 2, Lightning):
        they stay untouched.
    arc_learning_rate
        Adam learning rate of the alphas (3e-4; betas (0.5, 0.999), weight decay 1e-3).
    **kwargs
        See :class:`~nni_darts_variants.strategies.base.DartsVariant` (no warm-up; weight gradients clipped at 5).
        The official weight optimizer (SGD Nesterov lr 0.025 cosine to 0.001, wd 5e-4, batch 256, 250 epochs)
        belongs to the evaluator.
    """

    edge_class = GumbelMaxEdge
    input_class = GumbelMaxInput
    cell_node_class = GumbelMaxInput
    darts_fallback_for = ('repeat depth', 'value choice')
    module_class = GdasLightning

    def __init__(self, *, tau_max: float = 10.0, tau_min: float = 0.1, arc_learning_rate: float = 3e-4,
                 weight_grad_reset: str = 'zeros', **kwargs: Any):
        if not 0 < tau_min <= tau_max:
            raise ValueError(f'need 0 < tau_min <= tau_max, got tau_min={tau_min}, tau_max={tau_max}')
        super().__init__(arc_learning_rate=arc_learning_rate, **kwargs)
        self.tau_max = float(tau_max)
        self.tau_min = float(tau_min)
        self.weight_grad_reset = check_weight_grad_reset(weight_grad_reset)

    def mutate_kwargs(self) -> dict[str, Any]:
        return {'temperature': self.tau_max}
