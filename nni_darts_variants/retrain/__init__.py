"""Retraining a searched (or published) genotype from scratch: the DARTS evaluation protocol on pytorch-ignite.

>>> from nni_darts_variants.retrain import run_retrain
>>> summary = run_retrain('DARTS_V2', 'experiments/retrain/darts-cifar10.yml', ['train.epochs=10'])

Modules: :mod:`.network` (the evaluation network), :mod:`.presets` (published cells), :mod:`.recipe` (defaults,
YAML + overrides, LR schedules), :mod:`.data` (CIFAR-10, ImageFolder, synthetic), :mod:`.target` (what to
retrain), :mod:`.trainer` (ignite engines and handlers).
"""
from __future__ import annotations

from .network import EvalNetwork, count_parameters, validate_genotype
from .presets import PRESETS, PUBLISHED_PARAMS_M, get_preset, list_presets
from .recipe import DEFAULTS, lr_factor, resolve_config
from .target import resolve_target
from .trainer import last_checkpoint, run_retrain

__all__ = ['run_retrain', 'resolve_target', 'resolve_config', 'DEFAULTS', 'EvalNetwork', 'count_parameters',
           'validate_genotype', 'PRESETS', 'PUBLISHED_PARAMS_M', 'get_preset', 'list_presets', 'lr_factor',
           'last_checkpoint']
