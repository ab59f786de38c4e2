"""SNAS (Xie, Zheng, Liu, Lin, ICLR 2019): soft Gumbel-softmax relaxation, one level, an expected resource cost."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.nas.nn.pytorch import LayerChoice

from search_spaces.ops import PRIMITIVES
from ..registry import register_strategy
from .base import DartsVariant, MixedEdge, VariantLightningModule, first_per_label, loss_of
from .gdas import gumbel_noise

__all__ = ['Snas', 'SnasEdge', 'SnasLightning', 'exponential_temperature', 'expected_parametric_ops',
           'PARAMETRIC_OPS']

#: SNAS's parametric operations (its resource constraint counts them); pools, skip and ``none`` have no weights.
PARAMETRIC_OPS: tuple[str, ...] = ('sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')

_NOISE_KEY = '/snas_noise'


def exponential_temperature(epoch: int, max_epochs: int | None, initial: float, final: float) -> float:
    """``initial * (final / initial) ** (epoch / (max_epochs - 1))``: ``initial`` at the first epoch, ``final`` at
    the last (``initial`` throughout with one epoch or no known end)."""
    if max_epochs is None or max_epochs <= 1:
        return initial
    return initial * (final / initial) ** (min(epoch, max_epochs - 1) / (max_epochs - 1))


def is_parametric(name: str, module: nn.Module) -> bool:
    """A DARTS op by name (:data:`PARAMETRIC_OPS`), another op by whether it has parameters."""
    return name in PARAMETRIC_OPS if name in PRIMITIVES else any(True for _ in module.parameters())


class SnasEdge(MixedEdge):
    """An SNAS edge: every candidate runs, weighted by a sampled ``Z = softmax((log_softmax(alpha) + g) / lambda)``.

    ``g`` is standard Gumbel noise drawn by :meth:`resample` once per label (all cells of a type share the sample);
    ``Z`` sums to 1 and tends to a one-hot sample of ``Categorical(softmax(alpha))`` as ``lambda -> 0``. The
    gradient reaches ``alpha`` through ``Z`` (SNAS's credit assignment is the ordinary loss gradient).
    """

    def __init__(self, candidates: dict[str, nn.Module], alpha: nn.Parameter, label: str, *,
                 temperature: float = 1.0):
        super().__init__(candidates, alpha, label)
        self.temperature = temperature
        self._noise: torch.Tensor | None = None
        self.parametric = torch.tensor([is_parametric(n, self[n]) for n in self.names], dtype=torch.bool)

    def op_weights(self) -> torch.Tensor:
        if self._noise is None:
            self.resample({})
        return F.softmax((F.log_softmax(self._arch_alpha, -1) + self._noise) / self.temperature, dim=-1)

    def cost_probs(self) -> torch.Tensor:
        """``softmax(alpha)``: the hardware cost is the expectation under the categorical ``Z`` samples, as the
        resource term's count (not the noisy relaxed ``Z`` of this step)."""
        return F.softmax(self._arch_alpha, -1)

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        key = self.label + _NOISE_KEY
        self._noise = memo[key] if key in memo else gumbel_noise(self._arch_alpha.detach())
        return {key: self._noise}

    def export_probs(self, memo: dict[str, Any]) -> dict[str, Any]:
        """``softmax(alpha)``: the probability of each candidate in the sampled one-hot limit."""
        if self.label in memo:
            return {}
        return {self.label: dict(zip(self.names, self.ranking_weights().cpu().tolist()))}

    @classmethod
    def from_layer_choice(cls, module: LayerChoice, alpha: nn.Parameter, mutate_kwargs: dict[str, Any]) -> 'SnasEdge':
        return cls(module.candidates, alpha, module.label, temperature=mutate_kwargs.get('temperature', 1.0))


def expected_parametric_ops(edges: dict[str, SnasEdge]) -> torch.Tensor:
    """``sum_edges P(parametric op)``, P under ``softmax(alpha)``: the mean of SNAS's Poisson-binomial count of
    parametric operations (one edge per label, so per cell type)."""
    terms = [F.softmax(e.alpha, -1)[e.parametric.to(e.alpha.device)].sum() for e in edges.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class SnasLightning(VariantLightningModule):
    """SNAS loop, one level: one sample, one loss on the training batch, one backward for weights and alphas.

    ``weight_backward`` adds the resource term ``resource_weight * log(E[#parametric ops])`` and any hardware cost
    (:meth:`one_level_loss`) to the loss (alphas only: they have no weight gradient); ``architecture_step`` then steps the alpha optimizer on the gradient already
    there. The ``val`` batch of NNI's DARTS loaders is not used.
    """

    step_order = ('weight', 'arch')

    def weight_step(self, trn_batch: Any, batch_idx: int) -> Any:
        self.architecture_optimizers().zero_grad()
        return super().weight_step(trn_batch, batch_idx)

    def resource_loss(self) -> torch.Tensor:
        count = expected_parametric_ops(first_per_label(self.supernet_modules(), SnasEdge))
        return self.strategy.resource_weight * torch.log(count.clamp_min(1e-12))

    def weight_backward(self, trn_batch: Any, batch_idx: int) -> Any:
        self.resample()
        output = self.training_module.training_step(trn_batch, 2 * batch_idx + 1)
        loss = loss_of(output)
        if self.arch_update_enabled(batch_idx) and self.strategy.resource_weight:
            resource = self.resource_loss()
            self.log('snas_resource', resource.detach())
            loss = loss + resource
        self.manual_backward(self.one_level_loss(loss, trn_batch, self.arch_update_enabled(batch_idx)))
        return output

    def architecture_step(self, trn_batch: Any, val_batch: Any, batch_idx: int) -> None:
        arc_optim = self.architecture_optimizers()
        if self.strategy.arc_gradient_clip_val:
            nn.utils.clip_grad_norm_(self.arch_parameters(), self.strategy.arc_gradient_clip_val)
        arc_optim.step()

    def schedule(self, epoch: int, max_epochs: int | None) -> None:
        s = self.strategy
        tau = exponential_temperature(epoch, max_epochs, s.temperature, s.temperature_min)
        for edge in self.supernet_modules():
            if isinstance(edge, SnasEdge):
                edge.temperature = tau
        self.log('snas_temperature', tau)


@register_strategy
class Snas(DartsVariant):
    """SNAS: a soft Gumbel-softmax relaxation of each edge's one-hot choice, searched in one level.

    `Xie, Zheng, Liu, Lin. SNAS: Stochastic Neural Architecture Search. ICLR 2019
    <https://arxiv.org/abs/1812.09926>`__; defaults from the authors' 8-cell CIFAR-10 command (``SNAS-Series``:
    ``--temp 1 --temp_min 0.03 --resource_lambda 1e-2 --log_penalty``, 150 epochs).

    Each edge mixes all candidates with a sampled ``Z = softmax((log alpha + g) / lambda)`` (:class:`SnasEdge`);
    weights and alphas learn from the same training batch and the same backward (one level, the generic loss
    gradient as credit assignment); ``lambda`` is annealed from ``temperature`` to ``temperature_min``
    (:func:`exponential_temperature`; the paper gives the endpoints, the exponential form between them is this
    package's choice). The resource constraint is ``resource_weight * log E[C]`` with ``E[C]`` the expected number
    of parametric operations (:func:`expected_parametric_ops`, the mean of the Poisson-binomial count) summed over
    the cell types; ``resource_weight=0`` switches it off. The export is the DARTS rule on ``softmax(alpha)``.
    A hardware ``cost`` (or NNI ``penalty``) adds ``penalized(CE') - CE'`` to the same loss, ``CE'`` detached (so the
    weight gradient is unchanged), on the expectation under ``softmax(alpha)`` (:meth:`SnasEdge.cost_probs`).

    Differences from NNI's ``GumbelDARTS``: that strategy keeps DARTS's bilevel loop (alphas on the validation
    half, a second forward), has no resource term, anneals linearly from 1.0 to 0.33, and samples a new ``g`` per
    module; here one backward serves both parameter sets, the cost term is SNAS's, and cells of a type share ``g``.

    Parameters
    ----------
    temperature, temperature_min
        ``lambda`` at the first and the last epoch (1.0 and 0.03).
    resource_weight
        Weight of the log expected parametric-op count (1e-2).
    arc_learning_rate, arc_betas, arc_weight_decay
        Adam for the alphas (DARTS's 3e-4, (0.5, 0.999), 1e-3, as the authors' code builds on DARTS).
    **kwargs
        See :class:`~nni_darts_variants.strategies.base.DartsVariant`.
    """

    edge_class = SnasEdge
    module_class = SnasLightning

    def __init__(self, *, temperature: float = 1.0, temperature_min: float = 0.03, resource_weight: float = 1e-2,
                 **kwargs: Any):
        if not 0 < temperature_min <= temperature:
            raise ValueError(f'need 0 < temperature_min <= temperature, got {temperature_min} and {temperature}')
        if resource_weight < 0 or not math.isfinite(resource_weight):
            raise ValueError(f'resource_weight must be a finite number >= 0, got {resource_weight}')
        super().__init__(**kwargs)
        self.temperature = float(temperature)
        self.temperature_min = float(temperature_min)
        self.resource_weight = float(resource_weight)

    def mutate_kwargs(self) -> dict[str, Any]:
        return {'temperature': self.temperature}
