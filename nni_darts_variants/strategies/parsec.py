"""PARSEC (Casale, Gordon, Fusi 2019): sampled child networks, importance-weighted Monte Carlo empirical Bayes.

No official code exists; this is a reconstruction from the paper's description (see :class:`Parsec`).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from search_spaces.cell import DartsCell, edge_label, input_label
from ..registry import register_strategy
from .base import DartsVariant, MixedEdge, MixedNode, VariantLightningModule, first_per_label, loss_of
from .nni_spaces import MixedCell

__all__ = ['Parsec', 'ParsecEdge', 'ParsecNode', 'ParsecInput', 'ParsecLightning', 'importance_weights', 'sample_architecture',
           'log_prior', 'importance_weighted_backward']


def importance_weights(log_likelihoods: torch.Tensor) -> torch.Tensor:
    """Self-normalized importance weights ``omega_k = p(y|a_k) / sum_j p(y|a_j)`` (softmax, i.e. log-sum-exp)."""
    return F.softmax(log_likelihoods.detach(), dim=0)


def importance_weighted_backward(run_sample: Callable[[], tuple[torch.Tensor, torch.Tensor]], num_samples: int,
                                 parameters: Iterable[nn.Parameter],
                                 backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> torch.Tensor:
    """Accumulate ``sum_k omega_k grad(loss_k)`` into ``.grad``, one child network at a time.

    ``run_sample()`` samples a child and returns ``(loss, log_likelihood)``. The weights are normalized online
    (running log-sum-exp): after sample ``k`` the gradients already accumulated are scaled by
    ``exp(logZ_{k-1} - logZ_k)`` and the new one enters with ``exp(l_k - logZ_k)``, so only one child's graph is alive
    at a time. ``.grad`` should be cleared before. Returns the importance-weighted loss (detached).
    """
    parameters = list(parameters)
    log_norm: torch.Tensor | None = None
    weighted_loss: torch.Tensor | None = None
    for _ in range(num_samples):
        loss, log_likelihood = run_sample()
        log_likelihood = log_likelihood.detach()
        new_norm = log_likelihood if log_norm is None else torch.logaddexp(log_norm, log_likelihood)
        if log_norm is not None:
            keep = torch.exp(log_norm - new_norm)
            for p in parameters:
                if p.grad is not None:
                    p.grad.mul_(keep.to(p.grad.dtype))
        weight = torch.exp(log_likelihood - new_norm)
        backward(weight * loss)
        term = weight * loss.detach()
        weighted_loss = term if weighted_loss is None else weighted_loss * keep + term
        log_norm = new_norm
    return weighted_loss


class ParsecEdge(MixedEdge):
    """One operation choice of the prior: runs only its sampled candidate, nothing when its edge is not chosen.

    ``none`` is outside the prior unless ``sample_none`` (its logit is masked); the logits are the NNI memo alpha.
    """

    def __init__(self, candidates: dict[str, nn.Module], alpha: nn.Parameter, label: str, *,
                 sample_none: bool = False):
        super().__init__(candidates, alpha, label, sample_none=sample_none)
        is_none = torch.tensor([name == 'none' for name in self.names])
        self.register_buffer('_is_none', is_none, persistent=False)
        self.register_buffer('_excluded', is_none & (not sample_none) & ~is_none.all(), persistent=False)
        self.sampled: int | None = None
        self.enabled = True

    def prior_logits(self) -> torch.Tensor:
        return self.alpha.masked_fill(self._excluded, float('-inf'))

    def op_weights(self) -> torch.Tensor:
        return F.softmax(self.prior_logits(), -1)

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        if self.label in memo:
            self.sampled = self.names.index(memo[self.label])
        else:
            self.sampled = int(torch.multinomial(self.op_weights().detach(), 1))
        return {self.label: self.names[self.sampled]}

    def log_prob(self) -> torch.Tensor:
        """``log p(op | pi)`` of the sampled operation (differentiable in the logits)."""
        return F.log_softmax(self.prior_logits(), -1)[self.sampled]

    def mode(self) -> str:
        """The most probable operation, never ``none`` when another candidate exists."""
        logits = self.alpha.detach().masked_fill(self._is_none, float('-inf'))
        return self.names[int(torch.argmax(logits))] if torch.isfinite(logits).any() else self.names[0]

    def export(self, memo: dict[str, Any]) -> dict[str, Any]:
        return {} if self.label in memo else {self.label: self.mode()}

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled:
            return None
        if self.sampled is None:
            self.resample({})
        return self[self.names[self.sampled]](x)

    @classmethod
    def from_layer_choice(cls, module: Any, alpha: nn.Parameter, mutate_kwargs: dict[str, Any]) -> 'ParsecEdge':
        return cls(module.candidates, alpha, module.label, sample_none=mutate_kwargs.get('sample_none', False))


class ParsecNode(MixedNode):
    """One input choice of the prior: ``n_chosen`` distinct inputs drawn one after another without replacement.

    ``log p = sum_t log softmax(pi over the inputs not drawn yet)[j_t]``, the log-probability of the ordered draw (a
    valid score for the same marginal likelihood as the unordered set). The node sums only the chosen inputs.
    """

    def __init__(self, n_candidates: int, n_chosen: int, label: str, alpha: nn.Parameter | None = None,
                 **config: Any):
        if alpha is None or len(alpha) != n_candidates:
            raise ValueError(f'{label}: PARSEC needs an alpha of length {n_candidates} in the NNI memo')
        if not 1 <= n_chosen <= n_candidates:
            raise ValueError(f'{label}: cannot choose {n_chosen} of {n_candidates} inputs')
        super().__init__(n_candidates, n_chosen, label, alpha, **config)
        self.chosen: list[int] | None = None

    @property
    def alpha(self) -> nn.Parameter:
        return self._memo_alpha

    def _masked_logits(self, drawn: list[int]) -> torch.Tensor:
        mask = torch.zeros(len(self.alpha), dtype=torch.bool, device=self.alpha.device)
        mask[drawn] = True
        return self.alpha.masked_fill(mask, float('-inf'))

    def resample(self, memo: dict[str, Any]) -> dict[str, Any]:
        if self.label in memo:
            self.chosen = list(memo[self.label])
            return {}
        drawn: list[int] = []
        for _ in range(self.n_chosen):
            probs = F.softmax(self._masked_logits(drawn).detach(), -1)
            drawn.append(int(torch.multinomial(probs, 1)))
        self.chosen = drawn
        return {self.label: list(drawn)}

    def log_prob(self) -> torch.Tensor:
        """``log p(j_1, ..., j_n | pi)`` of the ordered draw."""
        return sum(F.log_softmax(self._masked_logits(self.chosen[:t]), -1)[j] for t, j in enumerate(self.chosen))

    def mode(self) -> list[int]:
        """The ``n_chosen`` inputs with the largest logits (ties to the lower index), sorted."""
        logits = self.alpha.detach().tolist()
        return sorted(sorted(range(len(logits)), key=lambda j: (-logits[j], j))[:self.n_chosen])

    def forward(self, inputs: list[torch.Tensor | None]) -> torch.Tensor:
        if self.chosen is None:
            self.resample({})
        return sum(inputs[j] for j in self.chosen)

    def export(self, memo: dict[str, Any]) -> dict[str, Any]:
        return {} if self.label in memo else {self.label: self.mode()}

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        yield self.alpha


class ParsecInput(ParsecNode):
    """PARSEC on a free ``InputChoice``: the same prior over ``n_chosen`` inputs; the child reduces only the chosen
    ones (``sum``, ``mean`` or ``concat``, as the choice says)."""

    @classmethod
    def from_input_choice(cls, module: Any, alpha: nn.Parameter | None, mutate_kwargs: dict[str, Any]) -> 'ParsecInput':
        node = cls(module.n_candidates, module.n_chosen or 1, module.label, alpha)
        node.reduction = module.reduction
        return node

    @classmethod
    def mutate(cls, module: nn.Module, name: str, memo: dict[str, Any], mutate_kwargs: dict[str, Any]) -> Any:
        from nni.nas.nn.pytorch import InputChoice
        from .nni_spaces import is_cell_node
        if type(module) is InputChoice and not is_cell_node(module):
            return cls.from_input_choice(module, memo.get(module.label), mutate_kwargs)
        return None

    def forward(self, inputs: list[torch.Tensor | None]) -> torch.Tensor:
        if self.chosen is None:
            self.resample({})
        chosen = [inputs[j] for j in sorted(self.chosen)]
        if self.reduction == 'concat':
            return torch.cat(chosen, 1)
        return sum(chosen) / len(chosen) if self.reduction == 'mean' else sum(chosen)


def sample_architecture(model: nn.Module) -> dict[str, Any]:
    """Draw a child ``a ~ p(a | pi)`` (one draw per label, shared by cells of a type) and switch off, in every
    :class:`DartsCell`, the edges whose input was not chosen."""
    sample: dict[str, Any] = {}
    for module in model.modules():
        if isinstance(module, (ParsecEdge, ParsecNode)):
            sample.update(module.resample(memo=sample))
    for cell in model.modules():
        if isinstance(cell, (DartsCell, MixedCell)):
            for node in cell.node_indices:
                chosen = sample.get(cell.inputs[str(node)].label)
                for j in range(node):
                    edge = cell.edge(node, j)
                    if isinstance(edge, ParsecEdge) and chosen is not None:
                        edge.enabled = j in chosen
    return sample


def log_prior(model: nn.Module) -> torch.Tensor:
    """``log p(a | pi)`` of the current child, over the choices it uses (ops of switched-off edges are left out:
    they do not change the likelihood, so their score terms would only add variance)."""
    choices = first_per_label(model.modules(), (ParsecEdge, ParsecNode))
    terms = [c.log_prob() for c in choices.values() if not isinstance(c, ParsecEdge) or c.enabled]
    return torch.stack(terms).sum()


def _batch_size(batch: Any) -> int:
    while isinstance(batch, (list, tuple, dict)):
        batch = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return len(batch)


class ParsecLightning(VariantLightningModule):
    """PARSEC loop: K children per step, importance-weighted weight and prior updates."""

    def resample(self) -> dict[str, Any]:
        return sample_architecture(self.training_module)

    def _sample_loss(self, batch: Any, batch_idx: int, loss_fn: Callable[[Any, int], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        self.resample()
        loss = loss_fn(batch, batch_idx)
        return loss, -loss.detach() * _batch_size(batch)

    def compute_arch_gradients(self, trn_batch: Any, val_batch: Any, batch_idx: int) -> torch.Tensor:
        """``pi.grad = -sum_k omega_k grad log p(a_k | pi)`` on the validation batch (forwards without graphs)."""
        log_likelihoods, log_priors, losses = [], [], []
        for _ in range(self.strategy.num_samples):
            with torch.no_grad():
                loss, log_likelihood = self._sample_loss(val_batch, batch_idx, self.task_loss)
            losses.append(loss)
            log_likelihoods.append(log_likelihood)
            log_priors.append(log_prior(self.training_module))
        omega = importance_weights(torch.stack(log_likelihoods))
        weighted_loss = (omega * torch.stack(losses)).sum()
        # A hardware cost enters the prior's gradient: its expectation under the prior, in the penalty's form.
        cost_term = self.penalized_loss(weighted_loss, val_batch) - weighted_loss
        self.manual_backward(-(omega * torch.stack(log_priors)).sum() + cost_term)
        return weighted_loss + cost_term.detach()

    def _weight_loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return loss_of(self.training_module.training_step(batch, batch_idx))

    def weight_backward(self, trn_batch: Any, batch_idx: int) -> torch.Tensor:
        """Shared weights: ``sum_k omega_k grad loss_k`` over K children on the training batch (the base steps)."""
        return importance_weighted_backward(
            lambda: self._sample_loss(trn_batch, 2 * batch_idx + 1, self._weight_loss), self.strategy.num_samples,
            self.weight_parameters(), self.manual_backward)

    def export_cell(self, cell: DartsCell) -> dict[str, Any]:
        """The mode of the prior: top-``n_chosen`` input logits per node, argmax op logit (not ``none``) per edge."""
        if isinstance(cell, MixedCell):
            return cell.sample({node: [(cell.edge(node, j).mode(), j) for j in cell.inputs[str(node)].mode()]
                                for node in cell.node_indices})
        sample: dict[str, Any] = {}
        for node, j, edge in cell.iter_edges():
            sample.setdefault(input_label(cell.label, node), cell.inputs[str(node)].mode())
            sample[edge_label(cell.label, node, j)] = edge.mode()
        return sample


@register_strategy
class Parsec(DartsVariant):
    """PARSEC: a categorical prior over the DARTS cell, learnt by importance-weighted Monte Carlo empirical Bayes.

    `Casale, Gordon, Fusi. Probabilistic Neural Architecture Search. arXiv:1902.05116, 2019
    <https://arxiv.org/abs/1902.05116>`__. **No official code exists: this is a reconstruction from the paper's
    description; the equations and defaults below are unverified against the paper.**

    Prior ``p(a | pi)``: independent categoricals, one per operation choice (the LayerChoice alphas, ``none`` left out
    unless ``sample_none``) and one per input choice (the InputChoice alphas; the two inputs of a node are drawn one
    after another without replacement). Each step draws ``num_samples`` children, each run as an ordinary discrete
    network (one candidate per used edge, unchosen edges skipped), one after another:

    * architecture step, validation batch: ``l_k = -sum CE`` (forwards without graphs),
      ``omega = softmax(l)``, ``pi.grad = -sum_k omega_k grad log p(a_k | pi)`` (for a categorical,
      ``-sum_k omega_k (onehot(a_k) - softmax(pi))``), then the architecture optimizer;
    * weight step, training batch, fresh children: ``grad_w = sum_k omega_k grad_w CE_mean(a_k)`` accumulated child
      by child with online normalization, so activation memory is that of one child whatever ``num_samples`` is.

    Export: the mode of the prior (top-2 input logits per node, argmax op logit per edge, never ``none``).

    Parameters
    ----------
    num_samples
        K, children per step (default 4, a choice of this reconstruction; K=1 gives no learning signal for pi).
    sample_none
        Whether ``none`` is in the prior over operations (default ``False``: a child never has a zero edge).
    **kwargs
        See :class:`~nni_darts_variants.strategies.base.DartsVariant` (DARTS defaults: Adam 3e-4, (0.5, 0.999),
        1e-3; unverified for PARSEC). A hardware ``cost`` (or NNI ``penalty``) enters the prior's gradient:
        ``penalized(L) - L`` with ``L`` the importance-weighted loss and the expected cost under the prior
        (``softmax`` of the op logits; each DARTS edge weighted by its share ``2 / n``) is added to the surrogate.
    """

    edge_class: ClassVar[type[MixedEdge]] = ParsecEdge
    node_class: ClassVar[type[MixedNode]] = ParsecNode
    input_class = ParsecInput
    mixed_op_policy = None
    darts_fallback_for = ('repeat depth',)
    module_class = ParsecLightning

    def __init__(self, *, num_samples: int = 4, sample_none: bool = False, **kwargs: Any):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f'num_samples must be a positive integer (K >= 2 to learn), got {num_samples!r}')
        super().__init__(**kwargs)
        self.num_samples = num_samples
        self.sample_none = bool(sample_none)

    def mutate_kwargs(self) -> dict[str, Any]:
        return {'sample_none': self.sample_none}
