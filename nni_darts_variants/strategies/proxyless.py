"""ProxylessNAS (Cai, Zhu, Han, ICLR 2019): binarized paths, one path per weight step, two per arch step."""
from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_strategy
from .base import DartsVariant, MixedEdge, MixedInput, VariantLightningModule, first_per_label
from .nni_spaces import InputSampler

__all__ = ['ProxylessNAS', 'ProxylessEdge', 'ProxylessInput', 'ProxylessLightning', 'gate_to_alpha_gradient', 'rescale_sampled_alphas',
           'GRAD_BINARY_MODES', 'ZERO_OPS']

_logger = logging.getLogger(__name__)

#: Architecture-step modes: the paper's two-path scheme and the official code's ``full_v2``.
GRAD_BINARY_MODES = ('two', 'full_v2')
#: Candidate names of the zero path (DARTS's ``none``, the ProxylessNAS space's ``zero``).
ZERO_OPS = ('none', 'zero')


def gate_to_alpha_gradient(gate_grads: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``dL/dalpha_i = sum_j dL/dg_j * p_j * (delta_ij - p_i)``: binary-gate gradients through the softmax."""
    return probs * (gate_grads - (probs * gate_grads).sum())


def rescale_sampled_alphas(alpha: torch.Tensor, indices: Sequence[int], before: torch.Tensor) -> None:
    """Shift ``alpha[indices]`` so that their ``sum(exp)`` equals that of ``before`` (their values before the step).

    Every other entry is untouched, so the softmax probability of every unsampled path is unchanged.
    """
    index = torch.as_tensor(list(indices), device=alpha.device)
    with torch.no_grad():
        offset = torch.logsumexp(alpha[index], 0) - torch.logsumexp(before, 0)
        alpha[index] -= offset


class _ActivePathGate(torch.autograd.Function):
    """``full_v2``: forward echoes the active path's output; backward adds the alpha gradient over all N paths.

    The other candidates are evaluated in backward under ``no_grad`` only to get ``dL/dg_k = sum(o_k * grad_out)``.
    """

    @staticmethod
    def forward(ctx: Any, alpha: torch.Tensor, x: torch.Tensor, output: torch.Tensor,
                run_path: Callable[[int, torch.Tensor], torch.Tensor], active: int) -> torch.Tensor:
        ctx.run_path, ctx.active = run_path, active
        ctx.save_for_backward(alpha, x, output)
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        alpha_grad = None
        if ctx.needs_input_grad[0]:
            alpha, x, output = ctx.saved_tensors
            with torch.no_grad():
                gate_grads = torch.stack([
                    ((output if k == ctx.active else ctx.run_path(k, x)) * grad_out).sum() for k in range(len(alpha))])
                alpha_grad = gate_to_alpha_gradient(gate_grads.to(alpha.dtype), F.softmax(alpha, -1))
        return alpha_grad, None, grad_out, None, None


class ProxylessEdge(MixedEdge):
    """A binarized mixed edge: only the sampled path(s) run.

    ``phase`` is set by :class:`ProxylessLightning`: ``'weight'`` samples one path ``~ softmax(alpha)`` and runs only
    it; ``'arch'`` samples as ``grad_binary_mode`` says (see :class:`ProxylessNAS`). Modules sharing a label (one
    edge of every cell of a type) share one sample through NNI's memo, hence one consistent child network.
    """

    def __init__(self, candidates: dict[str, nn.Module], alpha: nn.Parameter, label: str, *,
                 grad_binary_mode: str = 'two'):
        super().__init__(candidates, alpha, label, grad_binary_mode=grad_binary_mode)
        self.grad_binary_mode = grad_binary_mode
        self.phase = 'weight'
        self.paths: tuple[int, ...] | None = None  # candidates computed this step (active first)
        self.alpha_before: torch.Tensor | None = None

    @property
    def active(self) -> int:
        return self.paths[0]

    def _sample(self) -> tuple[int, ...]:
        probs = self.op_weights().detach()
        if self.phase == 'weight' or self.grad_binary_mode == 'full_v2' or len(probs) < 2:
            return (int(torch.multinomial(probs, 1)),)
        pair = torch.multinomial(probs, 2, replacement=False)
        chosen = int(torch.multinomial(F.softmax(self.alpha.detach()[pair], -1), 1))
        return int(pair[chosen]), int(pair[1 - chosen])

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        key = f'{self.label}/paths'
        self.paths = tuple(memo[key]) if key in memo else self._sample()
        return {self.label: self.names[self.active], key: self.paths}

    def cost_probs(self) -> torch.Tensor:
        """The official ``current_prob_over_ops``: in a two-path arch step, ``softmax(alpha[pair])`` at the pair's
        indices and 0 elsewhere (so the cost gradient reaches only the two sampled alphas, and the rescaling keeps
        every other probability); otherwise ``softmax(alpha)``."""
        probs = F.softmax(self.alpha, -1)
        if self.phase != 'arch' or self.grad_binary_mode != 'two' or self.paths is None or len(self.paths) < 2:
            return probs
        pair = torch.as_tensor(self.paths, device=probs.device)
        return torch.zeros_like(probs).index_put((pair,), F.softmax(self.alpha[pair], -1))

    def run_path(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self[self.names[index]](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.paths is None:
            self.resample({})
        output = self.run_path(self.active, x)
        if self.phase == 'weight' or not self.alpha.requires_grad:
            return output
        if self.grad_binary_mode == 'full_v2':
            return _ActivePathGate.apply(self.alpha, x, output, self.run_path, self.active)
        if len(self.paths) < 2:
            return output
        with torch.no_grad():
            inactive_output = self.run_path(self.paths[1], x)
        probs = F.softmax(self.alpha[list(self.paths)], -1)
        gates = torch.tensor([1.0, 0.0], dtype=probs.dtype, device=probs.device) + (probs - probs.detach())
        return gates[0] * output + gates[1] * inactive_output

    @classmethod
    def from_layer_choice(cls, module: Any, alpha: nn.Parameter, mutate_kwargs: dict[str, Any]) -> 'ProxylessEdge':
        return cls(module.candidates, alpha, module.label,
                   grad_binary_mode=mutate_kwargs.get('grad_binary_mode', 'two'))


class ProxylessInput(InputSampler, MixedInput):
    """ProxylessNAS on an input choice: ``n_chosen`` inputs sampled from ``softmax(alpha)`` without replacement.

    Weight phase: only the sampled inputs enter the output. Arch phase: the output adds
    ``sum_j (p_j - p_j.detach()) * x_j.detach()`` over every candidate input (zero in value), whose gradient is the
    binary-gate gradient ``dL/dalpha_i = sum_j <dL/dout, x_j> p_j (delta_ij - p_i)`` (no rescaling needed). A free
    ``InputChoice`` receives every input computed anyway; as a node of an NNI ``Cell`` it runs only the sampled
    incoming edges in the weight phase, and in the arch phase the others too, without graph
    (:meth:`probes_unchosen`), just for ``x_j`` in that gradient.
    """

    phase = 'weight'

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        if self.label in memo:
            self.chosen = list(memo[self.label])
            return {}
        probs = F.softmax(self._arch_alpha.detach(), -1)
        self.chosen = sorted(torch.multinomial(probs, self.n_chosen or 1, replacement=False).tolist())
        return {self.label: list(self.chosen)}

    def probes_unchosen(self) -> bool:
        """In the arch phase: the binary-gate gradient needs every input's value."""
        return self.phase == 'arch' and self._arch_alpha.requires_grad

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        chosen = self.sampled_inputs()
        out = sum(inputs[j] for j in chosen)
        if self.probes_unchosen():
            probs = F.softmax(self._arch_alpha, -1)
            out = out + sum((p - p.detach()) * x.detach() for p, x in zip(probs, inputs))
        return out / len(chosen) if self.reduction == 'mean' else out


def unique_edges(modules: Iterable[nn.Module]) -> list[ProxylessEdge]:
    """One :class:`ProxylessEdge` per label (all modules of a label share alpha and sample)."""
    return list(first_per_label(modules, ProxylessEdge).values())


def prepare_arch_update(edges: Iterable[ProxylessEdge]) -> None:
    """Before the optimizer step: drop the gradient of edges whose active path is zero (no update this step)
    and, in two-path mode, keep the two involved alphas so that :func:`finish_arch_update` can rescale them."""
    for edge in edges:
        edge.alpha_before = None
        if edge.paths is None:
            continue
        if edge.names[edge.active] in ZERO_OPS:
            edge.alpha.grad = None
        elif edge.grad_binary_mode == 'two' and len(edge.paths) == 2:
            edge.alpha_before = edge.alpha.detach()[list(edge.paths)].clone()


def finish_arch_update(edges: Iterable[ProxylessEdge]) -> None:
    """After the optimizer step (two-path mode): restore ``sum(exp)`` over the two involved alphas."""
    for edge in edges:
        if edge.alpha_before is not None:
            rescale_sampled_alphas(edge.alpha, edge.paths, edge.alpha_before)
            edge.alpha_before = None


class ProxylessLightning(VariantLightningModule):
    """ProxylessNAS loop: the weight step, then (every ``arch_update_every`` batches) the arch step in the ``'arch'``
    phase and the rescaling, as the official ``nas_manager.train``."""

    #: The base's step order (read by its ``training_step`` once the base owns the step): weights first.
    step_order: ClassVar[tuple[str, ...]] = ('weight', 'arch')

    def _edges(self) -> list[ProxylessEdge]:
        return unique_edges(self.supernet_modules())

    def _set_phase(self, phase: str) -> None:
        for module in self.supernet_modules():
            if isinstance(module, (ProxylessEdge, ProxylessInput)):
                module.phase = phase

    def arch_update_enabled(self, batch_idx: int) -> bool:
        return super().arch_update_enabled(batch_idx) and (batch_idx + 1) % self.strategy.arch_update_every == 0

    def architecture_step(self, trn_batch: Any, val_batch: Any, batch_idx: int) -> None:
        self._set_phase('arch')
        try:
            super().architecture_step(trn_batch, val_batch, batch_idx)
        finally:
            self._set_phase('weight')

    def before_architecture_update(self) -> None:
        prepare_arch_update(self._edges())

    def after_architecture_update(self) -> None:
        finish_arch_update(self._edges())

    def weight_step(self, trn_batch: Any, batch_idx: int) -> Any:
        # Unsampled paths must keep grad=None so that momentum and weight decay skip them; the arch step's backward
        # left gradients on the weights, clear them whatever the evaluator's zero_grad does.
        for param in self.weight_parameters():
            param.grad = None
        return super().weight_step(trn_batch, batch_idx)


@register_strategy
class ProxylessNAS(DartsVariant):
    """ProxylessNAS: binarized path weights, one path per weight step, two (or one + recomputation) per arch step.

    `Cai, Zhu, Han. ProxylessNAS: Direct Neural Architecture Search on Target Task and Hardware. ICLR 2019
    <https://arxiv.org/abs/1812.00332>`__; defaults from the official ``mit-han-lab/proxylessnas`` search code.

    Weight step: one path per edge sampled from ``softmax(alpha)``; only it runs, and only its weights receive
    gradients (the others keep ``grad=None``). Arch step (``grad_binary_mode='two'``, the paper's scheme): two distinct
    paths sampled without replacement, ``p' = softmax(alpha[sampled])``, the active one drawn from ``p'``; the edge
    returns ``g_a o_a(x) + g_i o_i(x).detach()`` with one-hot gates whose gradient reaches the two alphas through
    ``p'``; after the Adam step the two alphas are shifted so that their ``sum(exp)`` is the one before the step,
    which leaves the probability of every unsampled path unchanged. ``'full_v2'`` (the official script's default)
    runs only the active path forward and, in backward, every other candidate under ``no_grad`` to get
    ``dL/dg_k = sum(o_k * grad_out)``; the alpha gradient then spans all N paths (no rescaling). An edge whose
    active path is zero (``none``/``zero``) gets no alpha update that step. All cells of a type share one sample.

    Export: argmax of alpha (the DARTS rule inside our cells), never a sample (NNI's built-in ``Proxyless`` samples).

    On an NNI ``Cell`` each node also samples ``num_ops_per_node`` of its incoming edges from its own alpha, with the
    binary-gate gradient (:class:`ProxylessInput`); only the sampled edges run in the weight step. The export takes
    each node's strongest inputs by that alpha, each with its edge's argmax operation (never ``none``).

    Hardware cost: ``cost={metric: latency, target_ms: ..., form: mul#log}`` (or FLOPs) adds the official
    ``mul#log`` / ``add#linear`` loss on the expected cost (:mod:`nni_darts_variants.cost`); NNI's
    ``ExpectationProfilerPenalty`` also works as ``penalty``. Both see :meth:`ProxylessEdge.cost_probs`, the official
    ``current_prob_over_ops`` (two-path: the pair's softmax at its indices; ``full_v2``: ``softmax(alpha)``), as
    tensors, so the cost gradient adds to the gate gradient; an edge whose active path is zero drops both.

    Loop as the official ``nas_manager.train``: each batch runs the weight step first, then (every
    ``arch_update_every`` batches) the arch step; the weight gradient is not clipped (``gradient_clip_val=None``).
    Remaining difference: the official arch step draws its own batch from the validation loader, here it is the
    ``val`` half of NNI's paired batch.

    Parameters
    ----------
    grad_binary_mode
        ``'two'`` (default) or ``'full_v2'``.
    arch_update_every
        One arch step every this many weight steps (official: 5); it runs after the weight step of batches
        ``every-1, 2*every-1, ...``.
    arc_learning_rate, arc_betas, arc_weight_decay
        Adam for alpha; official: 1e-3, (0, 0.999), 0. ``beta1 = 0`` keeps unsampled alphas still.
    gradient_clip_val
        Weight gradient norm clip (official: none).
    **kwargs
        See :class:`~nni_darts_variants.strategies.base.DartsVariant`. ``warmup_epochs`` stays 0 by default (the
        official ImageNet schedule warms up 40 of 160 epochs, which does not transfer to the 50-epoch DARTS search).
    """

    edge_class: ClassVar[type[MixedEdge]] = ProxylessEdge
    input_class = ProxylessInput
    cell_node_class = ProxylessInput
    mixed_op_policy = None
    darts_fallback_for = ('repeat depth',)
    module_class = ProxylessLightning

    def __init__(self, *, grad_binary_mode: str = 'two', arch_update_every: int = 5, arc_learning_rate: float = 1e-3,
                 arc_betas: Sequence[float] = (0.0, 0.999), arc_weight_decay: float = 0.0,
                 gradient_clip_val: float | None = None, **kwargs: Any):
        if grad_binary_mode not in GRAD_BINARY_MODES:
            raise ValueError(f'grad_binary_mode must be one of {GRAD_BINARY_MODES}, got {grad_binary_mode!r}')
        if not isinstance(arch_update_every, int) or arch_update_every < 1:
            raise ValueError(f'arch_update_every must be a positive integer, got {arch_update_every!r}')
        super().__init__(arc_learning_rate=arc_learning_rate, arc_betas=arc_betas, arc_weight_decay=arc_weight_decay,
                         gradient_clip_val=gradient_clip_val, **kwargs)
        self.grad_binary_mode = grad_binary_mode
        self.arch_update_every = arch_update_every
        if grad_binary_mode == 'two' and (self.arc_betas[0] != 0 or arc_weight_decay != 0):
            _logger.warning('ProxylessNAS two-path mode with Adam beta1=%s, weight decay=%s: unsampled alphas will '
                            'drift (the official setting is beta1=0, no weight decay)', self.arc_betas[0],
                            arc_weight_decay)

    @classmethod
    def smoke_kwargs(cls) -> dict[str, Any]:
        """A one-epoch smoke search where alphas move: an arch step every batch, no warm-up."""
        return {'warmup_epochs': 0, 'arch_update_every': 1}

    @classmethod
    def full_step_kwargs(cls) -> dict[str, Any]:
        return {'arch_update_every': 1}

    def mutate_kwargs(self) -> dict[str, Any]:
        return {'grad_binary_mode': self.grad_binary_mode}
