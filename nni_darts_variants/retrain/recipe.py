"""Retraining configuration: the DARTS CIFAR-10 recipe as defaults, a YAML recipe and ``--set`` overrides on top.

The defaults are the evaluation protocol of DARTS (Liu et al., ICLR 2019; ``cnn/train.py``): 20 cells, C=36,
auxiliary head weight 0.4, drop-path 0.2 ramped linearly, cutout 16, SGD lr 0.025 momentum 0.9 weight decay 3e-4,
cosine to 0 over 600 epochs, gradient clipping 5, batch 96. Recipe YAMLs (``experiments/retrain/*.yml``) hold only
what differs, e.g. the ImageNet mobile setting or a variant's drop-path.

A target in another space than DARTS (a ProxylessNAS, NAS-Bench-201 or NNI hub-space run folder) is retrained as
``space.freeze(sample)``: ``model.channels``, ``model.layers`` do not apply, ``model.space_args`` override the
searched space arguments, and the auxiliary head and drop-path (DARTS evaluation-network features) must be off
(``experiments/retrain/proxylessnas-imagenet.yml``, ``nasbench201-cifar10.yml``); :func:`check_target` says so.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from ..config import ConfigError, apply_overrides, check_schema, load_yaml, merge
from .network import NETWORKS

__all__ = ['DEFAULTS', 'resolve_config', 'check_target', 'lr_factor', 'SCHEDULES', 'SOURCES', 'OPEN_SECTIONS']

SCHEDULES = ('cosine', 'step', 'linear')
SOURCES = ('cifar10', 'imagefolder', 'synthetic')
LOGGERS = ('csv', 'tensorboard', 'both')
#: Sections whose keys are free (checked by the space they go to).
OPEN_SECTIONS = ('model.space_args',)

#: Every key a retrain config may set, with the DARTS CIFAR-10 recipe as values.
DEFAULTS: dict[str, Any] = {
    'model': {
        'network': 'cifar',          # 'cifar' (3x3 stem) or 'imagenet' (mobile stem, 224 px)
        'channels': 36,
        'layers': 20,
        'num_classes': None,         # None: taken from the data
        'auxiliary_weight': 0.4,     # 0 disables the auxiliary head
        'drop_path_prob': 0.2,       # final value of the linear ramp drop_path_prob * epoch / epochs
        'space_args': {},            # other spaces than DARTS: override the searched space arguments
    },
    'data': {
        'source': 'cifar10',         # cifar10 (torchvision) | imagefolder (root/train, root/test) | synthetic
        'root': 'data',
        'download': False,           # only cifar10; never downloads unless true
        'train_split': 'train',      # imagefolder sub-folders
        'test_split': 'test',
        'image_size': None,          # None: 32 for the cifar network, 224 for imagenet
        'cutout': 16,                # cutout length in pixels (cifar augmentation); 0 disables
        'train_limit': 0,            # use a fixed random subset of this many training images (0: all)
        'test_limit': 0,
        'synthetic_size': 512,       # synthetic: number of training images (test: a quarter)
        'num_workers': 2,
    },
    'train': {
        'epochs': 600,
        'batch_size': 96,
        'eval_batch_size': 0,        # 0: same as batch_size
        'lr': 0.025,
        'momentum': 0.9,
        'nesterov': False,
        'weight_decay': 3e-4,
        'weight_decay_bn': True,     # false: no weight decay on batch-norm weights and biases (ProxylessNAS)
        'schedule': 'cosine',        # cosine (to lr_min) | step (gamma per epoch) | linear (PC-DARTS ImageNet)
        'lr_min': 0.0,
        'gamma': 0.97,
        'warmup_epochs': 0,          # linear warm-up factor (epoch + 1) / warmup_epochs
        'grad_clip': 5.0,            # 0 disables
        'label_smoothing': 0.0,
        'seed': 0,
        'stop_after_epochs': 0,      # end this session after so many epochs (checkpointed); resume later. 0: never
    },
    'runtime': {
        'device': 'auto',            # auto (ignite's idist.device()) | cpu | cuda | cuda:N
        'amp': False,                # torch.autocast (+ GradScaler for float16)
        'amp_dtype': 'float16',      # float16 (CUDA) | bfloat16
        'channels_last': False,
        'backend': None,             # idist backend for multi-GPU: nccl | gloo; None: one process
        'nproc_per_node': None,      # processes to spawn with the backend
        'sync_bn': False,
        'progress_bar': True,
        'logger': 'csv',             # csv | tensorboard | both (CSV is always written)
        'eval_every': 1,             # evaluate every n epochs (and after the last)
        'n_saved': 2,                # checkpoints kept
    },
}


def _choice(value: Any, valid: Iterable[Any], key: str) -> None:
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f'{key} must be one of {", ".join(map(str, valid))}; got {value!r}')


def _positive(config: dict[str, Any], keys: Iterable[str], *, allow_zero: bool = False) -> None:
    for key in keys:
        section, name = key.split('.')
        value = config[section][name]
        if value < 0 or (value == 0 and not allow_zero):
            bound = '>= 0' if allow_zero else '> 0'
            raise ConfigError(f'{key} must be {bound}, got {value!r}')


def _validate(config: dict[str, Any]) -> dict[str, Any]:
    _choice(config['model']['network'], NETWORKS, 'model.network')
    _choice(config['data']['source'], SOURCES, 'data.source')
    _choice(config['train']['schedule'], SCHEDULES, 'train.schedule')
    _choice(config['runtime']['amp_dtype'], ('float16', 'bfloat16'), 'runtime.amp_dtype')
    _choice(config['runtime']['logger'], LOGGERS, 'runtime.logger')
    _positive(config, ['model.channels', 'model.layers', 'train.epochs', 'train.batch_size', 'train.lr',
                       'runtime.eval_every', 'runtime.n_saved'])
    _positive(config, ['model.auxiliary_weight', 'model.drop_path_prob', 'data.cutout', 'data.train_limit',
                       'data.test_limit', 'data.num_workers', 'train.eval_batch_size', 'train.weight_decay',
                       'train.warmup_epochs', 'train.grad_clip', 'train.label_smoothing', 'train.lr_min',
                       'train.stop_after_epochs'], allow_zero=True)
    if not 0 <= config['model']['drop_path_prob'] < 1:
        raise ConfigError(f'model.drop_path_prob must be in [0, 1), got {config["model"]["drop_path_prob"]}')
    if config['train']['nesterov'] and config['train']['momentum'] <= 0:
        raise ConfigError('train.nesterov=true needs train.momentum > 0')
    if config['train']['schedule'] == 'linear' and config['train']['epochs'] <= 5:
        raise ConfigError('train.schedule=linear needs train.epochs > 5 (its last 5 epochs decay on a flatter slope)')
    classes = config['model']['num_classes']
    if classes is not None and (not isinstance(classes, int) or classes < 2):
        raise ConfigError(f'model.num_classes must be a whole number >= 2 or null, got {classes!r}')
    if config['data']['image_size'] is None:
        config['data']['image_size'] = 32 if config['model']['network'] == 'cifar' else 224
    return config


def resolve_config(config_path: str | Path | None = None, overrides: Iterable[str] = (),
                   base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults (or ``base``, e.g. a run's saved config), then the YAML file, then ``section.key=value`` overrides.

    Raises :class:`~nni_darts_variants.config.ConfigError` (one line) on an unknown key, a wrong type or a bad value.
    """
    config = merge(DEFAULTS, base or {})
    if config_path is not None:
        config = merge(config, load_yaml(config_path))
    config = apply_overrides(config, overrides)
    return _validate(check_schema(config, DEFAULTS, open_sections=OPEN_SECTIONS))


def check_target(config: dict[str, Any], target: Any) -> None:
    """Reject a config that does not fit the :class:`~.target.RetrainTarget` (one-line :class:`ConfigError`)."""
    model = config['model']
    if target.genotype is not None:
        if model['space_args']:
            raise ConfigError(f'model.space_args {model["space_args"]} apply only to run folders of other spaces than '
                              'DARTS; a genotype takes model.channels and model.layers; remove model.space_args')
        return
    for key in ('auxiliary_weight', 'drop_path_prob'):
        if model[key] > 0:
            raise ConfigError(f'model.{key}={model[key]}: {target.kind} has no DARTS evaluation network (auxiliary '
                              f'head, drop-path); set model.{key}=0 or use a recipe for the space, e.g. '
                              'experiments/retrain/proxylessnas-imagenet.yml')


def lr_factor(epoch: int, *, schedule: str, epochs: int, lr: float, lr_min: float = 0., gamma: float = 0.97,
              warmup_epochs: int = 0) -> float:
    """Learning-rate multiplier for the (0-based) ``epoch``, as used with ``LambdaLR`` stepped once per epoch.

    * ``cosine``: ``lr_min + (lr - lr_min) (1 + cos(pi epoch / epochs)) / 2`` (DARTS CIFAR-10; ``lr_min = 0``).
    * ``step``: ``gamma ** epoch`` (DARTS ImageNet, ``StepLR(1, 0.97)``).
    * ``linear``: PC-DARTS ImageNet (``train_imagenet.py adjust_lr``): ``(epochs - 5 - epoch) / (epochs - 5)``,
      and on the last 5 epochs ``(epochs - epoch) / (5 (epochs - 5))``.
    * ``warmup_epochs``: multiplied by ``(epoch + 1) / warmup_epochs`` during the first epochs (PC-DARTS: 5 when
      the batch exceeds 256).
    """
    if schedule == 'cosine':
        value = (lr_min + (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2) / lr
    elif schedule == 'step':
        value = gamma ** epoch
    elif schedule == 'linear':
        value = ((epochs - 5 - epoch) / (epochs - 5) if epochs - epoch > 5
                 else (epochs - epoch) / ((epochs - 5) * 5))
    else:
        raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
    if epoch < warmup_epochs:
        value *= (epoch + 1) / warmup_epochs
    return value
