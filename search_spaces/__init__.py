"""Search spaces for nni-darts-variants, written with NNI's model-space primitives."""
from __future__ import annotations

from .darts import DartsSpace

__all__ = ['DartsSpace']
