"""P-DARTS (Chen, Xie, Wu, Tian, ICCV 2019): progressive depth, operation pruning, skip-connect regularization."""
from __future__ import annotations

import logging
import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from nni.nas.nn.pytorch import Cell

from ..genotype import EdgeWeights, darts_rule
from search_spaces.cell import DartsCell
from ..registry import init_signature, register_strategy
from .base import DartsVariant, MixedEdge, VariantLightningModule, first_per_label
from .nni_spaces import CELL_OPERATIONS_KEY, MixedCell

__all__ = ['PDarts', 'PDartsEdge', 'PDartsLightning', 'drop_operations', 'skip_dropout_rate',
           'limit_skip_connections', 'SKIP']

_logger = logging.getLogger(__name__)

#: The operation whose count is limited in the final normal cell and that receives dropout.
SKIP = 'skip_connect'


def drop_operations(operations: Sequence[str], weights: Sequence[float], keep: int,
                    none_first: bool = False) -> list[str]:
    """The ``keep`` operations of an edge that survive a stage: the lowest-weight ones are dropped.

    ``weights`` are the edge's softmax probabilities (``none`` in the denominator). Ties drop the earlier operation
    (official ``get_min_k``). With ``none_first`` (official ``get_min_k_no_zero``, used for the final pick) ``none``
    is dropped first whatever its weight. Survivors keep their order.
    """
    if len(operations) != len(weights):
        raise ValueError(f'{len(operations)} operations but {len(weights)} weights')
    if keep < 1:
        raise ValueError(f'keep must be >= 1, got {keep}')
    ranked = sorted(range(len(operations)), key=lambda k: (float(weights[k]), k))
    if none_first and 'none' in operations:
        ranked.remove(operations.index('none'))
        ranked.insert(0, operations.index('none'))
    dropped = set(ranked[:max(len(operations) - keep, 0)])
    return [op for k, op in enumerate(operations) if k not in dropped]


def skip_dropout_rate(epoch: int, rate: float, epochs: int, warmup: int, decay: float = 0.2) -> float:
    """Dropout on identity skip-connects at ``epoch`` of a stage (official ``train_search.py``).

    ``rate * (epochs - epoch - 1) / epochs`` during the stage's warm-up (``epoch < warmup``), then
    ``rate * exp(-decay * (epoch - warmup))``: so ``p(0) = rate (E-1)/E`` and ``p(warmup) = rate``.
    """
    if epoch < warmup:
        return rate * (epochs - epoch - 1) / epochs
    return rate * math.exp(-decay * (epoch - warmup))


def limit_skip_connections(weights: EdgeWeights, max_skip: int | None, per_node: int = 2
                           ) -> dict[int, list[tuple[str, int]]]:
    """The P-DARTS final cell: the DARTS rule, then at most ``max_skip`` skip-connects (official refinement).

    The DARTS rule on the last stage's softmax (``none`` excluded) equals the official final pick (drop ``none``
    first, keep the strongest op; rank edges by it). While the cell has more than ``max_skip`` skip-connects, the
    chosen skip-connect with the lowest probability is removed from its edge, which then takes its best remaining
    non-``none`` op, and the two edges of every node are re-selected. A skip on an edge with no other candidate is
    kept (nothing to replace it with). ``max_skip=None`` disables the limit. ``per_node``: inputs per node (an NNI
    cell's ``num_ops_per_node``).
    """
    allowed = {edge: {op: float(w) for op, w in ops.items() if op != 'none'} for edge, ops in weights.items()}
    nodes = darts_rule(allowed, per_node=per_node)
    while max_skip is not None:
        skips = [(node, j) for node, pairs in nodes.items() for op, j in pairs if op == SKIP]
        removable = [edge for edge in skips if len(allowed[edge]) > 1]
        if len(skips) <= max_skip or not removable:
            break
        weakest = min(removable, key=lambda edge: allowed[edge][SKIP])
        del allowed[weakest][SKIP]
        nodes = darts_rule(allowed, per_node=per_node)
    return nodes


class PDartsEdge(MixedEdge):
    """A DARTS mixed edge over the edge's surviving operations, with dropout after a stride-1 identity skip.

    ``skip_dropout`` is set by the schedule each epoch; ``FactorizedReduce`` (the stride-2 skip) never gets dropout.
    """

    skip_dropout: float = 0.0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        weights = self.op_weights()
        return sum(w * self.candidate_output(name, *args, **kwargs) for w, name in zip(weights, self.names))

    def candidate_output(self, name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        output = self[name](*args, **kwargs)
        if name == SKIP and self.skip_dropout > 0 and isinstance(self[name], nn.Identity):
            output = F.dropout(output, self.skip_dropout, self.training)
        return output


_REBUILDABLE = ('use DartsSpace, NasBench201Space or an NNI Cell space such as nni.nas.hub.pytorch.DARTS, NASNet, '
                'ENAS, AmoebaNet or PNAS')


def check_rebuildable(klass: type) -> None:
    """Refuse a model-space class that P-DARTS cannot rebuild with more cells per stage: one without a ``num_cells``
    argument. ``NniHubSpace`` passes here: the hub class it names is checked once built (:meth:`PDarts.check_space`
    at ``mutate_model``, which also runs before a run folder exists)."""
    from search_spaces.nni_hub import NniHubSpace
    if klass is NniHubSpace:
        return
    if 'num_cells' not in init_signature(klass).parameters:
        raise TypeError(f'P-DARTS rebuilds the model space with more cells and fewer operations per stage, but '
                        f'{klass.__name__} takes no `num_cells` argument; {_REBUILDABLE}')


def space_blueprint(space: nn.Module) -> tuple[type, dict[str, Any]]:
    """The class of a model space and its constructor arguments (NNI records them), checked for P-DARTS' needs:
    a ``num_cells`` argument that is one number (the stages set the depth)."""
    check_rebuildable(type(space))
    signature = init_signature(type(space))
    name = type(space).__name__
    bound = signature.bind(space, *space.trace_args, **space.trace_kwargs)
    bound.apply_defaults()
    kwargs = dict(list(bound.arguments.items())[1:])
    if not isinstance(kwargs['num_cells'], int):
        raise TypeError(f'P-DARTS rebuilds the model space with more cells and fewer operations per stage, but {name} '
                        f'has num_cells={kwargs["num_cells"]!r}, a depth choice; give num_cells one number (the '
                        'stages set the depth, stage_cells)')
    return type(space), kwargs


def prunes_by_constructor(kwargs: dict[str, Any]) -> bool:
    """Whether the space takes the surviving operations as its ``operations`` argument (``DartsSpace``); otherwise
    they reach its NNI cells through the mutation (:data:`~.nni_spaces.CELL_OPERATIONS_KEY`)."""
    return 'operations' in kwargs


class PDartsLightning(VariantLightningModule):
    """The P-DARTS search loop: stages of a deeper network on fewer operations, all in one Lightning fit.

    Stage ``s`` covers epochs ``[s E, (s+1) E)`` (``E = epochs_per_stage``). At its first epoch :meth:`schedule`
    prunes every cell edge to ``num_to_keep[s-1]`` operations and swaps in a fresh network with
    ``stage_cells[s]`` cells, fresh alphas and fresh optimizers (:meth:`build_stage`). Stage 1 is built in
    :meth:`setup` when the model space's depth differs from ``stage_cells[0]``. A checkpoint records the stage and
    the per-edge operation lists, and loading it rebuilds that stage's network first, so a search resumes across
    stage boundaries.
    """

    def __init__(self, training_module: Any, strategy: 'PDarts'):
        super().__init__(training_module, strategy)
        self.stage = 0
        self.stage_operations: dict[str, list[str]] = {}
        self.blueprint: tuple[type, dict[str, Any]] | None = None

    def setup(self, stage: str | None = None) -> Any:
        result = super().setup(stage)
        if stage in (None, 'fit'):
            s = self.strategy
            s.check_trainer(self.trainer.max_epochs, stage_cells=s.stage_cells, num_to_keep=s.num_to_keep,
                            skip_dropout=s.skip_dropout, epochs_per_stage=s.epochs_per_stage)
            self.blueprint = space_blueprint(self.model)
            self.stage, self.stage_operations = 0, self.edge_operations()
            if self.blueprint[1]['num_cells'] != self.strategy.stage_cells[0]:
                self.build_stage(0)  # before the trainer moves the module and builds the optimizers
        return result

    def edge_operations(self) -> dict[str, list[str]]:
        """``{edge label: operation names}`` of the current network's cell edges."""
        return {edge.label: list(edge.names) for edge in self.searched_edges()}

    def searched_edges(self) -> list[MixedEdge]:
        """One mixed edge per label: the cell edges (``DartsCell`` or NNI ``Cell``), or, in a space without cells
        (NasBench201Space), every mixed edge."""
        if not self.darts_cells():
            return list(first_per_label(self.supernet_modules(), MixedEdge).values())
        return [edge for _, _, edge in self.cell_edges()]

    def pruned_operations(self, keep: int) -> dict[str, list[str]]:
        """Each edge's ``keep`` strongest operations under the current alphas."""
        return {edge.label: drop_operations(list(edge.names), edge.ranking_weights().tolist(), keep)
                for edge in self.searched_edges()}

    def build_stage(self, stage: int, optimizers: bool = False) -> None:
        """Swap in the stage's network (fresh weights and alphas); then rebuild the optimizers if asked."""
        cls, kwargs = self.blueprint
        kwargs = {**kwargs, 'num_cells': self.strategy.stage_cells[stage]}
        if prunes_by_constructor(kwargs):
            kwargs['operations'] = self.stage_operations
        else:
            self.strategy.cell_operations = self.stage_operations
        network = cls(**kwargs)
        self.strategy.mutate_model(network)
        reference = next(self.training_module.parameters())
        self.set_model(network.to(reference.device))
        self.stage = stage
        if optimizers:
            # No public Lightning API rebuilds the optimizers in the middle of a fit; Strategy.setup_optimizers (run
            # by the trainer at fit start) does. Checked against Lightning 2.6.
            self.trainer.strategy.setup_optimizers(self.trainer)
        _logger.info('P-DARTS stage %d: %d cells, %d operations per edge', stage + 1,
                     self.strategy.stage_cells[stage], max(map(len, self.stage_operations.values())))

    def schedule(self, epoch: int, max_epochs: int | None) -> None:
        """Start a new stage when due; freeze alphas during the stage's warm-up; set the skip dropout."""
        s = self.strategy
        stage, epoch_in_stage = divmod(epoch, s.epochs_per_stage)
        if stage != self.stage:
            self.stage_operations = self.pruned_operations(s.num_to_keep[stage - 1])
            self.build_stage(stage, optimizers=True)
        for alpha in self.arch_parameters():
            alpha.requires_grad_(epoch_in_stage >= s.stage_warmup_epochs)
        rate = skip_dropout_rate(epoch_in_stage, s.skip_dropout[stage], s.epochs_per_stage, s.stage_warmup_epochs)
        for module in self.modules():
            if isinstance(module, PDartsEdge):
                module.skip_dropout = rate

    def arch_update_enabled(self, batch_idx: int) -> bool:
        return self.trainer.current_epoch % self.strategy.epochs_per_stage >= self.strategy.stage_warmup_epochs

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        operations = {str(label): [str(op) for op in ops] for label, ops in self.stage_operations.items()}
        checkpoint['pdarts'] = {'stage': int(self.stage), 'stage_operations': operations}  # plain types only
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the checkpoint's stage network (and its optimizers) before Lightning loads its state into it."""
        state = checkpoint.get('pdarts')
        if state and (state['stage'] != self.stage or state['stage_operations'] != self.stage_operations):
            self.stage_operations = state['stage_operations']
            self.build_stage(state['stage'], optimizers=True)
        super().on_load_checkpoint(checkpoint)

    def discretize(self, weights: EdgeWeights, cell: DartsCell | MixedCell | None = None
                   ) -> dict[int, list[tuple[str, int]]]:
        """The DARTS rule; in the normal cell at most ``max_skip_connect`` skip-connects."""
        normal = cell is not None and cell.label == 'normal'
        return limit_skip_connections(weights, self.strategy.max_skip_connect if normal else None,
                                      getattr(cell, 'num_ops_per_node', 2))


@register_strategy
class PDarts(DartsVariant):
    """P-DARTS: progressively deeper search networks on progressively fewer operations per edge.

    `Chen, Xie, Wu, Tian. Progressive Differentiable Architecture Search: Bridging the Depth Gap between Search and
    Evaluation. ICCV 2019 <https://arxiv.org/abs/1904.12760>`__; official code ``chenxin061/pdarts``.

    One NNI search (one Lightning fit of ``len(stage_cells) * epochs_per_stage`` epochs, which must be the trainer's
    ``max_epochs``) runs the stages. Each stage trains a fresh network (fresh weights, alphas and optimizers; the
    evaluator's ``configure_optimizers`` is run again, so a scheduler sized to ``epochs_per_stage`` reproduces the
    official per-stage cosine) with alphas frozen for its first ``stage_warmup_epochs``; after it, every cell edge
    keeps its ``num_to_keep`` strongest operations (softmax of alpha). The model space is rebuilt through its class
    with the recorded constructor arguments and ``num_cells``; the surviving operations go to its ``operations``
    argument (a per-edge mapping, as :class:`~search_spaces.DartsSpace` accepts) or, for a space of NNI ``Cell``
    (hub ``DARTS``, ``NASNet``, ``ENAS``, ``AmoebaNet``, ``PNAS``, whose ``num_cells`` counts every cell, reduction
    cells included, as ``stage_cells`` does), to the supernet's cell edges at mutation. Other spaces are refused
    at :meth:`mutate_model` (:meth:`check_space`). The export is a sample of the original space from the last stage:
    the DARTS rule (``none`` excluded) and, in the normal cell only, at most ``max_skip_connect`` skip-connects.

    Parameters
    ----------
    stage_cells
        Absolute number of cells of the search network in each stage (official 5, 11, 17). The model space's own
        ``num_cells`` is not used for the search (it is rebuilt when it differs from ``stage_cells[0]``); the sample
        is valid for it anyway, since all cells of a type share their choices.
    num_to_keep
        Operations per edge after each stage (official 5, 3, 1); the last must be 1 (the final pick), the others
        at least 2 and non-increasing. Official drops keep ``none`` if it is strong enough (it is dropped only at
        the final pick).
    epochs_per_stage
        Epochs of each stage (25).
    stage_warmup_epochs
        First epochs of each stage with weight steps only (10).
    skip_dropout
        Dropout rate ``d`` on stride-1 identity skip-connects per stage (README: 0.1, 0.4, 0.7; the code's
        default is 0); scheduled by :func:`skip_dropout_rate`.
    max_skip_connect
        Most skip-connects in the final normal cell (M = 2; paper value, unverified); ``None``: no limit.
    arc_learning_rate, arc_gradient_clip_val
        Architecture Adam learning rate (6e-4) and gradient-norm clip (5), as the official code.
    **kwargs
        See :class:`~nni_darts_variants.strategies.base.DartsVariant` (``warmup_epochs`` is replaced by
        ``stage_warmup_epochs``). Official weights: SGD lr 0.025 cosine to 0, momentum 0.9, wd 3e-4, batch 96.
    """

    edge_class = PDartsEdge
    module_class = PDartsLightning

    def __init__(self, *, stage_cells: Sequence[int] = (5, 11, 17), num_to_keep: Sequence[int] = (5, 3, 1),
                 epochs_per_stage: int = 25, stage_warmup_epochs: int = 10,
                 skip_dropout: Sequence[float] = (0.1, 0.4, 0.7), max_skip_connect: int | None = 2,
                 arc_learning_rate: float = 6e-4, arc_gradient_clip_val: float | None = 5.0, **kwargs: Any):
        if kwargs.get('warmup_epochs'):
            raise ValueError(f'warmup_epochs={kwargs["warmup_epochs"]}: P-DARTS warms up at the start of every '
                             'stage; use stage_warmup_epochs')
        self.stage_cells = check_stage_lists(stage_cells, num_to_keep, skip_dropout)
        self.num_to_keep, self.skip_dropout = tuple(num_to_keep), tuple(float(d) for d in skip_dropout)
        if epochs_per_stage < 1 or not 0 <= stage_warmup_epochs <= epochs_per_stage:
            raise ValueError(f'need epochs_per_stage >= 1 and 0 <= stage_warmup_epochs <= epochs_per_stage, got '
                             f'{epochs_per_stage} and {stage_warmup_epochs}')
        if max_skip_connect is not None and max_skip_connect < 0:
            raise ValueError(f'max_skip_connect must be >= 0 or None, got {max_skip_connect}')
        super().__init__(arc_learning_rate=arc_learning_rate, arc_gradient_clip_val=arc_gradient_clip_val, **kwargs)
        self.epochs_per_stage, self.stage_warmup_epochs = epochs_per_stage, stage_warmup_epochs
        self.max_skip_connect = max_skip_connect
        #: ``{edge label: operations}`` kept on the NNI cell edges by the next mutation (``None``: all).
        self.cell_operations: dict[str, list[str]] | None = None

    @classmethod
    def check_space(cls, space: type | nn.Module) -> None:
        """Raise ``TypeError`` (one line: the construct and what to use) when P-DARTS cannot rebuild ``space`` per
        stage: it needs a ``num_cells`` argument of one number, and an ``operations`` argument or NNI ``Cell``
        modules whose edges it prunes. A class (when the config resolves) is checked for its arguments; a built
        space (at ``mutate_model``) for all of it."""
        if isinstance(space, type):
            check_rebuildable(space)
            return
        _, kwargs = space_blueprint(space)
        if not prunes_by_constructor(kwargs) and not any(isinstance(m, (Cell, MixedCell)) for m in space.modules()):
            raise TypeError(f'P-DARTS rebuilds the model space with more cells and fewer operations per stage, but '
                            f'{type(space).__name__} has no NNI Cell and takes no `operations` argument to prune; '
                            f'{_REBUILDABLE}')

    def mutate_model(self, model: Any) -> Any:
        """Refuse, before anything trains, a space that cannot be rebuilt with more cells and fewer operations.

        :attr:`cell_operations` applies to this one mutation only (a stage's network), then it is cleared."""
        self.check_space(model)
        try:
            return super().mutate_model(model)
        finally:
            self.cell_operations = None

    def mutate_kwargs(self) -> dict[str, Any]:
        """The operations the current stage keeps on NNI cell edges (none before the first pruning)."""
        return {CELL_OPERATIONS_KEY: self.cell_operations} if self.cell_operations else {}

    def schedule_epochs(self, max_epochs: int) -> int:
        """Each stage restarts the weight schedule (fresh optimizers), over one stage's epochs, as the official code."""
        return self.epochs_per_stage

    @classmethod
    def smoke_kwargs(cls) -> dict[str, Any]:
        """One stage of one epoch on the 3-cell test space, alphas trained from the first batch."""
        return {'stage_cells': (3,), 'num_to_keep': (1,), 'epochs_per_stage': 1, 'stage_warmup_epochs': 0,
                'skip_dropout': (0.1,)}

    @property
    def total_epochs(self) -> int:
        return len(self.stage_cells) * self.epochs_per_stage

    def required_max_epochs(self) -> int:
        return self.total_epochs

    @classmethod
    def full_step_kwargs(cls) -> dict[str, Any]:
        return {'stage_warmup_epochs': 0}

    @classmethod
    def trainer_max_epochs(cls, **strategy_args: Any) -> int:
        """One fit runs every stage: ``len(stage_cells) * epochs_per_stage``."""
        args = cls.resolved_arguments(**strategy_args)
        return len(args['stage_cells']) * args['epochs_per_stage']

    def list_models(self, sort: bool = True, limit: int | None = 1) -> Iterator[Any]:
        """The searched architecture, from the last stage's network (NNI's version would re-export stage 1)."""
        yield self.model_space.freeze(self.oneshot_module.export())


def check_stage_lists(stage_cells: Sequence[int], num_to_keep: Sequence[int],
                      skip_dropout: Sequence[float]) -> tuple[int, ...]:
    """Validate the per-stage settings; return ``stage_cells`` as a tuple."""
    if not stage_cells or any(c < 1 for c in stage_cells):
        raise ValueError(f'stage_cells must be positive cell counts, one per stage, got {stage_cells}')
    if len(num_to_keep) != len(stage_cells) or len(skip_dropout) != len(stage_cells):
        raise ValueError(f'num_to_keep {num_to_keep} and skip_dropout {skip_dropout} need one entry per stage '
                         f'({len(stage_cells)} stages in stage_cells={stage_cells})')
    keep = list(num_to_keep)
    if keep[-1] != 1 or any(k < 2 for k in keep[:-1]) or keep != sorted(keep, reverse=True):
        raise ValueError(f'num_to_keep={num_to_keep}: needs non-increasing entries >= 2 ending with 1, e.g. (5, 3, 1)')
    if any(not 0 <= d < 1 for d in skip_dropout):
        raise ValueError(f'skip_dropout rates must be in [0, 1), got {skip_dropout}')
    return tuple(int(c) for c in stage_cells)
