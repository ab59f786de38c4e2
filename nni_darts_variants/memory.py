"""Activation-memory accounting on any device: bytes of the tensors autograd saves for backward."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

__all__ = ['SavedTensorCounter', 'saved_tensor_bytes']


class SavedTensorCounter:
    """Counts the bytes of tensors saved for backward while active (``torch.autograd.graph.saved_tensors_hooks``).

    Each distinct storage is counted once (a parameter or an input saved by several ops costs its memory once).
    Parameters are excluded unless ``include_parameters``: they are resident anyway, activations are what a
    supernet adds.
    """

    def __init__(self, include_parameters: bool = False, parameters: Any = ()):
        self.include_parameters = include_parameters
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in parameters}
        self._seen: set[tuple[int, int]] = set()
        self.bytes = 0
        self.count = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._seen and (self.include_parameters or key[0] not in self._param_ptrs):
            self._seen.add(key)
            self.bytes += storage.nbytes()
            self.count += 1
        return tensor

    @contextmanager
    def active(self) -> Iterator['SavedTensorCounter']:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def saved_tensor_bytes(fn: Callable[[], Any], parameters: Any = (), include_parameters: bool = False) -> int:
    """Bytes saved for backward while ``fn()`` runs (typically one forward pass of a search step)."""
    counter = SavedTensorCounter(include_parameters=include_parameters, parameters=parameters)
    with counter.active():
        fn()
    return counter.bytes
