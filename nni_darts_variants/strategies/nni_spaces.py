"""Our strategies on NNI's own model spaces: ``Cell``, free ``InputChoice``, candidate probing, value choices.

NNI's hub spaces (``nni.nas.hub.pytorch``) are written with :class:`~nni.nas.nn.pytorch.Cell`, free
:class:`~nni.nas.nn.pytorch.InputChoice`, ``Repeat`` and mutable modules (``MutableConv2d`` ...). This module holds
what the strategies need to search them with their own mathematics:

* :class:`MixedCell` replaces an NNI ``Cell`` (``merge_op`` ``'all'`` or ``'loose_end'``, with or without an op
  factory) by the DARTS cell supernet NNI's ``DifferentiableMixedCell`` also builds: one edge per pair of nodes
  ``(i, j)``, each an instance of the variant's ``edge_class`` (so GDAS samples, PC-DARTS slices channels, DropNAS
  drops, ...), and one node per intermediate node, an instance of the variant's ``node_class`` (PC-DARTS edge
  normalization, PARSEC's input prior). Its export is the variant's discretization (the DARTS rule by default) written
  under NNI's own labels ``'{cell}/op_{i}_{k}'`` and ``'{cell}/input_{i}_{k}'``; ``freeze`` is the original cell's.
  A node that is an :class:`InputSampler` (GDAS, ProxylessNAS) takes only the inputs of its current sample: the
  other incoming edges are not computed, and the export takes the node's strongest inputs by its own logits.
* :func:`probe_edge` finds, by one tiny forward pass, whether the candidates of a choice keep the channel count and
  their stride; :func:`partial_candidates` rebuilds such candidates at ``C / K`` channels (PC-DARTS);
  :func:`darts_edge_spec` recognises the DARTS family of operations (MergeNAS).
* :func:`note_fallback` collects the labels where a variant falls back to plain DARTS; the strategy logs them once.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from nni.mutable import Categorical, CategoricalMultiple, Mutable
from nni.mutable.utils import label as hierarchical_label
from nni.nas.nn.pytorch import Cell, InputChoice, LayerChoice, MutableModule
from nni.nas.nn.pytorch.cell import create_cell_op_candidates, preprocess_cell_inputs
from nni.nas.oneshot.pytorch.supermodule.base import BaseSuperNetModule
from torch import nn

from search_spaces.cell import EdgeSpec
from search_spaces.ops import PRIMITIVES

__all__ = [
    'CELL_OPERATIONS_KEY',
    'FALLBACKS_KEY',
    'InputSampler',
    'MixedCell',
    'Zero',
    'darts_edge_spec',
    'note_fallback',
    'partial_candidates',
    'probe_edge',
    'strongest_operation',
]

#: Key of ``mutate_kwargs`` under which the strategy collects ``{reason: [labels]}`` of partial fallbacks.
FALLBACKS_KEY = 'fallbacks'

#: Key of ``mutate_kwargs`` holding ``{edge label: [operation, ...]}``: the candidates a :class:`MixedCell` keeps on
#: those edges (P-DARTS's pruning between stages); edges not listed keep every candidate.
CELL_OPERATIONS_KEY = 'cell_operations'

#: Side of the probe images (small, even, large enough for two stride-2 reductions).
_PROBE_SIZE = 8


def note_fallback(mutate_kwargs: dict[str, Any], reason: str, label: str) -> None:
    """Record that ``label`` is searched with a fallback (``reason``); the strategy warns once after mutation."""
    labels = mutate_kwargs.setdefault(FALLBACKS_KEY, {}).setdefault(reason, [])
    if label not in labels:
        labels.append(label)


class Zero(nn.Module):
    """DARTS's ``none``: zeros shaped like the edge's other outputs (``x[:, :, ::stride, ::stride] * 0``)."""

    def __init__(self, stride: int = 1):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


# ---------------------------------------------------------------------------------------------------------------------
# Probing candidates
# ---------------------------------------------------------------------------------------------------------------------

def _first_conv_channels(candidates: Iterable[nn.Module]) -> int | None:
    for candidate in candidates:
        for module in candidate.modules():
            if isinstance(module, nn.Conv2d):
                return int(module.in_channels)
    return None


@torch.no_grad()
def _run_eval(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    was_training = module.training
    module.eval()
    try:
        out = module(x)
    except (RuntimeError, ValueError, TypeError):  # a candidate that cannot take this input: not channel-keeping
        out = None
    finally:
        module.train(was_training)
    return out if isinstance(out, torch.Tensor) and out.dim() == 4 else None


def probe_edge(candidates: dict[str, nn.Module]) -> tuple[int, int] | None:
    """``(channels, stride)`` when every candidate maps ``C`` channels to ``C`` channels with one common stride.

    ``C`` is read from the first convolution among the candidates; one forward pass of a ``2 x C x 8 x 8`` zero batch
    in eval mode (no statistics change) checks the shapes. ``None`` when the candidates have no convolution, change
    the channel count, disagree on the output size, or do not take images.
    """
    channels = _first_conv_channels(candidates.values())
    if channels is None:
        return None
    x = torch.zeros(2, channels, _PROBE_SIZE, _PROBE_SIZE)
    shapes = set()
    for candidate in candidates.values():
        if isinstance(candidate, Zero):
            continue
        out = _run_eval(candidate, x)
        if out is None:
            return None
        shapes.add(tuple(out.shape[1:]))
    if len(shapes) != 1:
        return None
    out_channels, height, _ = shapes.pop()
    if out_channels != channels or _PROBE_SIZE % height:
        return None
    return channels, _PROBE_SIZE // height


def _slim_conv(conv: nn.Conv2d, k: int) -> nn.Conv2d | None:
    if conv.in_channels % k or conv.out_channels % k:
        return None
    if conv.groups == 1:
        groups = 1
    elif conv.groups == conv.in_channels:
        groups = conv.in_channels // k
    else:
        return None
    return nn.Conv2d(conv.in_channels // k, conv.out_channels // k, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, groups, conv.bias is not None, conv.padding_mode)


def _slim_norm(norm: nn.BatchNorm2d, k: int) -> nn.BatchNorm2d | None:
    if norm.num_features % k:
        return None
    return nn.BatchNorm2d(norm.num_features // k, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)


def slim_module(module: nn.Module, k: int) -> nn.Module | None:
    """A fresh copy of ``module`` with every ``Conv2d`` and ``BatchNorm2d`` at ``1/k`` of its channels.

    ``None`` when a width is not divisible by ``k``, a convolution is grouped other than depthwise, or another
    layer holds parameters (its width cannot be derived). New layers are freshly initialized.
    """
    slim = copy.deepcopy(module)
    for name, child in list(slim.named_modules()):
        if not name:
            continue
        if isinstance(child, nn.Conv2d):
            new = _slim_conv(child, k)
        elif isinstance(child, nn.BatchNorm2d):
            new = _slim_norm(child, k)
        elif any(True for _ in child.parameters(recurse=False)):
            return None
        else:
            continue
        if new is None:
            return None
        parent_name, _, attr = name.rpartition('.')
        setattr(slim.get_submodule(parent_name) if parent_name else slim, attr, new)
    if any(True for _ in slim.parameters(recurse=False)):
        return None
    return slim


def partial_candidates(candidates: dict[str, nn.Module], k: int) -> tuple[dict[str, nn.Module], int] | None:
    """PC-DARTS candidates at ``C / k`` channels and the edge's stride, or ``None`` where that has no meaning.

    The candidates must keep the channel count (:func:`probe_edge`) and be rebuildable at ``C / k``
    (:func:`slim_module`); a probe then checks that the rebuilt candidates map ``C / k`` to ``C / k`` channels.
    """
    if any(isinstance(m, MutableModule) and m.simplify() for c in candidates.values() for m in c.modules()):
        return None  # candidates with value choices inside (e.g. searched SE widths) cannot be slimmed as a whole
    probed = probe_edge(candidates)
    if probed is None or probed[0] % k:
        return None
    channels, stride = probed
    slim: dict[str, nn.Module] = {}
    for name, candidate in candidates.items():
        rebuilt = slim_module(candidate, k)
        if rebuilt is None:
            return None
        slim[name] = rebuilt
    x = torch.zeros(2, channels // k, _PROBE_SIZE, _PROBE_SIZE)
    for candidate in slim.values():
        out = _run_eval(candidate, x)
        if out is None or tuple(out.shape[1:]) != (channels // k, _PROBE_SIZE // stride, _PROBE_SIZE // stride):
            return None
    return slim, stride


def darts_edge_spec(label: str, candidates: dict[str, nn.Module]) -> EdgeSpec | None:
    """An :class:`~search_spaces.cell.EdgeSpec` for candidates of the DARTS operation family, else ``None``.

    The names must be DARTS primitives including at least one convolution (NNI's hub DARTS ops qualify); channels
    and stride come from :func:`probe_edge`, ``affine`` from the batch norms of the convolutions and ``pool_bn`` from
    whether the pooling candidates hold a batch norm.
    """
    names = [str(n) for n in candidates]
    if not set(names) <= set(PRIMITIVES) or not any('conv' in n for n in names):
        return None
    probed = probe_edge(candidates)
    if probed is None:
        return None
    norms = [m for n in names if 'conv' in n for m in candidates[n].modules() if isinstance(m, nn.BatchNorm2d)]
    pool_norms = [m for n in names if 'pool' in n for m in candidates[n].modules() if isinstance(m, nn.BatchNorm2d)]
    affine = bool(norms) and all(m.affine for m in norms)
    return EdgeSpec(label, 0, 0, probed[0], probed[1], affine, bool(pool_norms))


# ---------------------------------------------------------------------------------------------------------------------
# NNI Cell
# ---------------------------------------------------------------------------------------------------------------------

def _cell_candidates(cell: Cell, node: int, j: int) -> dict[str, nn.Module]:
    """Fresh candidates of edge ``(node, j)``: from the op factory for input ``j`` (so that the stride suits it),
    else deep copies of the cell's own candidates."""
    if cell.op_candidates_factory is not None:
        ops, _ = create_cell_op_candidates(cell.op_candidates_factory, node, 0, j)
        return ops
    choice = cell.ops[node - cell.num_predecessors][0]
    return {str(name): copy.deepcopy(choice[name]) for name in choice.names}


def _kept_candidates(candidates: dict[str, nn.Module], label: str, mutate_kwargs: dict[str, Any]
                     ) -> dict[str, nn.Module]:
    """The candidates of edge ``label`` that ``mutate_kwargs[CELL_OPERATIONS_KEY]`` keeps (all when not listed)."""
    kept = (mutate_kwargs.get(CELL_OPERATIONS_KEY) or {}).get(label)
    if kept is None:
        return candidates
    unknown = [op for op in kept if op not in candidates]
    if unknown or not kept:
        raise ValueError(f'{label}: operations to keep {list(kept)} must be a non-empty subset of its candidates '
                         f'{list(candidates)}')
    return {op: module for op, module in candidates.items() if op in kept}


def _stride_of(candidates: dict[str, nn.Module]) -> int:
    strides = [max(m.stride) if isinstance(m.stride, tuple) else int(m.stride)
               for c in candidates.values() for m in c.modules()
               if isinstance(getattr(m, 'stride', None), (int, tuple)) and isinstance(m, (nn.Conv2d, nn.MaxPool2d,
                                                                                          nn.AvgPool2d))]
    return max(strides, default=1)


class InputSampler:
    """Mixin of a supermodule of an input choice that takes only the inputs of its current sample (hard sampling).

    Inside a :class:`MixedCell` such a node decides which incoming edges run: those of :meth:`sampled_inputs` with
    their graph, the others not at all, or without graph when :meth:`probes_unchosen` (their outputs are needed for
    the gradient of the node's logits, e.g. ProxylessNAS's binary gates). The subclass's ``resample`` sets
    ``chosen``; its logits are NNI's ``_arch_alpha`` (``DifferentiableMixedInput``) unless :meth:`ranked_inputs` is
    overridden.
    """

    chosen: list[int] | None = None

    def sampled_inputs(self) -> list[int]:
        """The inputs of the current sample (drawn first if the module has none yet)."""
        if self.chosen is None:
            self.resample({})
        return self.chosen

    def probes_unchosen(self) -> bool:
        """Whether the inputs left out of the sample are computed too, without graph (default: no)."""
        return False

    def ranked_inputs(self) -> list[int]:
        """Every input, strongest logit first (ties to the lower index): the export takes the first ``n_chosen``."""
        logits = self._arch_alpha.detach().cpu().tolist()
        return sorted(range(len(logits)), key=lambda j: (-logits[j], j))


def strongest_operation(weights: dict[str, float]) -> str:
    """The operation with the largest weight that is not ``none`` (``none`` only when it is the sole candidate)."""
    return max((op for op in weights if op != 'none'), key=weights.get, default=next(iter(weights)))


class MixedCell(BaseSuperNetModule):
    """The supernet of an NNI ``Cell`` with the variant's edges and nodes (DARTS's cell, under NNI's labels).

    For each intermediate node ``i`` and each earlier node ``j`` there is one edge (the variant's ``edge_class``,
    label ``'{cell}/{i}_{j}'``) over the cell's candidates built for input ``j``, plus DARTS's ``none`` (a
    :class:`Zero`) when the candidates lack it, as NNI's ``DifferentiableMixedCell`` emulates with one more logit;
    node ``i`` is the variant's cell node class over its ``i`` incoming edges (label ``'{cell}/input_{i}'``,
    choosing ``num_ops_per_node`` of them, or all ``i`` when there are fewer). ``mutate_kwargs[CELL_OPERATIONS_KEY]``
    can restrict an edge's candidates (``none`` included) by edge label. The architecture parameters of these labels
    are created here and shared, through NNI's memo, by every cell with the same label. The output concatenates every
    intermediate node (NNI's one-shot reading of ``loose_end``); :meth:`sample` writes a discretization as NNI's
    ``op_{i}_{k}`` / ``input_{i}_{k}`` labels and :meth:`freeze` is the original cell's, so the sample is one of
    the user's space.

    The interface mirrors :class:`~search_spaces.cell.DartsCell` (``label``, ``node_indices``, ``edge``, ``inputs``)
    so that the variants' discretizations apply unchanged.
    """

    def __init__(self, cell: Cell, edge_class: type, node_class: type, memo: dict[str, Any],
                 mutate_kwargs: dict[str, Any]):
        super().__init__()
        self._original = (cell,)  # a tuple: the original cell is kept for freeze, not registered as a submodule
        self.label = cell.label
        self.num_nodes, self.num_predecessors = cell.num_nodes, cell.num_predecessors
        self.num_ops_per_node, self.concat_dim = cell.num_ops_per_node, cell.concat_dim
        self.preprocessor, self.postprocessor = cell.preprocessor, cell.postprocessor
        self.edges = nn.ModuleDict()
        self.inputs = nn.ModuleDict()
        for node in self.node_indices:
            for j in range(node):
                candidates = _cell_candidates(cell, node, j)
                if 'none' not in candidates:
                    candidates = {'none': Zero(_stride_of(candidates)), **candidates}
                label = hierarchical_label([*str(self.label).split('/'), f'{node}_{j}'])
                candidates = _kept_candidates(candidates, label, mutate_kwargs)
                alpha = self._shared_alpha(memo, label, len(candidates))
                choice = LayerChoice(candidates, label=label)
                self.edges[f'{node}_{j}'] = edge_class.from_layer_choice(choice, alpha, mutate_kwargs)
            label = hierarchical_label([*str(self.label).split('/'), f'input_{node}'])
            alpha = self._shared_alpha(memo, label, node)
            choice = InputChoice(node, min(self.num_ops_per_node, node), reduction='sum', label=label)
            self.inputs[str(node)] = node_class.from_input_choice(choice, alpha, mutate_kwargs)

    @staticmethod
    def _shared_alpha(memo: dict[str, Any], label: str, size: int) -> nn.Parameter:
        key = label + '/in_cell'  # NNI's suffix for parameters created inside a cell supermodule
        if key not in memo:
            memo[key] = nn.Parameter(torch.randn(size) * 1e-3)
        if len(memo[key]) != size:
            raise ValueError(f'{label}: cells sharing this label disagree on its size ({len(memo[key])} vs {size})')
        return memo[key]

    @property
    def original(self) -> Cell:
        return self._original[0]

    @property
    def node_indices(self) -> range:
        return range(self.num_predecessors, self.num_predecessors + self.num_nodes)

    def edge(self, node: int, j: int) -> nn.Module:
        return self.edges[f'{node}_{j}']

    def iter_edges(self) -> Iterator[tuple[int, int, nn.Module]]:
        """``(node, j, edge)`` of every edge, node by node and input by input."""
        for node in self.node_indices:
            for j in range(node):
                yield node, j, self.edge(node, j)

    def forward(self, *inputs: Any) -> Any:
        processed = preprocess_cell_inputs(self.num_predecessors, *inputs)
        states = list(self.preprocessor(processed))
        for node in self.node_indices:
            states.append(self.inputs[str(node)](self._edge_outputs(node, states)))
        return self.postprocessor(torch.cat(states[self.num_predecessors:], self.concat_dim), processed)

    def _edge_outputs(self, node: int, states: list[Any]) -> list[Any]:
        """The outputs of node ``node``'s incoming edges: all of them, or, for an :class:`InputSampler`, those of its
        sample (the others ``None``, or computed without graph when it probes them)."""
        choice = self.inputs[str(node)]
        if not isinstance(choice, InputSampler):
            return [self.edge(node, j)(states[j]) for j in range(node)]
        taken = set(choice.sampled_inputs())
        outputs: list[Any] = []
        for j in range(node):
            if j in taken:
                outputs.append(self.edge(node, j)(states[j]))
            elif choice.probes_unchosen():
                with torch.no_grad():
                    outputs.append(self.edge(node, j)(states[j]))
            else:
                outputs.append(None)
        return outputs

    def node_discretization(self, weights: dict[tuple[int, int], dict[str, float]]
                            ) -> dict[int, list[tuple[str, int]]] | None:
        """``{node: [(op, j), ...]}`` chosen by the nodes themselves when every node is an :class:`InputSampler`:
        its ``n_chosen`` strongest inputs (:meth:`InputSampler.ranked_inputs`), each with its edge's strongest
        operation in ``weights`` that is not ``none``. ``None`` when the nodes take every input (the variant's
        discretization then picks the inputs, the DARTS rule by default)."""
        nodes: dict[int, list[tuple[str, int]]] = {}
        for node in self.node_indices:
            choice = self.inputs[str(node)]
            if not isinstance(choice, InputSampler):
                return None
            nodes[node] = [(strongest_operation(weights[(node, j)]), j)
                           for j in choice.ranked_inputs()[:choice.n_chosen]]
        return nodes

    def sample(self, nodes: dict[int, list[tuple[str, int]]]) -> dict[str, Any]:
        """NNI sample entries from a discretization ``{node: [(op, j), ...]}`` (strongest first)."""
        result: dict[str, Any] = {}
        for node, pairs in nodes.items():
            for k in range(self.num_ops_per_node):
                op, j = pairs[k % len(pairs)]
                result[f'{self.label}/op_{node}_{k}'] = op
                result[f'{self.label}/input_{node}_{k}'] = [j]
        return result

    # ----- the space seen from outside: the original cell's choices -----
    def leaf_mutables(self, is_leaf: Any) -> Iterator[Mutable]:
        yield from self.original.leaf_mutables(is_leaf)

    def check_contains(self, sample: dict[str, Any]) -> Any:
        return self.original.check_contains(sample)

    def freeze(self, sample: dict[str, Any]) -> nn.Module:
        return self.original.freeze(sample)

    # ----- supermodule protocol: the cell's edges and nodes do the work -----
    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        return {}

    def export(self, memo: dict[str, Any]) -> dict[str, Any]:
        """The search loop discretizes the cell (``VariantLightningModule.export``)."""
        return {}

    def export_probs(self, memo: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def hook(cls, edge_class: type, node_class: type) -> Any:
        """A mutation hook replacing every NNI ``Cell`` with a :class:`MixedCell` of these edge and node classes."""
        def mutate(module: nn.Module, name: str, memo: dict[str, Any], mutate_kwargs: dict[str, Any]) -> Any:
            if isinstance(module, Cell):
                return cls(module, edge_class, node_class, memo, mutate_kwargs)
            return None
        return mutate


def cell_choice_labels(cell: Cell) -> list[str]:
    """NNI's labels of a cell's choices (``op_{i}_{k}`` and ``input_{i}_{k}``), for messages."""
    return [m.label for m in cell.simplify().values() if isinstance(m, (Categorical, CategoricalMultiple))]


def is_cell_node(module: nn.Module) -> bool:
    """Whether an ``InputChoice`` is a node of one of our cells (a plain sum of mixed edges), not a free choice."""
    return bool(getattr(module, 'darts_node', False))


def mark_cell_nodes(module: nn.Module, name: str, memo: dict[str, Any], mutate_kwargs: dict[str, Any]) -> None:
    """A mutation hook: tag the input choices of a ``DartsCell`` (they are nodes, not free input choices)."""
    from search_spaces.cell import DartsCell
    if isinstance(module, DartsCell):
        for choice in module.inputs.values():
            if isinstance(choice, InputChoice):
                choice.darts_node = True


def suppress_supernet_modules(module: nn.Module, name: str, memo: dict[str, Any], mutate_kwargs: dict[str, Any]) -> Any:
    """A mutation hook: supermodules built by another hook (a cell's edges) are not mutated again."""
    return True if isinstance(module, BaseSuperNetModule) else None


def dangling(module: nn.Module) -> bool:
    """Whether ``module`` is an NNI mutable module that no hook has replaced yet."""
    return isinstance(module, MutableModule) and bool(module.mutables) and not isinstance(module, BaseSuperNetModule)
