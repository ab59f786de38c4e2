"""Memory accounting on any device: bytes of the tensors autograd saves for backward (total and live peak), and the
process RSS (sampled in a thread) for CPU peaks."""
from __future__ import annotations

import ctypes
import gc
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

__all__ = ['LiveSavedTensorCounter', 'RssSampler', 'SavedTensorCounter', 'release_memory', 'rss', 'saved_tensor_bytes']


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


class _Saved:
    """What the pack hook stores instead of a tensor: its death tells the counter that autograd released it."""
    __slots__ = ('tensor', 'key', 'owner')

    def __init__(self, tensor: torch.Tensor, key: tuple[int, int], owner: 'LiveSavedTensorCounter'):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self) -> None:
        self.owner._release(self.key)


class LiveSavedTensorCounter(SavedTensorCounter):
    """A :class:`~nni_darts_variants.memory.SavedTensorCounter` that also knows when autograd frees what it saved.

    ``peak_bytes`` is the most bytes of distinct storages held for backward at any moment (what a step needs, since
    the architecture and the weight graphs of a search step are not alive together); ``bytes`` is the total over
    all graphs, counting a storage again only if it was released and saved anew (the plain counter keys storages by
    address, which the allocator reuses across graphs).
    """

    def __init__(self, include_parameters: bool = False, parameters: Any = ()):
        super().__init__(include_parameters=include_parameters, parameters=parameters)
        self._live: dict[tuple[int, int], int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def _pack(self, tensor: torch.Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] in self._param_ptrs and not self.include_parameters:
            return tensor
        holders = self._live.get(key, 0)
        if holders == 0:
            self.bytes += key[1]
            self.count += 1
            self.live_bytes += key[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self._live[key] = holders + 1
        return _Saved(tensor, key, self)

    def _release(self, key: tuple[int, int]) -> None:
        holders = self._live.pop(key, 0) - 1
        if holders > 0:
            self._live[key] = holders
        elif holders == 0:
            self.live_bytes -= key[1]

    def active(self) -> Any:
        def unpack(saved: Any) -> torch.Tensor:
            return saved.tensor if isinstance(saved, _Saved) else saved
        return torch.autograd.graph.saved_tensors_hooks(self._pack, unpack)


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def release_memory(device: str) -> None:
    """Collect garbage and hand freed memory back (``malloc_trim`` on glibc; the CUDA cache on CUDA)."""
    gc.collect()
    if device == 'cuda':
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Samples the process RSS in a thread while running; ``peak`` is the largest sample (bytes)."""

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak = rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss())
        return self.peak
