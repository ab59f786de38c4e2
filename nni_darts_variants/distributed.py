"""Searching on several devices (Lightning DDP) with one architecture on every rank.

Data-parallel search splits each batch pair over the ranks and averages the gradients, so the architecture
parameters must stay bit-identical on every rank, and so must every random draw of the sampling variants (GDAS,
ProxylessNAS, PARSEC, DropNAS): otherwise each rank trains, and finally exports, its own architecture (NNI issue
5013). How this is ensured:

* **Strategy.** :func:`lightning_strategy` maps ``train.strategy`` to a Lightning DDP strategy with
  ``find_unused_parameters=True``: sampled, dropped or unused candidates (and the unused node alphas) have no
  gradient in a step, which plain DDP refuses. Lightning chooses the backend (gloo on the CPU, NCCL on GPUs).
* **Gradients.** Lightning's manual optimization all-reduces every ``manual_backward`` (the weight and first-order
  architecture gradients). Gradients computed with ``torch.autograd.grad`` (second-order DARTS) are not reduced by
  DDP, so :class:`DistributedArchSync` averages the architecture gradients across ranks right before every
  architecture optimizer step (identical values stay identical; ``None`` gradients stay ``None``).
* **Random draws.** Every rank is seeded with the same seed by the runner and runs the same code, so it consumes
  its random numbers in the same order. :class:`DistributedArchSync` also copies rank 0's torch (and CUDA) random
  state to every rank when training starts, and at each epoch end checks the random states (copying rank 0's again
  on a mismatch, with a warning) and the architecture parameters (a mismatch is an error: it is a bug).
* **Files.** Only global rank 0 writes the run folder (:func:`is_global_zero`).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

__all__ = ['DDP_STRATEGIES', 'lightning_strategy', 'device_count', 'is_global_zero', 'world_size',
           'DistributedArchSync', 'ArchitectureMismatchError', 'average_gradients', 'check_same_architecture']

_logger = logging.getLogger(__name__)

#: ``train.strategy`` values besides ``auto``: Lightning's script-relaunching DDP (``find_unused_parameters=True``).
#: ``ddp_spawn``/``ddp_fork`` are refused: their ranks run in child processes whose callbacks (the per-epoch history,
#: the checks) never come back to the parent that writes the run folder, and ``ddp_spawn`` fails to pickle the
#: search on CPU (``ValueError: bad value(s) in fds_to_keep``).
DDP_STRATEGIES = ('ddp',)


class ArchitectureMismatchError(RuntimeError):
    """The architecture parameters differ between ranks."""


def device_count(devices: Any, accelerator: str) -> int:
    """How many devices (processes) Lightning will use for ``devices`` (an int, a list, ``-1`` or ``'auto'``)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().lstrip('-').isdigit():
        devices = int(devices)
    if isinstance(devices, str) and ',' in devices:
        return len([d for d in devices.split(',') if d.strip()])
    if devices in (-1, 'auto'):
        gpu = accelerator in ('gpu', 'cuda', 'auto') and torch.cuda.is_available()
        return torch.cuda.device_count() if gpu and devices == -1 else 1
    return int(devices)


def lightning_strategy(strategy: str, devices: Any = 1, accelerator: str = 'auto') -> str:
    """The Lightning ``strategy`` for ``train.strategy``: DDP launchers get ``find_unused_parameters=True``.

    ``'auto'`` stays ``'auto'`` on one device and becomes ``'ddp_find_unused_parameters_true'`` on several.

    Raises
    ------
    ValueError
        For a strategy other than ``'auto'`` and :data:`DDP_STRATEGIES` (spawned or forked ranks: see there; FSDP and
        DeepSpeed shard the parameters, which the architecture step does not support).
    """
    name = str(strategy)
    base = name[:-len('_find_unused_parameters_true')] if name.endswith('_find_unused_parameters_true') else name
    if base == 'auto':
        return 'ddp_find_unused_parameters_true' if device_count(devices, accelerator) > 1 else 'auto'
    if base not in DDP_STRATEGIES:
        raise ValueError(f'train.strategy: {strategy!r} is not supported; use auto or ddp (ddp re-launches the '
                         'command once per device; spawned or forked ranks lose the run\'s history, FSDP and '
                         'DeepSpeed shard the architecture parameters)')
    return f'{base}_find_unused_parameters_true'


def world_size() -> int:
    """The number of processes in the default process group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_global_zero() -> bool:
    """Whether this process is global rank 0 (the one that writes files); true when not distributed.

    Before the process group exists, the rank comes from the launcher's environment (``RANK``/``LOCAL_RANK``), as
    Lightning reads it at import, and the machine's from ``NODE_RANK`` (or torchrun's ``GROUP_RANK``).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    from pytorch_lightning.utilities.rank_zero import rank_zero_only
    node_rank = int(os.environ.get('NODE_RANK') or os.environ.get('GROUP_RANK') or 0)  # several machines
    return getattr(rank_zero_only, 'rank', 0) == 0 and node_rank == 0


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        states['cuda'] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states['cpu'])
    if 'cuda' in states and device.type == 'cuda':
        torch.cuda.set_rng_state(states['cuda'], device)


def _digest(states: dict[str, torch.Tensor]) -> bytes:
    h = hashlib.sha256()
    for key in sorted(states):
        h.update(states[key].cpu().numpy().tobytes())
    return h.digest()


class DistributedArchSync(pl.Callback):
    """Keeps the architecture and the random draws identical on every rank (does nothing on one process).

    See the module docstring. ``mismatched_rng_epochs`` lists the epochs at whose end a random-state mismatch was
    found (and repaired).
    """

    def __init__(self) -> None:
        self.mismatched_rng_epochs: list[int] = []

    @staticmethod
    def _active() -> bool:
        return world_size() > 1

    def _broadcast_rng(self, pl_module: Any) -> None:
        box = [_rng_states(pl_module.device) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        _set_rng_states(box[0], pl_module.device)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._active():
            self._broadcast_rng(pl_module)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self._active() or not getattr(optimizer, 'is_arch_optimizer', False):
            return
        params = [p for group in optimizer.param_groups for p in group['params']]
        average_gradients(params, pl_module.device)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active():
            return
        device = pl_module.device
        digest = torch.tensor(list(_digest(_rng_states(device))), dtype=torch.uint8, device=device)
        digests = [torch.empty_like(digest) for _ in range(world_size())]
        dist.all_gather(digests, digest)
        if any(not torch.equal(d, digests[0]) for d in digests):
            self.mismatched_rng_epochs.append(trainer.current_epoch)
            _logger.warning('epoch %d: the random states differ between ranks (some code drew random numbers on only '
                            'some ranks); using rank 0\'s from now on', trainer.current_epoch)
            self._broadcast_rng(pl_module)
        check_same_architecture(pl_module.arch_parameters(), device, f'epoch {trainer.current_epoch}')


def average_gradients(params: list[torch.Tensor], device: torch.device) -> None:
    """All-reduce the mean of the gradients of ``params``; a gradient that is ``None`` on every rank stays ``None``."""
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=device)
    grads = [p.grad.detach().to(device, torch.float64).flatten() if p.grad is not None
             else torch.zeros(p.numel(), dtype=torch.float64, device=device) for p in params]
    flat = torch.cat([flags, *grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = len(params)
    for i, p in enumerate(params):
        chunk = flat[offset:offset + p.numel()]
        offset += p.numel()
        if flat[i] > 0:
            p.grad = chunk.view_as(p).to(p.dtype).clone()


def check_same_architecture(params: list[torch.Tensor], device: torch.device, where: str) -> None:
    """Raise :class:`ArchitectureMismatchError` unless ``params`` are bit-identical on every rank."""
    flat = torch.cat([p.detach().flatten().to(device) for p in params]) if params else torch.zeros(0, device=device)
    gathered = [torch.empty_like(flat) for _ in range(world_size())]
    dist.all_gather(gathered, flat)
    differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if differ:
        gap = max(float((gathered[r] - gathered[0]).abs().max()) for r in differ)
        raise ArchitectureMismatchError(f'{where}: the architecture parameters of rank(s) {differ} differ from rank '
                                        f'0\'s (max |diff| {gap:.3g}); each rank would export its own architecture')
