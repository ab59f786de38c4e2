"""Tiny spaces, data and searches for tests, examples and benchmarks (CPU, seconds).

Used by the registry conformance suite (``tests/test_conformance.py``) so that every registered strategy gets the
same checks, and by per-variant tests.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from .synthetic import learnable_images

__all__ = ['tiny_space', 'tiny_dataset', 'tiny_loaders', 'tiny_evaluator', 'run_tiny_search', 'TinySearch',
           'ArchSnapshot']


def tiny_space(width: int = 8, num_cells: int = 3, num_nodes: int = 4, **kwargs: Any):
    """A 3-cell DARTS space on 1x8x8 inputs with 10 classes (reductions at cells 1 and 2)."""
    from search_spaces import DartsSpace
    kwargs.setdefault('dataset', 'digits')
    return DartsSpace(width=width, num_cells=num_cells, num_nodes=num_nodes, **kwargs)


#: Synthetic images whose class sets the mean of one quadrant (library code: :mod:`nni_darts_variants.synthetic`).
tiny_dataset = learnable_images


def tiny_loaders(n: int = 32, batch_size: int = 8, seed: int = 0, **kwargs: Any) -> tuple[DataLoader, DataLoader]:
    """Weight and architecture loaders over two disjoint synthetic halves."""
    train = tiny_dataset(n, seed=seed, **kwargs)
    val = tiny_dataset(n, seed=seed + 1, **kwargs)
    return DataLoader(train, batch_size=batch_size), DataLoader(val, batch_size=batch_size)


def tiny_evaluator(max_epochs: int = 1, num_classes: int = 10, callbacks: list | None = None,
                   loaders: tuple[DataLoader, DataLoader] | None = None, learning_rate: float = 0.025, **trainer: Any):
    """NNI's own ``Classification`` evaluator on the tiny data (CPU, no logger, no checkpoints)."""
    from nni.nas.evaluator.pytorch import Classification
    train, val = loaders or tiny_loaders()
    trainer.setdefault('enable_progress_bar', False)
    trainer.setdefault('enable_model_summary', False)
    trainer.setdefault('logger', False)
    trainer.setdefault('enable_checkpointing', False)
    trainer.setdefault('accelerator', 'cpu')
    return Classification(train_dataloaders=train, val_dataloaders=val, max_epochs=max_epochs,
                          num_classes=num_classes, learning_rate=learning_rate, optimizer=torch.optim.SGD,
                          callbacks=callbacks or [], **trainer)


class ArchSnapshot:
    """A Lightning callback that records the architecture parameters at train start and end, and the optimizers."""

    def __new__(cls, *args: Any, **kwargs: Any):
        import pytorch_lightning as pl

        class _Snapshot(pl.Callback):
            def __init__(self) -> None:
                self.before: list[torch.Tensor] = []
                self.after: list[torch.Tensor] = []
                self.weight_optimizer_params: set[int] = set()
                self.arch_optimizer_params: set[int] = set()
                self.arch_ids: set[int] = set()
                self.losses: list[float] = []

            def on_train_start(self, trainer: Any, pl_module: Any) -> None:
                params = pl_module.arch_parameters()
                self.before = [p.detach().clone() for p in params]
                self.arch_ids = {id(p) for p in params}
                for opt in trainer.optimizers:
                    ids = {id(p) for g in opt.param_groups for p in g['params']}
                    if getattr(opt, 'is_arch_optimizer', False):
                        self.arch_optimizer_params |= ids
                    else:
                        self.weight_optimizer_params |= ids

            def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                loss = outputs['loss'] if isinstance(outputs, dict) else outputs
                if loss is not None:
                    self.losses.append(float(loss))

            def on_train_end(self, trainer: Any, pl_module: Any) -> None:
                self.after = [p.detach().clone() for p in pl_module.arch_parameters()]

        return _Snapshot()


@dataclass
class TinySearch:
    """What :func:`run_tiny_search` observed."""
    strategy: Any
    sample: dict[str, Any]
    snapshot: Any
    experiment: Any = field(repr=False)


def run_tiny_search(strategy: Any, space: Any = None, max_epochs: int = 1, seed: int = 0,
                    loaders: tuple[DataLoader, DataLoader] | None = None, workdir: str | None = None) -> TinySearch:
    """Run ``strategy`` through NNI's ``NasExperiment`` on the tiny space and data; return what happened.

    ``HOME`` should already point at a temporary folder (NNI writes ``~/nni-experiments``); the experiment's working
    directory is ``workdir`` or a new temporary folder.
    """
    import pytorch_lightning as pl
    from nni.nas.experiment import NasExperiment

    pl.seed_everything(seed, verbose=False)
    space = space if space is not None else tiny_space()
    snapshot = ArchSnapshot()
    evaluator = tiny_evaluator(max_epochs=max_epochs, callbacks=[snapshot], loaders=loaders)
    experiment = NasExperiment(space, evaluator, strategy)
    experiment.config.experiment_working_directory = workdir or tempfile.mkdtemp(prefix='nni-darts-')
    os.makedirs(experiment.config.experiment_working_directory, exist_ok=True)
    experiment.run()
    sample = experiment.export_top_models(formatter='dict')[0]
    return TinySearch(strategy, sample, snapshot, experiment)


def count_depthwise_convs(monkeypatch: Any) -> list[int]:
    """Patch ``torch.nn.functional.conv2d`` to record the groups of every depthwise call; returns the record list."""
    import torch.nn.functional as F
    calls: list[int] = []
    original = F.conv2d

    def counting(input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        groups = kwargs.get('groups', args[4] if len(args) > 4 else 1)
        if groups > 1 and groups == input.shape[1]:
            calls.append(groups)
        return original(input, weight, *args, **kwargs)

    monkeypatch.setattr(F, 'conv2d', counting)
    return calls
