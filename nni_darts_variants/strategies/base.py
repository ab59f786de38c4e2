"""The shared base of every strategy in this package: supermodules, search loop and strategy.

A variant is one file that subclasses some of the three classes here and overrides only the hooks where its
algorithm differs. The lifecycle is documented once, on :class:`DartsVariant`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, ClassVar, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
# NNI's public strategy package must be imported before its one-shot internals, or its own import of them fails
# half-way (a circular import) and ``nni.nas.strategy.DARTS`` becomes a placeholder.
from nni.nas.strategy import DARTS  # isort: skip
from nni.nas.nn.pytorch import InputChoice, LayerChoice
from nni.nas.oneshot.pytorch.differentiable import DartsLightningModule
from nni.nas.oneshot.pytorch.strategy import no_default_hook
from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule
from nni.nas.oneshot.pytorch.supermodule.differentiable import DifferentiableMixedRepeat

from search_spaces.cell import DartsCell, edge_label, input_label
from ..cost.penalty import HardwareCost, cost_from_config
from ..genotype import CELL_TYPES, Genotype, darts_rule

__all__ = ['MixedEdge', 'MixedNode', 'VariantLightningModule', 'DartsVariant', 'loss_of', 'keep_zero_gradients',
           'check_weight_grad_reset', 'WEIGHT_GRAD_RESETS']

_logger = logging.getLogger(__name__)


def loss_of(step_output: Any) -> torch.Tensor:
    """The loss in what a Lightning ``training_step`` returned (a tensor or a dict with ``'loss'``)."""
    return step_output['loss'] if isinstance(step_output, dict) else step_output


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

    Installed as a step pre-hook (Lightning's ``zero_grad`` sets ``None``); returns the hook handle.
    """
    seen: set[int] = set()
    parameters = list(parameters)

    def fill_zeros(opt: Any, args: Any, kwargs: Any) -> None:
        for p in parameters:
            if p.grad is not None:
                seen.add(id(p))
            elif id(p) in seen:
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
        return sum(w * self[name](*args, **kwargs) for w, name in terms or zip(weights, self.names))

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
        if type(module) is InputChoice:
            if module.reduction != 'sum':
                raise TypeError(f'InputChoice {module.label}: only reduction="sum" is supported, got '
                                f'{module.reduction!r}')
            return cls.from_input_choice(module, memo.get(module.label), mutate_kwargs)
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Search loop
# ---------------------------------------------------------------------------------------------------------------------

class VariantLightningModule(DartsLightningModule):
    """The search loop shared by all variants (one Lightning ``training_step`` per pair of batches).

    See :class:`DartsVariant` for the lifecycle. ``strategy`` is the strategy object that configured this module;
    hooks read their hyper-parameters from it.
    """

    #: Skip the gradients nobody reads (exact, tested in ``tests/test_speed.py``): the architecture step
    #: back-propagates to the architecture parameters only (the weight step zeroes the weight gradients before its
    #: own backward), and the weight step's forward runs with them frozen (the next architecture step zeroes their
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

    # ----- the step -----
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        trn_batch, val_batch = batch['train'], batch['val']
        if self.arch_update_enabled(batch_idx):
            self.architecture_step(trn_batch, val_batch, batch_idx)
        output = self.weight_step(trn_batch, batch_idx)
        self.advance_lr_schedulers(batch_idx)
        if batch_idx % self.log_prob_every_n_step == 0:
            self.log_probs(self.export_probs())
        return output

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
        """Resample, then one step of the evaluator's optimizer on the training batch (gradients clipped)."""
        self.resample()
        with self.frozen_architecture():
            output = self.training_module.training_step(trn_batch, 2 * batch_idx + 1)
        self.advance_optimization(loss_of(output), batch_idx, self.gradient_clip_val)
        return output

    # ----- parameters and optimizers -----
    def weight_parameters(self) -> list[nn.Parameter]:
        """Parameters of the evaluator's (weight) optimizer."""
        arch = set(self.arch_parameters())
        return [p for p in self.training_module.parameters() if p not in arch]

    def weight_optimizer(self) -> torch.optim.Optimizer:
        """The evaluator's optimizer (the unwrapped ``torch.optim.Optimizer``)."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        weight_opts = [o for o in optimizers if not getattr(o, 'is_arch_optimizer', False)]
        return getattr(weight_opts[0], 'optimizer', weight_opts[0])

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
    def darts_cells(self) -> dict[str, DartsCell]:
        """One cell per type (cells of a type share their choices)."""
        cells: dict[str, DartsCell] = {}
        for module in self.training_module.modules():
            if isinstance(module, DartsCell):
                cells.setdefault(module.label, module)
        return cells

    def edge_weights(self, cell: DartsCell) -> dict[tuple[int, int], dict[str, float]]:
        """``{(node, j): {op: weight}}``: the weights the discretization ranks by (per edge ``ranking_weights``)."""
        result = {}
        for node in cell.node_indices:
            for j in range(node):
                edge = cell.edge(node, j)
                result[(node, j)] = dict(zip(map(str, edge.names), edge.ranking_weights().cpu().tolist()))
        return result

    def discretize(self, weights: dict[tuple[int, int], dict[str, float]]) -> dict[int, list[tuple[str, int]]]:
        """Genotype rule: ``{node: [(op, j), (op, j)]}`` from the edge weights (default: the DARTS rule)."""
        return darts_rule(weights)

    def export_cell(self, cell: DartsCell) -> dict[str, Any]:
        """NNI sample entries of one cell type: the two chosen inputs per node and an operation for every edge."""
        weights = self.edge_weights(cell)
        nodes = self.discretize(weights)
        sample: dict[str, Any] = {}
        for node, pairs in nodes.items():
            sample[input_label(cell.label, node)] = sorted(j for _, j in pairs)
            chosen = {j: op for op, j in pairs}
            for j in range(node):
                ops = weights[(node, j)]
                best = chosen.get(j) or max((o for o in ops if o != 'none'), key=ops.get, default=next(iter(ops)))
                sample[edge_label(cell.label, node, j)] = best
        return sample

    def export(self) -> dict[str, Any]:
        """The architecture: every DARTS cell discretized by :meth:`discretize`, other choices by their modules."""
        sample: dict[str, Any] = {}
        for cell in self.darts_cells().values():
            sample.update(self.export_cell(cell))
        for module in self.supernet_modules():
            sample.update(module.export(memo=sample))
        return sample

    def export_genotype(self) -> Genotype | None:
        """The exported architecture as a :class:`~nni_darts_variants.genotype.Genotype` (``None`` without cells)."""
        cells = self.darts_cells()
        if set(cells) != set(CELL_TYPES):
            return None
        return Genotype.from_sample(self.export(), num_nodes=cells['normal'].num_nodes)


# ---------------------------------------------------------------------------------------------------------------------
# Strategy
# ---------------------------------------------------------------------------------------------------------------------

class DartsVariant(DARTS):
    """Base of every strategy in this package: an NNI ``DARTS`` strategy with the places where variants differ.

    Lifecycle (each hook may be overridden by a variant; the rest is inherited):

    1. ``NasExperiment.run()`` calls :meth:`mutate_model`: NNI creates one alpha ``randn * 1e-3`` per choice label,
       then runs :meth:`default_mutation_hooks` top-down over the model space. ``edge_class.mutate`` replaces every
       ``LayerChoice`` with the variant's :class:`MixedEdge` and ``node_class.mutate`` every ``InputChoice`` with its
       :class:`MixedNode`; each receives ``mutate_kwargs()`` (the variant's configuration). **Hook: the mixed-edge
       forward** (``edge_class``, ``node_class``).
    2. :meth:`configure_oneshot_module` wraps the evaluator's Lightning module in ``module_class``
       (:class:`VariantLightningModule`). Its ``configure_architecture_optimizers`` builds the architecture optimizer
       (Adam with ``arc_learning_rate``, ``arc_betas``, ``arc_weight_decay``); NNI removes the alphas from the
       evaluator's weight optimizer. **Hook: the architecture optimizer.**
    3. At each epoch start, ``schedule(epoch, max_epochs)`` runs (warm-up needs nothing: see step 4).
       **Hook: the per-epoch schedule** (temperatures, dropout, stages).
    4. For every pair of batches ``{'train', 'val'}`` (the DARTS 50/50 split), ``training_step`` runs
       ``architecture_step`` (skipped while ``epoch < warmup_epochs``: ``resample()``, ``compute_arch_gradients``,
       optional clipping, ``before_architecture_update``, optimizer step, ``after_architecture_update``), then
       ``weight_step`` (``resample()``, the evaluator's loss, backward, clip at ``gradient_clip_val``, the evaluator's
       optimizer), then the evaluator's LR schedulers. **Hook: the architecture update step.**
    5. ``export()`` discretizes each DARTS cell with ``edge_weights`` and ``discretize`` (default: the DARTS rule on
       softmax weights, ``none`` excluded) into an NNI sample (labels ``'{cell}/op_{node}_{j}'`` and
       ``'{cell}/input_{node}'``) that ``model_space.freeze`` accepts; other choices export their strongest candidate.
       **Hook: the discretization into a genotype.**

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

    #: Name in the registry (``create_strategy(name)``).
    name: ClassVar[str] = ''
    #: One line for ``nni-darts list``.
    description: ClassVar[str] = ''
    edge_class: ClassVar[type[MixedEdge]] = MixedEdge
    node_class: ClassVar[type[MixedNode]] = MixedNode
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

    def mutate_model(self, model: Any) -> Any:
        """NNI's mutation; with a hardware cost, a copy of the unmutated space is kept first for its cost table
        (and a table built on an earlier space is dropped: P-DARTS mutates a new space per stage)."""
        if isinstance(self.penalty, HardwareCost):
            self._cost_space = copy.deepcopy(model)
            self.penalty.forget_table()
        return super().mutate_model(model)

    def cost_space(self) -> nn.Module:
        """The unmutated copy of the model space the hardware cost's table is built from."""
        if self._cost_space is None:
            raise RuntimeError('no model space copy for the cost table: mutate_model has not run')
        return self._cost_space

    def mutate_kwargs(self) -> dict[str, Any]:
        """Configuration handed to the supermodules' ``mutate`` (override to add the variant's settings)."""
        return {}

    @classmethod
    def check_trainer(cls, max_epochs: int) -> None:
        """Raise ``ValueError`` if the search cannot run for ``max_epochs`` epochs (called when the config resolves)."""

    def schedule_epochs(self, max_epochs: int) -> int:
        """Epochs that one run of the weight learning-rate schedule spans: the whole search by default."""
        return max_epochs

    def default_mutation_hooks(self) -> list:
        return [self.edge_class.mutate, self.node_class.mutate, DifferentiableMixedRepeat.mutate, no_default_hook]

    def run_hook(self, hook: Any, name: str, module: nn.Module, memo: dict[str, Any]) -> Any:
        if not memo.get('_validated'):
            memo.update(self._arch_parameters)
            memo['_validated'] = True
        kwargs = {'softmax': nn.Softmax(-1), **self.mutate_kwargs()}
        return hook(module, name, memo, kwargs)

    def configure_oneshot_module(self, training_module: Any) -> VariantLightningModule:
        return self.module_class(training_module, self)

    def export_genotype(self) -> Genotype | None:
        """The searched genotype (after ``run``), or ``None`` when the space has no DARTS cells."""
        return self.oneshot_module.export_genotype()
