"""DARTS (Liu, Simonyan, Yang, ICLR 2019), first and second order."""
from __future__ import annotations

from typing import Any

import torch

from ..registry import register_strategy
from .base import DartsVariant, VariantLightningModule, loss_of

__all__ = ['Darts', 'DartsLightning', 'virtual_step', 'check_virtual_step', 'plain_sgd_problem']


def virtual_step(weights: list[torch.Tensor], grads: list[torch.Tensor | None], optimizer: torch.optim.Optimizer,
                 lr: float) -> list[torch.Tensor]:
    """The weights one optimizer step ahead, without touching them: ``w - lr * (momentum * buf + g + wd * w)``.

    For ``torch.optim.SGD`` (no Nesterov, no dampening) this equals the weights after a real step on the same
    gradient; the momentum buffer and weight decay are read from the optimizer, as in the official ``architect.py``.
    Other optimizers are approximated by a plain gradient step with their weight decay.
    """
    group_of = {p: g for g in optimizer.param_groups for p in g['params']}
    result = []
    for w, g in zip(weights, grads):
        group = group_of.get(w, {})
        direction = torch.zeros_like(w) if g is None else g.detach().clone()
        wd = group.get('weight_decay', 0.0)
        if wd:
            direction.add_(w.detach(), alpha=wd)
        momentum = group.get('momentum', 0.0)
        buf = optimizer.state.get(w, {}).get('momentum_buffer') if isinstance(optimizer, torch.optim.SGD) else None
        if momentum and buf is not None:
            direction.add_(buf, alpha=momentum)
        result.append(w.detach() - lr * direction)
    return result


def plain_sgd_problem(nesterov: Any, dampening: Any, unroll_nesterov: bool = False) -> str | None:
    """Why :func:`virtual_step` cannot predict an SGD step with these settings (``None``: it can).

    ``unroll_nesterov`` accepts a Nesterov optimizer, unrolled as plain momentum anyway (an approximation)."""
    if (nesterov and not unroll_nesterov) or dampening:
        return (f'second-order DARTS unrolls plain momentum SGD, but the weight optimizer has nesterov={nesterov}, '
                f'dampening={dampening}: set train.nesterov: false (and dampening 0), or '
                f'strategy.args.unroll_nesterov: true to unroll plain momentum anyway (as NAS-Bench-201\'s '
                f'DARTS-V2), or use order=1')
    return None


def check_virtual_step(optimizer: torch.optim.Optimizer, unroll_nesterov: bool = False) -> None:
    """Raise ``ValueError`` if :func:`virtual_step` cannot predict ``optimizer``'s step (Nesterov or dampened SGD)."""
    for group in optimizer.param_groups:
        problem = plain_sgd_problem(group.get('nesterov'), group.get('dampening'), unroll_nesterov)
        if problem:
            raise ValueError(problem)


class DartsLightning(VariantLightningModule):
    """DARTS search loop: the base loop, plus the unrolled (second-order) architecture gradient."""

    def on_train_start(self) -> None:
        if self.strategy.order == 2:
            check_virtual_step(self.weight_optimizer(), self.strategy.unroll_nesterov)
        return super().on_train_start()

    def compute_arch_gradients(self, trn_batch: Any, val_batch: Any, batch_idx: int) -> torch.Tensor:
        if self.strategy.order == 1:
            return super().compute_arch_gradients(trn_batch, val_batch, batch_idx)
        return self.unrolled_arch_gradients(trn_batch, val_batch, batch_idx)

    def _current_lr(self) -> float:
        if self.strategy.unrolled_lr is not None:
            return float(self.strategy.unrolled_lr)
        return float(self.weight_optimizer().param_groups[0]['lr'])

    def _loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return loss_of(self.training_module.training_step(batch, batch_idx))

    def unrolled_arch_gradients(self, trn_batch: Any, val_batch: Any, batch_idx: int) -> torch.Tensor:
        """Second-order DARTS: ``grad_alpha L_val(w', alpha) - xi * H v`` (finite differences, ``eps = 0.01/|v|``).

        ``w' = w - xi * (momentum * buf + grad_w L_train + wd * w)`` is a virtual step of the weight optimizer with
        ``xi`` its current learning rate. The weights are saved and restored exactly around the virtual step and
        the finite differences. As in the official code, whose validation forward runs on a copy of the model, the
        forward at ``w'`` leaves the batch-norm running statistics as they were (the training forwards at ``w`` and
        ``w +- eps v`` update them, three updates per step). Under an fp16 loss scaler every gradient here is taken
        of the scaled loss; the alpha gradients keep the scale, which the optimizer step removes.
        """
        weights = self.weight_parameters()
        alphas = self.arch_parameters()
        xi = self._current_lr()
        backup = [w.detach().clone() for w in weights]
        try:
            # 1. virtual step w' on the training batch
            train_loss = self._loss(trn_batch, 2 * batch_idx)
            scale = self.loss_scale()  # gradients by hand are of the scaled loss (fp16), unscaled where used as such
            grads = [g if g is None else g / scale
                     for g in torch.autograd.grad(self.scaled(train_loss), weights, allow_unused=True)]
            unrolled = virtual_step(weights, list(grads), self.weight_optimizer(), xi)
            with torch.no_grad():
                for w, u in zip(weights, unrolled):
                    w.copy_(u)
            # 2. gradients of the validation loss at w' (on the official model copy: running statistics unchanged)
            running = [b.detach().clone() for b in self.training_module.buffers()]
            val_loss = self.architecture_loss(val_batch, batch_idx)
            d_all = torch.autograd.grad(self.scaled(val_loss), alphas + weights, allow_unused=True)
            with torch.no_grad():  # after the backward, which reads them
                for b, r in zip(self.training_module.buffers(), running):
                    b.copy_(r)
            d_alpha = [torch.zeros_like(a) if g is None else g for g, a in zip(d_all[:len(alphas)], alphas)]
            v = [torch.zeros_like(w) if g is None else g / scale for g, w in zip(d_all[len(alphas):], weights)]
            # 3. Hessian-vector product by finite differences around w
            hessian = self.finite_difference_hvp(trn_batch, batch_idx, weights, backup, alphas, v)
        finally:
            with torch.no_grad():
                for w, b in zip(weights, backup):
                    w.copy_(b)
        for a, d, h in zip(alphas, d_alpha, hessian):
            a.grad = d - xi * h  # carries the loss scale (if any), as a backward's gradient
        return val_loss.detach()

    def finite_difference_hvp(self, trn_batch: Any, batch_idx: int, weights: list[torch.Tensor],
                              center: list[torch.Tensor], alphas: list[torch.Tensor],
                              v: list[torch.Tensor]) -> list[torch.Tensor]:
        """``(grad_alpha L_train(w + eps v) - grad_alpha L_train(w - eps v)) / (2 eps)`` with ``eps = 0.01/|v|``
        (times the loss scale, if any)."""
        norm = torch.cat([x.flatten() for x in v]).norm()
        if norm == 0:
            return [torch.zeros_like(a) for a in alphas]
        eps = 0.01 / norm
        grads = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, c, d in zip(weights, center, v):
                    w.copy_(c + sign * eps * d)
            g = torch.autograd.grad(self.scaled(self._loss(trn_batch, 2 * batch_idx)), alphas, allow_unused=True)
            grads.append([torch.zeros_like(a) if x is None else x for x, a in zip(g, alphas)])
        return [(gp - gm) / (2 * eps) for gp, gm in zip(*grads)]


@register_strategy
class Darts(DartsVariant):
    """DARTS: softmax-weighted mixed operations, bilevel alpha updates on the validation half.

    `Liu, Simonyan, Yang. DARTS: Differentiable Architecture Search. ICLR 2019 <https://arxiv.org/abs/1806.09055>`__.

    First order uses ``grad_alpha L_val(w, alpha)``. Second order (``order=2``) unrolls one step of the weight
    optimizer (its momentum and weight decay included) and corrects with a finite-difference Hessian-vector product,
    ``eps = 0.01 / |v|``, as the official ``architect.py``. The arch step runs before the weight step. The virtual
    step is plain momentum SGD: second order with ``train.nesterov: true`` is refused when the config resolves,
    unless ``unroll_nesterov=True``.

    Parameters
    ----------
    order
        1 (first order, default) or 2 (unrolled second order).
    unrolled_lr
        ``xi`` of the virtual step; ``None`` (default) uses the weight optimizer's current learning rate, as the
        official code. ``0`` makes second order equal to first order.
    unroll_nesterov
        With a Nesterov weight optimizer, unroll plain momentum SGD anyway, ``w - xi (mu buf + g + lambda w)``: an
        approximation of the real step, which is what NAS-Bench-201's DARTS-V2 (AutoDL-Projects) does with its
        Nesterov SGD; the NAS-Bench-201 ``darts-2nd`` recipes set it. Off by default: such a mismatch is refused.
    **kwargs
        See :class:`~nni_darts_variants.strategies.base.DartsVariant` (defaults: arch Adam lr 3e-4, betas
        (0.5, 0.999), weight decay 1e-3; weight gradients clipped at 5).
    """

    module_class = DartsLightning

    def __init__(self, *, order: int = 1, unrolled_lr: float | None = None, unroll_nesterov: bool = False,
                 **kwargs: Any):
        if order not in (1, 2):
            raise ValueError(f'order must be 1 or 2, got {order!r}')
        if unrolled_lr is not None and unrolled_lr < 0:
            raise ValueError(f'unrolled_lr must be >= 0 or None, got {unrolled_lr}')
        super().__init__(**kwargs)
        self.order = order
        self.unrolled_lr = unrolled_lr
        self.unroll_nesterov = bool(unroll_nesterov)

    @classmethod
    def check_trainer(cls, max_epochs: int | None, *, train: dict[str, Any] | None = None,
                      **strategy_args: Any) -> None:
        """Also refuse second order with ``train.nesterov: true`` when the config resolves (the weight optimizer
        itself is checked again at train start, for optimizers configured in code)."""
        super().check_trainer(max_epochs, train=train, **strategy_args)
        resolved = cls.resolved_arguments(**strategy_args)
        if train is not None and resolved.get('order') == 2:
            problem = plain_sgd_problem(train.get('nesterov', False), train.get('dampening', 0),
                                        bool(resolved.get('unroll_nesterov')))
            if problem:
                raise ValueError(problem)
