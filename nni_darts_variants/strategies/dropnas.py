"""DropNAS (Hong et al., IJCAI 2020): grouped operation dropout for one-level DARTS."""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.nas.nn.pytorch import LayerChoice

from search_spaces.ops import PRIMITIVES
from ..registry import register_strategy
from .base import (DartsVariant, MixedEdge, MixedInput, VariantLightningModule, check_weight_grad_reset,
                   first_per_label, keep_zero_gradients, loss_of)
from .nni_spaces import note_fallback

__all__ = ['DropNAS', 'DropEdge', 'DropNASLightning', 'PARAMETRIC_OPS', 'operation_groups', 'sample_group_mask',
           'kept_share', 'adjust_kept_alphas', 'partial_decay_loss']

_logger = logging.getLogger(__name__)

#: DropNAS's parametric group; every other DARTS op (pools, skip, none) is non-parametric.
PARAMETRIC_OPS: tuple[str, ...] = ('sep_conv_3x3', 'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')


def operation_groups(candidates: dict[str, nn.Module]) -> list[list[int]]:
    """Candidate indices of the parametric and the non-parametric group (empty groups left out).

    DARTS ops are grouped by name as in the official code (``skip_connect`` is non-parametric even on a stride-2
    edge); other ops are parametric when they have parameters.
    """
    groups: list[list[int]] = [[], []]
    for i, (name, module) in enumerate(candidates.items()):
        parametric = name in PARAMETRIC_OPS if name in PRIMITIVES else any(True for _ in module.parameters())
        groups[0 if parametric else 1].append(i)
    return [g for g in groups if g]


def sample_group_mask(size: int, drop_prob: float) -> torch.Tensor:
    """Keep each of ``size`` ops with probability ``1 - drop_prob``; resample while none is kept."""
    while True:
        kept = torch.rand(size) >= drop_prob
        if kept.any():
            return kept


def kept_share(alpha: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``sum_kept exp(alpha) / sum_all exp(alpha)``: the kept probability mass under the full softmax."""
    kept = kept.to(alpha.device)
    return torch.exp(torch.logsumexp(alpha[kept], 0) - torch.logsumexp(alpha, 0))


@torch.no_grad()
def adjust_kept_alphas(alpha: torch.Tensor, kept: torch.Tensor, share: torch.Tensor | float) -> None:
    """Shift the kept alphas in place so that their share is ``share`` again; dropped alphas are untouched.

    Adds ``k = log(share / (1 - share) * sum_dropped exp(alpha) / sum_kept exp(alpha))`` to every kept alpha.
    """
    kept = kept.to(alpha.device)
    if bool(kept.all()):
        return
    share = torch.as_tensor(share, dtype=alpha.dtype, device=alpha.device)
    shift = (torch.log(share) - torch.log1p(-share) + torch.logsumexp(alpha[~kept], 0)
             - torch.logsumexp(alpha[kept], 0))
    alpha[kept] += shift


def partial_decay_loss(weights: Iterable[nn.Parameter], alphas: Iterable[nn.Parameter], weight_decay: float,
                       alpha_decay: float) -> torch.Tensor | None:
    """``lambda_w sum ||w||^2`` over weights with a non-zero gradient ``+ lambda_a sum (alpha * [|grad| > 1e-7])^2``.

    The decay of the parameters used in this step only (read from the current ``.grad``), as the official code;
    ``None`` when nothing was used. The gradient is ``2 * lambda * param`` (the square is not halved).
    """
    terms = [weight_decay * w.pow(2).sum() for w in weights if w.grad is not None and bool(w.grad.ne(0).any())]
    terms += [alpha_decay * (a * (a.grad.abs() > 1e-7)).pow(2).sum() for a in alphas if a.grad is not None]
    return torch.stack(terms).sum() if terms else None


class DropEdge(MixedEdge):
    """A mixed edge with grouped operation dropout: dropped ops get weight 0 and are not executed.

    :meth:`resample` draws, per group, each op dropped with probability ``drop_rate ** (1 / |group|)`` and redraws
    a group left empty; the mask goes in the memo under the label, so all cells of a type share it. Kept ops are
    weighted ``exp(alpha_i) / sum_kept exp(alpha_j)``. In eval mode (or before the first resample) all ops run with
    the full softmax. The genotype ranks raw alphas (:meth:`ranking_weights`), ``none`` excluded.
    """

    def __init__(self, candidates: dict[str, nn.Module], alpha: nn.Parameter, label: str, drop_rate: float = 3e-5):
        super().__init__(candidates, alpha, label, drop_rate=drop_rate)
        self.drop_rate = drop_rate
        self.groups = operation_groups(candidates)
        self.kept: torch.Tensor | None = None

    def active(self) -> torch.Tensor:
        """Boolean mask of the ops that run in this forward."""
        if self.kept is None or not self.training:
            return torch.ones(len(self.names), dtype=torch.bool)
        return self.kept

    def has_drops(self) -> bool:
        return not bool(self.active().all())

    def op_weights(self) -> torch.Tensor:
        dropped = ~self.active().to(self._arch_alpha.device)
        return F.softmax(self._arch_alpha.masked_fill(dropped, float('-inf')), dim=-1)

    def ranking_weights(self) -> torch.Tensor:
        """Raw alphas (DropNAS's genotype rule; no softmax)."""
        return self._arch_alpha.detach().clone()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights, active = self.op_weights(), self.active().tolist()
        return sum(weights[i] * self[name](*args, **kwargs) for i, name in enumerate(self.names) if active[i])

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        if self.label in memo:
            self.kept = torch.tensor([name in memo[self.label] for name in self.names])
            return {}
        kept = torch.zeros(len(self.names), dtype=torch.bool)
        for group in self.groups:
            kept[group] = sample_group_mask(len(group), self.drop_rate ** (1.0 / len(group)))
        self.kept = kept
        return {self.label: [name for name, k in zip(self.names, kept.tolist()) if k]}

    def export_probs(self, memo: dict[str, Any]) -> dict[str, Any]:
        if self.label in memo:
            return {}
        return {self.label: dict(zip(self.names, F.softmax(self._arch_alpha.detach(), -1).cpu().tolist()))}

    @classmethod
    def from_layer_choice(cls, module: LayerChoice, alpha: nn.Parameter, mutate_kwargs: dict[str, Any]) -> 'DropEdge':
        return cls(module.candidates, alpha, module.label, drop_rate=mutate_kwargs['drop_rate'])


class DropNASInput(MixedInput):
    """A free ``InputChoice`` under DropNAS: its inputs form no parametric / parameter-free groups, so it is DARTS's
    weighted choice, listed in the strategy's fallback warning."""

    @classmethod
    def from_input_choice(cls, module: Any, alpha: nn.Parameter, mutate_kwargs: dict[str, Any]) -> 'DropNASInput':
        note_fallback(mutate_kwargs, 'free input choice (no operation groups to drop)', module.label)
        return super().from_input_choice(module, alpha, mutate_kwargs)


class DropNASLightning(VariantLightningModule):
    """DropNAS's one-level loop. Per training batch (the ``val`` batch of NNI's DARTS loaders is not used):

    1. ``resample()`` the masks; record each edge's kept share under the full softmax;
    2. loss on the batch, backward, weight gradients clipped, weight step, alpha step (after warm-up);
    3. partial decay: :func:`partial_decay_loss` of the parameters used in step 2, backward, clipped weight step and
       alpha step again (as the official code, so SGD momentum acts twice per batch);
    4. :func:`adjust_kept_alphas` restores each edge's kept share.

    Dropped alphas have no gradient, but Adam's momentum would still move them; following the paper's intent
    ("dropped operations are not updated"), both alpha steps restore the dropped entries afterwards (Adam's state
    still decays with the zero gradient).
    """

    step_order = ('weight', 'arch')

    def weight_step(self, trn_batch: Any, batch_idx: int) -> Any:
        """Steps 1 and 2 up to the weight step; the backward also fills the alpha gradients (one level)."""
        self.resample()
        self._step_edges = self.drop_edges()
        self._step_shares = {label: kept_share(e.alpha.detach(), e.kept)
                             for label, e in self._step_edges.items() if e.has_drops()}
        self.architecture_optimizers().zero_grad()
        return super().weight_step(trn_batch, batch_idx)

    def weight_backward(self, trn_batch: Any, batch_idx: int) -> Any:
        """The loss of the masks drawn in :meth:`weight_step` (no new sample), backward."""
        output = self.training_module.training_step(trn_batch, batch_idx)
        self.manual_backward(self.one_level_loss(loss_of(output), trn_batch, self.arch_update_enabled(batch_idx)))
        return output

    def architecture_step(self, trn_batch: Any, val_batch: Any, batch_idx: int) -> None:
        """The alpha step of step 2, on the gradients of the weight step's backward."""
        self.masked_arch_step(self.architecture_optimizers(), self._step_edges)

    def finish_step(self, batch_idx: int) -> None:
        """Steps 3 and 4, then the base's tail."""
        arch = self.arch_update_enabled(batch_idx)
        self.partial_decay_step(self.architecture_optimizers(), self._step_edges, arch, batch_idx)
        if arch:
            for label, share in self._step_shares.items():
                adjust_kept_alphas(self._step_edges[label].alpha, self._step_edges[label].kept, share)
        super().finish_step(batch_idx)

    def drop_edges(self) -> dict[str, DropEdge]:
        """One :class:`DropEdge` per label (edges of a label share alpha and mask)."""
        return first_per_label(self.supernet_modules(), DropEdge)

    def masked_arch_step(self, arc_optim: Any, edges: dict[str, DropEdge]) -> None:
        """Step the alpha optimizer, then put back the dropped alphas (momentum must not move them)."""
        frozen = []
        for edge in edges.values():
            if edge.has_drops():
                dropped = ~edge.kept.to(edge.alpha.device)
                frozen.append((edge.alpha, dropped, edge.alpha.detach()[dropped].clone()))
        arc_optim.step()
        with torch.no_grad():
            for alpha, dropped, values in frozen:
                alpha[dropped] = values

    def partial_decay_step(self, arc_optim: Any, edges: dict[str, DropEdge], arch: bool, batch_idx: int) -> None:
        """The decay of the parameters used in this step, applied by both optimizers."""
        alphas = self.arch_parameters() if arch else []
        decay = partial_decay_loss(self.weight_parameters(), alphas, self.strategy.weight_decay,
                                   self.strategy.alpha_decay)
        if decay is None:
            return
        arc_optim.zero_grad()
        self.optimize_weights(lambda: self.manual_backward(decay), batch_idx, self.gradient_clip_val)
        if arch:
            self.masked_arch_step(arc_optim, edges)

    def schedule(self, epoch: int, max_epochs: int | None) -> None:
        """No dropout during warm-up (as the official code), ``drop_rate`` after."""
        rate = 0.0 if epoch < self.warmup_epochs else self.strategy.drop_rate
        for edge in self.drop_edges().values():
            edge.drop_rate = rate

    def on_train_start(self) -> None:
        for group in self.weight_optimizer().param_groups:
            if group.get('weight_decay', 0.0):
                _logger.warning('DropNAS applies its own partial weight decay (weight_decay=%s), but the evaluator\'s '
                                'optimizer also has weight_decay=%s: set it to 0 in the evaluator to avoid decaying '
                                'twice.', self.strategy.weight_decay, group['weight_decay'])
                break
        if self.strategy.weight_grad_reset == 'zeros':  # dropped ops keep momentum (official PyTorch 1.x)
            keep_zero_gradients(self.weight_optimizer(), self.weight_parameters())
        return super().on_train_start()


@register_strategy
class DropNAS(DartsVariant):
    """DropNAS: one-level DARTS with grouped operation dropout.

    `Hong, Li, Zhang, Zhu, Zhang, Wang, Tan, Xiong, Zhou, Lai. DropNAS: Grouped Operation Dropout for Differentiable
    Architecture Search. IJCAI 2020 <https://www.ijcai.org/proceedings/2020/334>`__; defaults from the first
    author's code (github.com/wiljohnhong/DropNAS).

    Weights and alphas learn from the SAME training batch (one level); the validation loader that NNI's DARTS loop
    supplies is ignored, so give the evaluator the whole training set for ``train`` (any loader for ``val``). Each
    step drops ops per group (``sep``/``dil`` convolutions vs. pools/skip/none) with probability
    ``drop_rate ** (1/4)``, runs only the kept ops, then applies a partial weight decay to the parameters that were
    used and restores the kept probability share of every edge (:class:`DropNASLightning`). The genotype ranks raw
    alphas, ``none`` excluded.

    Weight decay is not inside the optimizers: DropNAS applies ``weight_decay`` (lambda_w) itself, on the weights
    used in the step, so the evaluator's optimizer should have ``weight_decay=0`` (NNI's ``Classification`` default;
    a warning is logged otherwise). ``drop_rate=0`` is one-level DARTS with this partial decay.

    Parameters
    ----------
    drop_rate
        ``r``: the probability that a whole group is dropped before resampling (3e-5; per op ``r ** (1/4)`` = 0.074).
    weight_decay
        lambda_w of the partial weight decay (3e-4; gradient ``2 * lambda_w * w``).
    alpha_decay
        lambda_a of the partial alpha decay (1e-3).
    arc_learning_rate, arc_betas
        Adam for the alphas (3e-4, (0.5, 0.999)); its weight decay must stay 0 (``arc_weight_decay``).
    gradient_clip_val
        Weight gradient norm clip (3).
    weight_grad_reset
        ``'zeros'`` (default, the official code's PyTorch 1.x ``zero_grad``): the weights of dropped operations get a
        zero gradient, so SGD's momentum still moves them; ``'none'`` (PyTorch 2, Lightning): they stay untouched.
    **kwargs
        See :class:`~nni_darts_variants.strategies.base.DartsVariant`. During ``warmup_epochs`` nothing is dropped and
        alphas are frozen.
    """

    edge_class = DropEdge
    input_class = DropNASInput
    darts_fallback_for = ('value choice',)
    module_class = DropNASLightning

    def __init__(self, *, drop_rate: float = 3e-5, weight_decay: float = 3e-4, alpha_decay: float = 1e-3,
                 arc_weight_decay: float = 0.0, gradient_clip_val: float | None = 3.0, weight_grad_reset: str = 'zeros',
                 **kwargs: Any):
        if not 0 <= drop_rate < 1:
            raise ValueError(f'drop_rate must be in [0, 1), got {drop_rate}')
        if weight_decay < 0 or alpha_decay < 0:
            raise ValueError(f'weight_decay and alpha_decay must be >= 0, got {weight_decay}, {alpha_decay}')
        if arc_weight_decay != 0:
            raise ValueError(f'arc_weight_decay must be 0 for DropNAS (got {arc_weight_decay}); the alpha decay is '
                             'alpha_decay, applied to the used alphas only')
        super().__init__(arc_weight_decay=0.0, gradient_clip_val=gradient_clip_val, **kwargs)
        self.drop_rate = drop_rate
        self.weight_decay = weight_decay
        self.alpha_decay = alpha_decay
        self.weight_grad_reset = check_weight_grad_reset(weight_grad_reset)

    def mutate_kwargs(self) -> dict[str, Any]:
        return {'drop_rate': self.drop_rate}

    @classmethod
    def smoke_kwargs(cls) -> dict[str, Any]:
        """A smoke search that exercises the dropout (per-op drop probability about 0.47)."""
        return {'warmup_epochs': 0, 'drop_rate': 0.05}
