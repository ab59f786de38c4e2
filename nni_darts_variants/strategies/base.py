"""The shared base of every strategy in this package: supermodules, search loop and strategy.

A variant is one file that subclasses some of the three classes here and overrides only the hooks where its
algorithm differs. The lifecycle is documented once, on :class:`DartsVariant`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, ClassVar, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.mutable import Categorical, CategoricalMultiple
# NNI's public strategy package must be imported before its one-shot internals, or its own import of them fails
# half-way (a circular import) and ``nni.nas.strategy.DARTS`` becomes a placeholder.
from nni.nas.strategy import DARTS  # isort: skip
from nni.nas.nn.pytorch import InputChoice, LayerChoice
from nni.nas.oneshot.pytorch.differentiable import DartsLightningModule
from nni.nas.oneshot.pytorch.strategy import no_default_hook
from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule
from nni.nas.oneshot.pytorch.supermodule.differentiable import (DifferentiableMixedInput, DifferentiableMixedRepeat,
                                                                MixedOpDifferentiablePolicy)
from nni.nas.oneshot.pytorch.supermodule.operation import NATIVE_MIXED_OPERATIONS

from search_spaces.cell import DartsCell, edge_label, input_label
from search_spaces.ops import nchw_on_cpu, outputs_sharing_relu
from ..cost.penalty import HardwareCost, cost_from_config
from ..genotype import CELL_TYPES, Genotype, darts_rule
from .nni_spaces import (FALLBACKS_KEY, MixedCell, dangling, is_cell_node, mark_cell_nodes, note_fallback,
                         strongest_operation, suppress_supernet_modules)

__all__ = ['MixedEdge', 'MixedNode', 'MixedInput', 'VariantLightningModule', 'DartsVariant', 'loss_of',
           'first_per_label', 'keep_zero_gradients', 'check_weight_grad_reset', 'WEIGHT_GRAD_RESETS']

_logger = logging.getLogger(__name__)


def loss_of(step_output: Any) -> torch.Tensor:
    """The loss in what a Lightning ``training_step`` returned (a tensor or a dict with ``'loss'``)."""
    return step_output['loss'] if isinstance(step_output, dict) else step_output


def first_per_label(modules: Iterable[nn.Module], kind: type | tuple[type, ...]) -> dict[str, Any]:
    """``{label: module}``: the first module of type ``kind`` per label, in ``modules`` order (modules with one
    label share their choice and parameters, so one stands for all)."""
    result: dict[str, Any] = {}
    for module in modules:
        if isinstance(module, kind):
            result.setdefault(module.label, module)
    return result


#: How the weight gradients are reset between steps: ``'zeros'`` as ``zero_grad()`` of PyTorch 1.x (the official
#: code of the sampling variants), ``'none'`` as PyTorch 2 and Lightning.
WEIGHT_GRAD_RESETS = ('zeros', 'none')


def check_weight_grad_reset(value: str) -> str:
    if value not in WEIGHT_GRAD_RESETS:
        raise ValueError(f'weight_grad_reset must be one of {WEIGHT_GRAD_RESETS}, got {value!r}')
    return value


def keep_zero_gradients(optimizer: torch.optim.Optimizer, parameters: Sequence[nn.Parameter]) -> Any:
    """Make ``optimizer`` see PyTorch 1.x's ``zero_grad()``: a parameter that once had a gradient has a zero one,
    not ``None``, at every later step, so momentum and weight decay keep acting on it when it is not used.

    Installed as a step pre-hook (Lightning's ``zero_grad`` sets ``None``); returns the hook handle. A parameter
    with optimizer state (a momentum buffer) counts as having had a gradient, so a resumed search goes on as the
    uninterrupted one.
    """
    seen: set[int] = set()
    parameters = list(parameters)

    def fill_zeros(opt: Any, args: Any, kwargs: Any) -> None:
        for p in parameters:
            if p.grad is not None:
                seen.add(id(p))
            elif id(p) in seen or opt.state.get(p):  # optimizer state: it had a gradient before a resume
                seen.add(id(p))
                p.grad = torch.zeros_like(p)

    return optimizer.register_step_pre_hook(fill_zeros)


def example_input(batch: Any) -> torch.Tensor:
    """The input tensor of a batch (the first tensor of ``(x, y)``, or of the ``'train'`` entry of a dict)."""
    while not isinstance(batch, torch.Tensor):
        if isinstance(batch, dict):
            batch = batch['train'] if 'train' in batch else next(iter(batch.values()))
        elif isinstance(batch, (list, tuple)) and batch:
            batch = batch[0]
        else:
            raise TypeError(f'no input tensor found in the batch ({type(batch).__name__})')
    return batch


# ---------------------------------------------------------------------------------------------------------------------
# Supermodules
# ---------------------------------------------------------------------------------------------------------------------

class MixedEdge(LayerChoice, BaseSuperNetModule):
    """DARTS's mixed operation: ``sum_o softmax(alpha)_o * o(x)`` over every candidate of a ``LayerChoice``.

    It replaces each NNI ``LayerChoice`` (every edge of a :class:`~search_spaces.cell.DartsCell`, and choices
    outside cells too). It stays a ``LayerChoice``, so ``freeze(sample)`` on the supernet keeps working. All modules
    with the same label share one ``alpha`` (NNI's memo), hence all cells of a type share their parameters.

    Hooks for variants: :meth:`op_weights` (weights used by :meth:`forward`), :meth:`ranking_weights` (weights the
    discretization ranks by), :meth:`cost_probs` (the tensor probabilities of the expected hardware cost),
    :meth:`forward`, :meth:`resample`, :meth:`export`, :meth:`from_layer_choice` (extra
    configuration from the strategy's ``mutate_kwargs``).
    """

    _arch_parameter_names: ClassVar[list[str]] = ['_arch_alpha']

    def __init__(self, candidates: dict[str, nn.Module], alpha: nn.Parameter, label: str, **config: Any):
        super().__init__(candidates, label=label)
        if len(alpha) != len(self.names):
            raise ValueError(f'{label}: alpha has {len(alpha)} entries for {len(self.names)} candidates')
        self._arch_alpha = alpha
        self.config = config
        #: Candidates whose output is zero (``Zero``): :meth:`forward` leaves them out of the sum (same sum, and the
        #: same alpha gradient: their softmax weight multiplies zero, their alpha still normalizes the others).
        self.zero_names = {name for name in self.names if getattr(self[name], 'is_zero', False)}

    #: One ``relu(x)`` for the candidates that start with a ReLU (:func:`~search_spaces.ops.outputs_sharing_relu`).
    share_relu: ClassVar[bool] = True

    #: On CPU, an NCHW edge input is run through the candidates in channels-last and the edge's output given back in
    #: NCHW (one copy in, one out, per edge): oneDNN's NHWC depthwise, pointwise and pooling kernels, forward and
    #: backward, are several times faster than its NCHW ones on the CPUs measured (README "Speed"). The same
    #: arithmetic in another summation order: equal within float rounding (``tests/test_speed.py``). An NHWC input
    #: (``train.channels_last``), another device, tracing and compilation run as they are. On by default (our DARTS
    #: step 0.60 of NNI's with it, 0.85 without, README "Speed"); PC-DARTS's edges set it off.
    channels_last_inside: ClassVar[bool] = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (self.channels_last_inside and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
                and nchw_on_cpu(args[0])):
            out = super().__call__(args[0].contiguous(memory_format=torch.channels_last))
            return out.contiguous() if isinstance(out, torch.Tensor) else out
        return super().__call__(*args, **kwargs)

    @property
    def alpha(self) -> nn.Parameter:
        return self._arch_alpha

    def op_weights(self) -> torch.Tensor:
        """Weights of the candidates in the forward pass (softmax of alpha)."""
        return F.softmax(self._arch_alpha, dim=-1)

    def ranking_weights(self) -> torch.Tensor:
        """Weights the discretization ranks by (softmax of alpha, ``none`` in the denominator)."""
        return F.softmax(self._arch_alpha.detach(), dim=-1)

    def cost_probs(self) -> torch.Tensor:
        """Probabilities of the candidates in the expected hardware cost, with gradient to alpha.

        Default: the forward weights (:meth:`op_weights`): DARTS's softmax, GDAS's straight-through one-hot,
        DropNAS's softmax over the kept ops, PARSEC's prior. ``export_probs`` stays the float version for logging.
        """
        return self.op_weights()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights = self.op_weights()
        terms = [(w, name) for w, name in zip(weights, self.names) if name not in self.zero_names]
        terms = terms or list(zip(weights, self.names))
        if self.share_relu and len(args) == 1 and not kwargs:
            outputs = outputs_sharing_relu([self[name] for _, name in terms], args[0])
        else:
            outputs = [self[name](*args, **kwargs) for _, name in terms]
        return sum(w * out for (w, _), out in zip(terms, outputs))

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        """Nothing to sample in DARTS."""
        return {}

    def export(self, memo: dict[str, Any]) -> dict[str, Any]:
        """The strongest candidate (used for choices outside DARTS cells; cells are discretized by the strategy)."""
        if self.label in memo:
            return {}
        return {self.label: self.names[int(torch.argmax(self.ranking_weights()))]}

    def export_probs(self, memo: dict[str, Any]) -> dict[str, Any]:
        if self.label in memo:
            return {}
        return {self.label: dict(zip(self.names, self.op_weights().detach().cpu().tolist()))}

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        yield self._arch_alpha

    @classmethod
    def from_layer_choice(cls, module: LayerChoice, alpha: nn.Parameter, mutate_kwargs: dict[str, Any]) -> 'MixedEdge':
        """Build the supermodule; variants that need configuration read it from ``mutate_kwargs``."""
        return cls(module.candidates, alpha, module.label)

    @classmethod
    def mutate(cls, module: nn.Module, name: str, memo: dict[str, Any], mutate_kwargs: dict[str, Any]) -> Any:
        if type(module) is LayerChoice:
            if module.label not in memo:
                raise KeyError(f'LayerChoice {module.label} has no architecture parameter in the memo')
            return cls.from_layer_choice(module, memo[module.label], mutate_kwargs)
        return None


class MixedNode(InputChoice, BaseSuperNetModule):
    """An intermediate node of a DARTS cell in the supernet: the plain sum of all its incoming mixed edges.

    It replaces each ``InputChoice`` of a :class:`~search_spaces.cell.DartsCell`. DARTS has no parameter here;
    the node's two inputs are chosen by the strategy's discretization. Variants with per-edge node weights (PC-DARTS's
    edge normalization) override :meth:`input_weights` and :meth:`arch_parameters`; the NNI memo holds an alpha of
    length ``n_candidates`` for the label, ready to be used as such weights.
    """

    def __init__(self, n_candidates: int, n_chosen: int, label: str, alpha: nn.Parameter | None = None,
                 **config: Any):
        super().__init__(n_candidates, n_chosen, reduction='sum', label=label)
        self._memo_alpha = alpha
        self.config = config
        if alpha is not None and all(p is not alpha for p in self.arch_parameters()):
            # NNI's alpha for a choice this node does not weight by (a plain sum) is no parameter of the node: it
            # stays out of the weight optimizer and the second-order virtual step (which would decay it)
            del self._parameters['_memo_alpha']
            object.__setattr__(self, '_memo_alpha', alpha)

    def input_weights(self) -> torch.Tensor | None:
        """Weights of the incoming edges in the forward pass; ``None`` for a plain sum."""
        return None

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        weights = self.input_weights()
        if weights is None:
            return sum(inputs)
        return sum(w * x for w, x in zip(weights, inputs))

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        return {}

    def export(self, memo: dict[str, Any]) -> dict[str, Any]:
        """Inputs are chosen when the strategy discretizes the whole cell; see ``VariantLightningModule.export``."""
        return {}

    def export_probs(self, memo: dict[str, Any]) -> dict[str, Any]:
        weights = self.input_weights()
        if weights is None or self.label in memo:
            return {}
        return {self.label: dict(enumerate(weights.detach().cpu().tolist()))}

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    @classmethod
    def from_input_choice(cls, module: InputChoice, alpha: nn.Parameter | None,
                          mutate_kwargs: dict[str, Any]) -> 'MixedNode':
        return cls(module.n_candidates, module.n_chosen, module.label, alpha)

    @classmethod
    def mutate(cls, module: nn.Module, name: str, memo: dict[str, Any], mutate_kwargs: dict[str, Any]) -> Any:
        if type(module) is InputChoice and is_cell_node(module):
            if module.reduction != 'sum':
                raise TypeError(f'InputChoice {module.label}: only reduction="sum" is supported, got '
                                f'{module.reduction!r}')
            return cls.from_input_choice(module, memo.get(module.label), mutate_kwargs)
        return None


class MixedInput(DifferentiableMixedInput):
    """DARTS on a free ``InputChoice`` (one outside a cell): ``sum_j softmax(alpha)_j * x_j``, top ``n_chosen`` kept.

    NNI's ``DifferentiableMixedInput`` (``reduction`` ``'sum'`` or ``'mean'``; ``n_chosen=None`` is read as 1). Unlike
    a cell node, whose incoming edges are mixed operations summed as they are, a free input choice is a real choice,
    so its inputs are weighted. Variants with their own input maths subclass it (GDAS, ProxylessNAS, PARSEC).
    """

    @classmethod
    def from_input_choice(cls, module: InputChoice, alpha: nn.Parameter,
                          mutate_kwargs: dict[str, Any]) -> 'MixedInput':
        return cls(module.n_candidates, module.n_chosen, alpha, mutate_kwargs.get('softmax', nn.Softmax(-1)),
                   module.label)

    @classmethod
    def mutate(cls, module: nn.Module, name: str, memo: dict[str, Any], mutate_kwargs: dict[str, Any]) -> Any:
        if type(module) is InputChoice and not is_cell_node(module):
            if module.reduction not in ('sum', 'mean'):
                raise TypeError(f'InputChoice {module.label}: reduction={module.reduction!r} cannot be relaxed; use '
                                'reduction="sum" or "mean"')
            if module.label not in memo:
                raise KeyError(f'InputChoice {module.label} has no architecture parameter in the memo')
            return cls.from_input_choice(module, memo[module.label], mutate_kwargs)
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Search loop
# ---------------------------------------------------------------------------------------------------------------------

class VariantLightningModule(DartsLightningModule):
    """The search loop shared by all variants (one Lightning ``training_step`` per pair of batches).

    See :class:`DartsVariant` for the lifecycle. ``strategy`` is the strategy object that configured this module;
    hooks read their hyper-parameters from it.
    """

    #: Skip the gradients nobody reads (exact, tested in ``tests/test_speed.py``): the architecture step builds its
    #: graph with the weights frozen and back-propagates to the architecture parameters only (the weight step zeroes
    #: the weight gradients before its own backward), and the weight step's forward runs with them frozen (the next architecture step zeroes their
    #: gradients). Off under several processes, where DDP's reducer expects a gradient for every parameter it saw.
    skip_unread_gradients: ClassVar[bool] = True

    def __init__(self, training_module: Any, strategy: 'DartsVariant'):
        hardware_cost = isinstance(strategy.penalty, HardwareCost)  # NNI's module accepts its own penalty only
        super().__init__(training_module, arc_learning_rate=strategy.arc_learning_rate,
                         gradient_clip_val=strategy.gradient_clip_val,
                         log_prob_every_n_step=strategy.log_prob_every_n_step,
                         warmup_epochs=strategy.warmup_epochs, penalty=None if hardware_cost else strategy.penalty)
        self.strategy = strategy
        if hardware_cost:
            self.penalty = strategy.penalty

    #: Order of the two steps of one batch: ``('arch', 'weight')`` (DARTS: the alphas see the weights before their
    #: step) or ``('weight', 'arch')`` (GDAS). A one-level variant may drop ``'arch'`` or override
    #: :meth:`architecture_step`.
    step_order: ClassVar[tuple[str, ...]] = ('arch', 'weight')

    # ----- the step -----
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        """One batch: the steps of :attr:`step_order` (the arch step only if :meth:`arch_update_enabled`), then
        :meth:`finish_step`. Returns what the weight step returned."""
        trn_batch, val_batch = batch['train'], batch['val']
        output = None
        for step in self.step_order:
            if step == 'weight':
                output = self.weight_step(trn_batch, batch_idx)
            elif step == 'arch':
                if self.arch_update_enabled(batch_idx):
                    self.architecture_step(trn_batch, val_batch, batch_idx)
            else:
                raise ValueError(f'{type(self).__name__}.step_order has an unknown step {step!r}; use "arch" and '
                                 '"weight"')
        self.finish_step(batch_idx)
        return output

    def finish_step(self, batch_idx: int) -> None:
        """The tail of every batch: the evaluator's LR schedulers, and the probabilities every n steps."""
        self.advance_lr_schedulers(batch_idx)
        if batch_idx % self.log_prob_every_n_step == 0:
            self.log_probs(self.export_probs())

    def arch_update_enabled(self, batch_idx: int) -> bool:
        """Whether this batch has an architecture step (not during warm-up)."""
        return self.trainer.current_epoch >= self.warmup_epochs

    def task_loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The evaluator's training loss on ``batch`` (no penalty)."""
        return loss_of(self.training_module.training_step(batch, 2 * batch_idx))

    def architecture_loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Loss of the architecture step: :meth:`task_loss` with the penalty of :meth:`penalized_loss`."""
        return self.penalized_loss(self.task_loss(batch, batch_idx), batch)

    def penalized_loss(self, loss: torch.Tensor, batch: Any) -> torch.Tensor:
        """``loss`` with the strategy's hardware cost or NNI penalty on :meth:`cost_probs` (tensors, so that the
        expected cost sends gradient to the architecture parameters). ``batch`` gives the input shape the cost table
        is built at, on first use."""
        if self.penalty is None:
            return loss
        if isinstance(self.penalty, HardwareCost) and not self.penalty.ready:
            self.penalty.prepare(self.strategy.cost_space(), example_input(batch))
        loss, details = self.penalty(loss, self.cost_probs())
        self.log_dict({f'penalty/{k}': torch.as_tensor(v).detach().float() for k, v in details.items()})
        return loss

    def one_level_loss(self, loss: torch.Tensor, batch: Any, arch: bool) -> torch.Tensor:
        """The loss of a one-level step (one backward for weights and alphas): with a hardware cost or penalty and
        ``arch``, ``loss + penalized(loss') - loss'`` where ``loss'`` is ``loss`` detached, so the cost reaches the
        alphas and leaves the weight gradient as it is (``mul#log`` would otherwise rescale it)."""
        if not arch or self.penalty is None:
            return loss
        constant = loss.detach()
        return loss + self.penalized_loss(constant, batch) - constant

    def cost_probs(self) -> dict[str, dict[Any, torch.Tensor]]:
        """``{label: {candidate: probability}}`` with 0-d tensors carrying gradient: each mixed edge's
        :meth:`MixedEdge.cost_probs`, the softmax of NNI's mixed ``Repeat`` depths, and any supermodule's own
        ``cost_probs(memo)``. The input to NNI's ``ExpectationProfilerPenalty`` (whose ``export_probs`` are floats)."""
        probs: dict[str, dict[Any, torch.Tensor]] = {}
        for module in self.supernet_modules():
            if isinstance(module, MixedEdge):
                if module.label not in probs:
                    probs[module.label] = dict(zip(module.names, module.cost_probs()))
            elif isinstance(module, DifferentiableMixedRepeat):
                # NNI 3.0 keeps the depth logits in the private ``_arch_alpha`` (a ParameterDict) and ``_softmax``.
                for label, spec in module.depth_choice.simplify().items():
                    if label not in probs:
                        probs[label] = dict(zip(spec.values, module._softmax(module._arch_alpha[label])))
            elif hasattr(module, 'cost_probs'):
                probs.update(module.cost_probs(memo=probs))
        return probs

    def compute_arch_gradients(self, trn_batch: Any, val_batch: Any, batch_idx: int) -> torch.Tensor:
        """Fill ``.grad`` of the architecture parameters; first order: the gradient of the validation loss."""
        with self.frozen_weights():
            loss = self.architecture_loss(val_batch, batch_idx)
            self.manual_backward(loss, **self.arch_backward_inputs())
        return loss

    def skips_unread_gradients(self) -> bool:
        """Whether this step skips unread gradients (``skip_unread_gradients``, on one process)."""
        if not self.skip_unread_gradients:
            return False
        try:
            return self.trainer.world_size == 1
        except RuntimeError:  # not attached to a trainer: a step called directly, on one process
            return True

    def arch_backward_inputs(self) -> dict[str, Any]:
        """``backward`` keyword arguments of the architecture step: ``inputs`` = the architecture parameters."""
        params = [p for p in self.arch_parameters() if p.requires_grad]
        return {'inputs': params} if params and self.skips_unread_gradients() else {}

    @contextlib.contextmanager
    def frozen_architecture(self) -> Iterator[None]:
        """Build the graph inside without the architecture parameters (when skipping unread gradients)."""
        params = [p for p in self.arch_parameters() if p.requires_grad] if self.skips_unread_gradients() else []
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """Build the graph inside without the network weights (when skipping unread gradients): the architecture
        step's backward then computes no weight gradient at all (``inputs=`` alone still lets each layer's backward
        see that its weight requires one), and the layers save nothing for it."""
        if not self.skips_unread_gradients():
            yield
            return
        arch = {id(p) for p in self.arch_parameters()}
        params = [p for p in self.training_module.parameters() if id(p) not in arch and p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def architecture_step(self, trn_batch: Any, val_batch: Any, batch_idx: int) -> None:
        """Resample, compute the architecture gradients, clip them if configured, step the architecture optimizer."""
        arc_optim = self.architecture_optimizers()
        self.resample()
        arc_optim.zero_grad()
        loss = self.compute_arch_gradients(trn_batch, val_batch, batch_idx)
        if self.strategy.arc_gradient_clip_val:  # the gradients are still multiplied by the loss scale here
            nn.utils.clip_grad_norm_(self.arch_parameters(), self.strategy.arc_gradient_clip_val * self.loss_scale())
        self.before_architecture_update()
        arc_optim.step()
        self.after_architecture_update()
        self.log('arch_loss', loss.detach())

    def loss_scaler(self) -> torch.amp.GradScaler | None:
        """The trainer's fp16 loss scaler (``None`` without one): ``manual_backward`` multiplies the loss by its
        scale and the optimizer step divides the gradients by it, so gradients set by hand must carry it too."""
        try:
            scaler = getattr(self.trainer.precision_plugin, 'scaler', None)  # Lightning 2.x MixedPrecision
        except RuntimeError:  # not attached to a trainer
            return None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def loss_scale(self) -> float:
        """The current scale of :meth:`loss_scaler` (1 without one)."""
        scaler = self.loss_scaler()
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale, for gradients taken by hand (``autograd.grad``)."""
        scaler = self.loss_scaler()
        return scaler.scale(loss) if scaler is not None else loss

    def before_architecture_update(self) -> None:
        """Called after the architecture gradients are ready, before the optimizer step."""

    def after_architecture_update(self) -> None:
        """Called right after the architecture optimizer step (e.g. ProxylessNAS rescales alphas here)."""

    def weight_step(self, trn_batch: Any, batch_idx: int) -> Any:
        """One step of the evaluator's optimizer: zero-grad, :meth:`weight_backward`, clip at
        ``gradient_clip_val``, step. Returns what :meth:`weight_backward` returned."""
        return self.optimize_weights(lambda: self.weight_backward(trn_batch, batch_idx), batch_idx,
                                     self.gradient_clip_val)

    def weight_backward(self, trn_batch: Any, batch_idx: int) -> Any:
        """Fill the weight gradients: resample, the evaluator's ``training_step`` on the batch, backward.

        Returns the evaluator's step output (logged by Lightning as the batch's loss).
        """
        self.resample()
        with self.frozen_architecture():
            output = self.training_module.training_step(trn_batch, 2 * batch_idx + 1)
        self.manual_backward(loss_of(output))
        return output

    def optimize_weights(self, backward: Callable[[], Any], batch_idx: int, gradient_clip_val: float | None = None,
                         gradient_clip_algorithm: str | None = None) -> Any:
        """zero-grad -> ``backward()`` -> clip -> step of the evaluator's optimizer, through the evaluator's own
        Lightning hooks (as NNI's ``advance_optimization`` for Lightning 2); returns what ``backward()`` returned."""
        if not self.training_module.automatic_optimization:
            raise ValueError('the evaluator uses manual optimization, which one-shot strategies cannot drive; '
                             'use an evaluator with automatic optimization')
        optimizer = self.lightning_weight_optimizer()
        epoch = self.trainer.current_epoch
        self.training_module.optimizer_zero_grad(epoch, batch_idx, optimizer)
        result = backward()
        self.training_module.configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.training_module.optimizer_step(epoch, batch_idx, optimizer)
        return result

    def advance_optimization(self, loss: Any, batch_idx: int, gradient_clip_val: float | None = None,
                             gradient_clip_algorithm: str | None = None) -> None:
        """NNI's hook for one weight step on ``loss``: :meth:`optimize_weights` with ``loss``'s backward."""
        self.optimize_weights(lambda: self.manual_backward(loss), batch_idx, gradient_clip_val,
                              gradient_clip_algorithm)

    # ----- parameters and optimizers -----
    def weight_parameters(self) -> list[nn.Parameter]:
        """Parameters of the evaluator's (weight) optimizer."""
        arch = set(self.arch_parameters())
        return [p for p in self.training_module.parameters() if p not in arch]

    def lightning_weight_optimizer(self) -> Any:
        """The evaluator's optimizer as Lightning wraps it (stepping it counts the global step)."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        weight_opts = [o for o in optimizers if not getattr(o, 'is_arch_optimizer', False)]
        if len(weight_opts) != 1:
            raise ValueError(f'the evaluator configures {len(weight_opts)} optimizers; one-shot search needs exactly '
                             'one weight optimizer')
        return weight_opts[0]

    def weight_optimizer(self) -> torch.optim.Optimizer:
        """The evaluator's optimizer (the unwrapped ``torch.optim.Optimizer``)."""
        return self.lightning_weight_optimizer().optimizer

    def arch_parameters(self) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for module in self.supernet_modules():
            if hasattr(module, 'arch_parameters'):
                params.extend(p for p in module.arch_parameters() if all(p is not q for q in params))
        return params

    def configure_architecture_optimizers(self) -> torch.optim.Optimizer:
        params = self.arch_parameters()
        if not params:
            raise ValueError('no architecture parameters found: the model space has no LayerChoice or DartsCell to '
                             'search')
        s = self.strategy
        return torch.optim.Adam(params, lr=s.arc_learning_rate, betas=tuple(s.arc_betas),
                                weight_decay=s.arc_weight_decay)

    # ----- schedule -----
    def on_train_epoch_start(self) -> None:
        self.schedule(self.trainer.current_epoch, self.trainer.max_epochs)
        return super().on_train_epoch_start()

    def schedule(self, epoch: int, max_epochs: int | None) -> None:
        """Per-epoch schedule hook (temperatures, dropout rates, stages). Warm-up is handled by the base."""

    # ----- discretization -----
    def darts_cells(self) -> dict[str, DartsCell | MixedCell]:
        """One cell per type (cells of a type share their choices): our DARTS cells and NNI cells."""
        return first_per_label(self.training_module.modules(), (DartsCell, MixedCell))

    def cell_edges(self) -> Iterator[tuple[int, int, MixedEdge]]:
        """``(node, j, edge)`` for every edge of one cell per type (see :meth:`DartsCell.iter_edges`)."""
        for cell in self.darts_cells().values():
            yield from cell.iter_edges()

    def edge_weights(self, cell: DartsCell) -> dict[tuple[int, int], dict[str, float]]:
        """``{(node, j): {op: weight}}``: the weights the discretization ranks by (per edge ``ranking_weights``)."""
        return {(node, j): dict(zip(map(str, edge.names), edge.ranking_weights().cpu().tolist()))
                for node, j, edge in cell.iter_edges()}

    def discretize(self, weights: dict[tuple[int, int], dict[str, float]],
                   cell: DartsCell | MixedCell | None = None) -> dict[int, list[tuple[str, int]]]:
        """Genotype rule: ``{node: [(op, j), ...]}`` from the edge weights of ``cell`` (default: the DARTS rule,
        two inputs per node, or an NNI cell's ``num_ops_per_node``)."""
        return darts_rule(weights, per_node=getattr(cell, 'num_ops_per_node', 2))

    def export_cell(self, cell: DartsCell | MixedCell) -> dict[str, Any]:
        """NNI sample entries of one cell type: the chosen inputs per node and an operation for every edge
        (a :class:`~.nni_spaces.MixedCell` writes NNI's own ``op_{i}_{k}`` / ``input_{i}_{k}`` labels)."""
        weights = self.edge_weights(cell)
        if isinstance(cell, MixedCell):  # nodes that sample their inputs choose them; else the discretization
            nodes = cell.node_discretization(weights)
            return cell.sample(nodes if nodes is not None else self.discretize(weights, cell))
        nodes = self.discretize(weights, cell)
        sample: dict[str, Any] = {}
        for node, pairs in nodes.items():
            sample[input_label(cell.label, node)] = sorted(j for _, j in pairs)
            chosen = {j: op for op, j in pairs}
            for (target, j), ops in weights.items():
                if target == node:
                    best = chosen.get(j) or strongest_operation(ops)
                    sample[edge_label(cell.label, node, j)] = best
        return sample

    def export(self) -> dict[str, Any]:
        """The architecture: every DARTS cell discretized by :meth:`discretize`, other choices by their modules."""
        sample: dict[str, Any] = {}
        for cell in self.darts_cells().values():
            sample.update(self.export_cell(cell))
        for module in self.free_supernet_modules():
            sample.update(module.export(memo=sample))
        return sample

    def free_supernet_modules(self) -> Iterator[BaseSuperNetModule]:
        """Supermodules that export themselves (not the edges and nodes inside an NNI cell's supernet)."""
        owned = {id(m) for cell in self.training_module.modules() if isinstance(cell, MixedCell)
                 for m in cell.modules() if m is not cell}
        return (m for m in self.supernet_modules() if id(m) not in owned)

    def export_genotype(self) -> Genotype | None:
        """The exported architecture as a :class:`~nni_darts_variants.genotype.Genotype` (``None`` without cells)."""
        cells = {label: c for label, c in self.darts_cells().items() if isinstance(c, DartsCell)}
        if set(cells) != set(CELL_TYPES):
            return None
        return Genotype.from_sample(self.export(), num_nodes=cells['normal'].num_nodes)


# ---------------------------------------------------------------------------------------------------------------------
# Strategy
# ---------------------------------------------------------------------------------------------------------------------

class DartsVariant(DARTS):
    """Base of every strategy in this package: an NNI ``DARTS`` strategy with the places where variants differ.

    Lifecycle (each hook may be overridden by a variant; the rest is inherited). A variant overrides only these
    hooks; nothing else is looked up by ``getattr``:

    0. Before anything is built: ``check_trainer(max_epochs, **args)`` (class method; uses
       ``trainer_max_epochs(**args)``) rejects a trainer that cannot run the strategy, when the config resolves.
       ``smoke_kwargs()`` gives the arguments of a seconds-long smoke search (tests, conformance suite),
       ``full_step_kwargs()`` those with which every batch has both steps (the benchmark), and
       ``schedule_epochs(max_epochs)`` the epochs one run of the weight LR schedule spans. **Hooks: class-level
       settings.**
    1. ``NasExperiment.run()`` calls :meth:`mutate_model`: NNI creates one alpha ``randn * 1e-3`` per choice label,
       then runs :meth:`default_mutation_hooks` top-down over the model space. ``edge_class.mutate`` replaces every
       ``LayerChoice`` with the variant's :class:`MixedEdge` and ``node_class.mutate`` every ``InputChoice`` with its
       :class:`MixedNode`; each receives ``mutate_kwargs()`` (the variant's configuration). An NNI ``Cell`` becomes a
       :class:`~.nni_spaces.MixedCell` of the same edges and of ``cell_node_class`` nodes (default ``node_class``),
       a free ``InputChoice`` an ``input_class``, mutable modules NNI's mixed operations with ``mixed_op_policy``
       (``None``: refused); constructs listed in ``darts_fallback_for`` are logged once as plain-DARTS fallbacks.
       **Hook: the mixed-edge forward** (``edge_class``, ``node_class``, ``cell_node_class``, ``input_class``,
       ``mutate_kwargs``).
    2. :meth:`configure_oneshot_module` wraps the evaluator's Lightning module in ``module_class``
       (:class:`VariantLightningModule`). Its ``configure_architecture_optimizers`` builds the architecture optimizer
       (Adam with ``arc_learning_rate``, ``arc_betas``, ``arc_weight_decay``); NNI removes the alphas from the
       evaluator's weight optimizer. **Hook: the architecture optimizer.**
    3. At each epoch start, ``schedule(epoch, max_epochs)`` runs (warm-up needs nothing: see step 4).
       **Hook: the per-epoch schedule** (temperatures, dropout, stages).
    4. For every pair of batches ``{'train', 'val'}`` (the DARTS 50/50 split), ``training_step`` runs the steps of
       ``step_order`` (default ``('arch', 'weight')``), then ``finish_step(batch_idx)`` (the evaluator's LR
       schedulers, the logged probabilities):

       * ``architecture_step`` (skipped unless ``arch_update_enabled(batch_idx)``, i.e. during warm-up):
         ``resample()``, ``compute_arch_gradients``, optional clipping, ``before_architecture_update``, optimizer
         step, ``after_architecture_update``;
       * ``weight_step``: ``optimize_weights`` runs the evaluator's zero-grad, ``weight_backward`` (default:
         ``resample()``, the evaluator's loss on the training batch, backward), clipping at ``gradient_clip_val``
         and the evaluator's optimizer step.

       **Hooks: the architecture and weight updates** (``step_order``, ``arch_update_enabled``,
       ``compute_arch_gradients``, ``architecture_step``, ``weight_backward``, ``weight_step``, ``finish_step``).
    5. ``export()`` discretizes each DARTS cell (``export_cell``) with ``edge_weights(cell)`` and
       ``discretize(weights, cell)`` (default: the DARTS rule on softmax weights, ``none`` excluded) into an NNI
       sample (labels ``'{cell}/op_{node}_{j}'`` and ``'{cell}/input_{node}'``) that ``model_space.freeze`` accepts;
       other choices export their strongest candidate. **Hook: the discretization into a genotype.**

    Parameters
    ----------
    arc_learning_rate, arc_betas, arc_weight_decay
        Adam for the architecture parameters (DARTS: 3e-4, (0.5, 0.999), 1e-3).
    arc_gradient_clip_val
        Clip the architecture gradient norm (``None``: no clipping, as in DARTS).
    gradient_clip_val
        Clip the weight gradient norm before each weight step (DARTS: 5).
    warmup_epochs
        Epochs at the start with weight steps only.
    log_prob_every_n_step
        Log the architecture probabilities every this many steps.
    penalty
        NNI's expectation profiler penalty (``nni.nas.oneshot.pytorch.profiler.ExpectationProfilerPenalty`` or its
        keyword arguments), applied to the architecture loss with the tensor probabilities of
        ``VariantLightningModule.cost_probs``, so that it sends gradient to the alphas.
    cost
        A differentiable hardware cost in the official ProxylessNAS forms
        (:class:`~nni_darts_variants.cost.HardwareCost` or its YAML mapping, e.g.
        ``{metric: latency, target_ms: 20, form: mul#log}`` or ``{metric: flops, target_mflops: 300}``); its cost
        table is built from the unmutated model space at the first architecture step. Not together with ``penalty``.
    mutation_hooks
        Extra NNI mutation hooks, run before the variant's own.
    """

    #: Name in the registry (``create_strategy(name)``); for built-ins set by ``register_strategy`` from
    #: ``registry.BUILTIN_STRATEGIES``, where it is written once.
    name: ClassVar[str] = ''
    #: One line for ``nni-darts list`` (for built-ins, likewise from the registry).
    description: ClassVar[str] = ''
    edge_class: ClassVar[type[MixedEdge]] = MixedEdge
    node_class: ClassVar[type[MixedNode]] = MixedNode
    #: Supermodule of the nodes of an NNI ``Cell`` (``None``: ``node_class``); GDAS and ProxylessNAS sample them.
    cell_node_class: ClassVar[type | None] = None
    #: Supermodule of a free ``InputChoice`` (one outside a cell).
    input_class: ClassVar[type[MixedInput]] = MixedInput
    #: NNI's sampling policy for the value choices of mutable modules (``MutableConv2d`` ...); ``None``: the variant
    #: refuses them at mutation.
    mixed_op_policy: ClassVar[type | None] = MixedOpDifferentiablePolicy
    #: Labels where the variant's own mathematics has no meaning and plain DARTS is used instead, per construct
    #: (``'value choice'``, ``'repeat depth'``): listed in one warning after mutation.
    darts_fallback_for: ClassVar[tuple[str, ...]] = ()
    module_class: ClassVar[type[VariantLightningModule]] = VariantLightningModule

    def __init__(self, *, arc_learning_rate: float = 3e-4, arc_betas: Sequence[float] = (0.5, 0.999),
                 arc_weight_decay: float = 1e-3, arc_gradient_clip_val: float | None = None,
                 gradient_clip_val: float | None = 5.0, warmup_epochs: int = 0, log_prob_every_n_step: int = 10,
                 penalty: Any = None, cost: Any = None, mutation_hooks: list | None = None):
        if arc_learning_rate <= 0:
            raise ValueError(f'arc_learning_rate must be positive, got {arc_learning_rate}')
        if len(arc_betas) != 2 or not all(0 <= b < 1 for b in arc_betas):
            raise ValueError(f'arc_betas must be two numbers in [0, 1), got {arc_betas}')
        if arc_weight_decay < 0:
            raise ValueError(f'arc_weight_decay must be >= 0, got {arc_weight_decay}')
        if warmup_epochs < 0:
            raise ValueError(f'warmup_epochs must be >= 0, got {warmup_epochs}')
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f'gradient_clip_val must be positive or None, got {gradient_clip_val}')
        hardware_cost = cost_from_config(cost)
        if hardware_cost is not None and penalty is not None:
            raise ValueError('give either cost (our hardware cost) or penalty (NNI\'s profiler penalty), not both')
        super().__init__(arc_learning_rate=arc_learning_rate, gradient_clip_val=gradient_clip_val,
                         log_prob_every_n_step=log_prob_every_n_step, warmup_epochs=warmup_epochs,
                         penalty=penalty, mutation_hooks=mutation_hooks)
        self.arc_betas = tuple(arc_betas)
        self.arc_weight_decay = arc_weight_decay
        self.arc_gradient_clip_val = arc_gradient_clip_val
        if hardware_cost is not None:
            self.penalty = hardware_cost
        self._cost_space: nn.Module | None = None

    def cost_space(self) -> nn.Module:
        """The unmutated copy of the model space the hardware cost's table is built from."""
        if self._cost_space is None:
            raise RuntimeError('no model space copy for the cost table: mutate_model has not run')
        return self._cost_space

    def mutate_kwargs(self) -> dict[str, Any]:
        """Configuration handed to the supermodules' ``mutate`` (override to add the variant's settings)."""
        return {}

    def schedule_epochs(self, max_epochs: int) -> int:
        """Epochs that one run of the weight learning-rate schedule spans: the whole search by default."""
        return max_epochs

    @classmethod
    def smoke_kwargs(cls) -> dict[str, Any]:
        """Keyword arguments for a seconds-long smoke search on the tiny test space (tests, conformance suite) in
        which the architecture parameters move: no warm-up by default."""
        return {'warmup_epochs': 0}

    @classmethod
    def full_step_kwargs(cls) -> dict[str, Any]:
        """Overrides of the defaults with which every batch has both an architecture and a weight step (no
        warm-up, an arch step every batch), on the unchanged network: used by the benchmark. None by default."""
        return {}

    @classmethod
    def trainer_max_epochs(cls, **strategy_args: Any) -> int | None:
        """The trainer's ``max_epochs`` that the strategy built with ``strategy_args`` requires (``None``: any)."""
        return None

    def required_max_epochs(self) -> int | None:
        """:meth:`trainer_max_epochs` of this strategy's own arguments (``None``: any)."""
        return None

    @classmethod
    def check_space(cls, space: type | Any) -> None:
        """Raise ``TypeError`` or ``ValueError`` when the strategy cannot search ``space``: the class the config's
        ``space.name`` names (when the config resolves; nothing is built), or a built space (a variant may call it
        again at ``mutate_model``). Every space passes by default."""

    @classmethod
    def check_trainer(cls, max_epochs: int | None, *, train: dict[str, Any] | None = None,
                      **strategy_args: Any) -> None:
        """Raise ``ValueError`` when a trainer of ``max_epochs`` cannot run the strategy built with
        ``strategy_args``; nothing is built, so a config can be checked when it resolves. ``train`` is the config's
        resolved ``train`` section (weight optimizer settings), when there is one."""
        required = cls.trainer_max_epochs(**strategy_args)
        if required is not None and max_epochs != required:
            raise ValueError(f'{cls.name or cls.__name__} with these arguments runs {required} epochs: set the '
                             f"trainer's max_epochs to {required} (got {max_epochs})")

    @classmethod
    def resolved_arguments(cls, **strategy_args: Any) -> dict[str, Any]:
        """``strategy_args`` completed with the defaults of the class's keyword parameters."""
        from ..registry import strategy_parameters
        defaults = {k: p.default for k, p in strategy_parameters(cls).items() if p.default is not p.empty}
        return {**defaults, **strategy_args}

    def default_mutation_hooks(self) -> list:
        """Our cells' nodes are tagged, NNI cells become :class:`~.nni_spaces.MixedCell` of the variant's edges and
        nodes, then choices, free inputs, repeats and mutable modules get their supermodules; anything left over is
        refused with its construct named."""
        cell_hook = MixedCell.hook(self.edge_class, self.cell_node_class or self.node_class)
        hooks = [suppress_supernet_modules, mark_cell_nodes, cell_hook, self.edge_class.mutate, self.node_class.mutate,
                 self.input_class.mutate, self._fallback_hook('repeat depth', DifferentiableMixedRepeat.mutate)]
        if self.mixed_op_policy is not None:
            hooks += [self._fallback_hook('value choice', op.mutate) for op in NATIVE_MIXED_OPERATIONS]
        return hooks + [self.refuse_dangling, no_default_hook]

    def _fallback_hook(self, construct: str, hook: Any) -> Any:
        """``hook``, recording the labels it relaxes when this variant falls back to DARTS for ``construct``."""
        if construct not in self.darts_fallback_for:
            return hook

        def noted(module: nn.Module, name: str, memo: dict[str, Any], mutate_kwargs: dict[str, Any]) -> Any:
            result = hook(module, name, memo, mutate_kwargs)
            if result is not None and result is not False:
                for label in getattr(module, 'depth_choice', module).simplify():
                    note_fallback(mutate_kwargs, f'{construct} (relaxed as DARTS)', label)
            return result
        return noted

    def refuse_dangling(self, module: nn.Module, name: str, memo: dict[str, Any], mutate_kwargs: dict[str, Any]
                        ) -> None:
        """A mutation hook: a mutable module no hook has replaced is refused, naming it and what to do."""
        if dangling(module):
            labels = ', '.join(sorted(module.simplify()))
            raise TypeError(f'{self.name or type(self).__name__} cannot search `{name}` ({type(module).__name__}, '
                            f'choices {labels}): its algorithm has no notion of value choices in mutable modules; fix '
                            'those values, or search this space with darts, pcdarts, gdas, mergenas or dropnas')

    def mutate_model(self, model: Any) -> Any:
        """NNI's mutation, then one warning per construct listing the labels searched by plain DARTS.

        With a hardware cost, a copy of the unmutated space is kept first for its cost table (and a table built on
        an earlier space is dropped: P-DARTS mutates a new space per stage)."""
        for label, mutable in model.simplify().items():
            if not isinstance(mutable, (Categorical, CategoricalMultiple)):
                raise TypeError(f'{type(model).__name__}: {label} is a {type(mutable).__name__}, not a categorical '
                                'choice; one-shot strategies (ours and NNI\'s DARTS) cannot relax it. Search this space '
                                'with a multi-trial strategy such as nni.nas.strategy.RegularizedEvolution')
        if isinstance(self.penalty, HardwareCost):
            self._cost_space = copy.deepcopy(model)
            self.penalty.forget_table()
        self._fallbacks: dict[str, list[str]] = {}
        model = super().mutate_model(model)
        for reason, labels in self._fallbacks.items():
            _logger.warning('%s: %s falls back to plain DARTS on %d choice(s): %s', self.name, reason, len(labels),
                            ', '.join(labels))
        return model

    def run_hook(self, hook: Any, name: str, module: nn.Module, memo: dict[str, Any]) -> Any:
        """NNI's DARTS ``run_hook`` (it puts the alphas in the memo), with the variant's mixed-operation policy,
        :meth:`mutate_kwargs` and the fallback record added to the keyword arguments the supermodules receive."""
        def with_variant_kwargs(module: nn.Module, name: str, memo: dict[str, Any], kwargs: dict[str, Any]) -> Any:
            return hook(module, name, memo, {**kwargs, 'mixed_op_sampling': self.mixed_op_policy,
                                             **self.mutate_kwargs(), FALLBACKS_KEY: getattr(self, '_fallbacks', {})})
        return super().run_hook(with_variant_kwargs, name, module, memo)

    def configure_oneshot_module(self, training_module: Any) -> VariantLightningModule:
        return self.module_class(training_module, self)

    def export_genotype(self) -> Genotype | None:
        """The searched genotype (after ``run``), or ``None`` when the space has no DARTS cells."""
        return self.oneshot_module.export_genotype()
