"""Parameter counting: the one ``count_parameters`` of the package (bundle, retrain, bench and evaluation)."""
from __future__ import annotations

import torch.nn as nn

__all__ = ['count_parameters']


def count_parameters(model: nn.Module, *, include_auxiliary: bool = True) -> int:
    """The sum of ``numel`` over ``model``'s parameters; ``include_auxiliary=False`` leaves out those with
    ``auxiliary`` in their name (the DARTS auxiliary head, as the official ``count_parameters_in_MB``)."""
    return sum(p.numel() for name, p in model.named_parameters() if include_auxiliary or 'auxiliary' not in name)
