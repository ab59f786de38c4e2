"""Run a search from a configuration: data, space, strategy, NNI experiment, and the run folder it leaves.

The run folder holds the resolved config (``config.yaml``), the genotype (``genotype.json``), NNI's sample dict
(``sample.json``), the final architecture parameters and their history per epoch (``alphas.json``,
``alpha_history.json``), the Lightning CSV metrics (``metrics/``), the result bundle (``bundle/``: cell pictures,
weight heatmaps and histories, size and FLOPs, the retrain command; see :mod:`nni_darts_variants.bundle`), and
``result.json`` once the search finished.

The package's modules: :mod:`.config` (schema and :func:`resolve_config`), :mod:`.callbacks` (Lightning
callbacks), :mod:`.evaluator` (the NNI evaluator, its loggers, the from-scratch evaluation), :mod:`.rundir` (the
run folder and its lock), :mod:`.checkpoints` (atomic checkpoints, ``previous.ckpt``, the resume's choice),
:mod:`.interrupt` (SIGTERM and Ctrl-C) and :mod:`.runner` (:func:`run_search`).
"""
from __future__ import annotations

from .callbacks import (ChannelsLast, DivergenceError, DivergenceGuard, RandomState, SearchMonitor,  # noqa: F401
                        arch_state)
from .checkpoints import AtomicCheckpointIO, CheckpointWriteError, choose_checkpoint, load_checkpoint  # noqa: F401
from .config import OPEN_SECTIONS, SEARCH_SCHEMA, resolve_config  # noqa: F401
from .evaluator import SearchClassification, evaluate_sample, make_loggers, search_evaluator  # noqa: F401
from .interrupt import GracefulStop, SearchInterrupted  # noqa: F401
from .rundir import RunLock, default_run_dir, prepare_run_dir  # noqa: F401
from .runner import SearchResult, _write_result_bundle, run_search  # noqa: F401

__all__ = ['SEARCH_SCHEMA', 'resolve_config', 'run_search', 'SearchResult', 'SearchClassification',
           'search_evaluator', 'make_loggers', 'arch_state', 'evaluate_sample', 'DivergenceError',
           'SearchInterrupted', 'CheckpointWriteError', 'choose_checkpoint', 'RunLock']
