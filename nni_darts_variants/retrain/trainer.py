"""Retrain a genotype from scratch with pytorch-ignite (the DARTS evaluation protocol).

The loop is ignite's: a trainer and an evaluator :class:`~ignite.engine.Engine`, ignite metrics (top-1, top-5,
loss), :class:`~ignite.handlers.Checkpoint` (model, optimizer, LR scheduler, trainer state, grad scaler) with resume,
:class:`~ignite.handlers.ProgressBar`, an optional :class:`~ignite.handlers.TensorboardLogger`, and
``ignite.distributed`` (``Parallel``, ``auto_model``, ``auto_optim``, ``auto_dataloader``) for multi-GPU runs; one
CPU process is the tested path.

Per epoch (1-based ``e`` of ``E``): the drop-path probability is ``drop_path_prob * (e - 1) / E`` (DARTS
``train.py``); the LR schedule is stepped after the epoch (equivalent to the official step-at-epoch-start of
PyTorch 0.3: epoch ``e`` trains at ``lr_factor(e - 1)``); the test set is evaluated; a CSV row is written; a
checkpoint is saved. The data order and every random draw of an epoch are seeded from ``(seed, epoch)``, so a run
resumed from a checkpoint repeats exactly what the uninterrupted run does (with ``data.num_workers=0``; with worker
processes the augmentation draws of the resumed epoch differ).
"""
from __future__ import annotations

import functools
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
import yaml
from torch.utils.data import DistributedSampler

from ..config import ConfigError
from .data import build_datasets
from .handlers import (CHECKPOINT_DIR, SUMMARY_FILE, RunRecord, attach_handlers, evaluate, last_checkpoint,
                       resume_from_checkpoint, unwrap)
from .network import build_network, count_parameters, parameter_groups
from .recipe import check_target, lr_factor, resolve_config
from .target import RetrainTarget, resolve_retrain_target

__all__ = ['run_retrain', 'CONFIG_FILE']

CONFIG_FILE = 'config.yaml'


# ----------------------------------------------------------------------------------------------------------- API
def run_retrain(target: str, config_path: str | None = None, overrides: Iterable[str] = (), *,
                output: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Retrain ``target`` and return a summary (top-1/top-5 in percent, parameter counts, run folder).

    Parameters
    ----------
    target
        A genotype JSON file, an NNI sample dict JSON, a run directory holding ``genotype.json``, a search run folder
        of another space (ProxylessNAS, NAS-Bench-201, NNI hub: its network is ``space.freeze(sample)``), or a
        published cell (``DARTS_V2``, ``PC_DARTS_cifar``, ...; see :mod:`.presets`).
    config_path
        A recipe YAML (e.g. ``experiments/retrain/pcdarts-cifar10.yml``); missing keys keep the DARTS CIFAR-10
        recipe (:data:`.recipe.DEFAULTS`). When resuming without one, the run's saved ``config.yaml`` is used.
    overrides
        ``section.key=value`` strings applied last (``train.epochs=10``, ``data.source=imagefolder``).
    output
        The run folder; default ``runs/retrain/<name>-<timestamp>``. It receives ``config.yaml`` (resolved),
        ``genotype.json`` (or ``target.json``: space and sample), ``metrics.csv``, ``checkpoints/`` and ``summary.json``.
    resume
        Continue from the last checkpoint in ``output`` (or in ``target`` when that is a retrain run folder);
        without a checkpoint the run starts from scratch.

    Returns
    -------
    dict
        ``top1``, ``top5``, ``test_loss`` (last evaluation), ``best_top1``, ``params`` (auxiliary head excluded, as
        the papers count), ``params_with_auxiliary``, ``epochs_completed``, ``completed``, ``run_dir``, ...
    """
    import ignite.distributed as idist

    run_dir = _run_dir(target, output, resume)
    saved = run_dir / CONFIG_FILE
    base = yaml.safe_load(saved.read_text()) if resume and config_path is None and saved.is_file() else None
    config = resolve_config(config_path, overrides, base)
    resolved = resolve_retrain_target(target)
    check_target(config, resolved)
    if resolved.genotype is None:  # a sample the space cannot take fails here, before anything is written
        build_network(resolved, config['model'], config['model']['num_classes'] or 10)
    if not resume and last_checkpoint(run_dir) is not None:
        raise ConfigError(f'{run_dir} already holds checkpoints; resume it (resume=True) or choose another output')
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(config, sort_keys=False))
    resolved.save(run_dir)
    context = {'config': config, 'target': resolved.to_dict(), 'run_dir': str(run_dir), 'resume': resume}
    runtime = config['runtime']
    with idist.Parallel(backend=runtime['backend'], nproc_per_node=runtime['nproc_per_node']) as parallel:
        parallel.run(_training, context)
    return json.loads((run_dir / SUMMARY_FILE).read_text())


def _run_dir(target: str, output: str | None, resume: bool) -> Path:
    if output is not None:
        return Path(output)
    if resume:
        if Path(target).is_dir() and (Path(target) / CHECKPOINT_DIR).is_dir():
            return Path(target)
        raise ConfigError('resume needs the run folder: pass output=RUN_DIR or give the retrain run folder as target')
    stem = Path(str(target)).stem if Path(str(target)).exists() else str(target)
    return Path('runs') / 'retrain' / f'{stem}-{time.strftime("%Y%m%d-%H%M%S")}'


# ------------------------------------------------------------------------------------------------ per process
def _training(local_rank: int, context: dict[str, Any]) -> None:
    """The body run in every process: build everything, attach the handlers, run the trainer."""
    import ignite.distributed as idist
    from ignite.utils import manual_seed

    config, run_dir = context['config'], Path(context['run_dir'])
    train_cfg, runtime = config['train'], config['runtime']
    manual_seed(train_cfg['seed'] + idist.get_rank())
    device = _device(runtime['device'])
    train_set, test_set, data_classes = build_datasets(config)
    classes = config['model']['num_classes'] or data_classes
    target = RetrainTarget.from_dict(context['target'])
    model = _model(target, config, classes, device)
    groups = parameter_groups(model, train_cfg['weight_decay'], train_cfg['weight_decay_bn'])
    optimizer = idist.auto_optim(torch.optim.SGD(groups, lr=train_cfg['lr'], momentum=train_cfg['momentum'],
                                                 nesterov=train_cfg['nesterov']))
    schedule = functools.partial(lr_factor, schedule=train_cfg['schedule'], epochs=train_cfg['epochs'],
                                 lr=train_cfg['lr'], lr_min=train_cfg['lr_min'], gamma=train_cfg['gamma'],
                                 warmup_epochs=train_cfg['warmup_epochs'])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp_dtype = _amp_dtype(runtime, device)
    scaler = torch.amp.GradScaler('cuda') if amp_dtype == torch.float16 else None
    train_loader, test_loader = _loaders(train_set, test_set, config, device)
    trainer = _create_trainer(model, optimizer, scaler, config, device, amp_dtype)
    evaluator = _create_evaluator(model, device, amp_dtype, runtime['channels_last'], min(5, classes))
    to_save = {'model': model, 'optimizer': optimizer, 'lr_scheduler': scheduler, 'trainer': trainer}
    if scaler is not None:
        to_save['scaler'] = scaler
    run = RunRecord(run_dir, target.name, count_parameters(unwrap(model)),
                    count_parameters(unwrap(model), include_auxiliary=True), str(device))
    attach_handlers(trainer, evaluator, model, optimizer, scheduler, train_loader, test_loader, to_save, config, run)
    start_epoch = resume_from_checkpoint(to_save, trainer, run) if context['resume'] else 0
    if start_epoch < train_cfg['epochs']:
        trainer.run(train_loader, max_epochs=train_cfg['epochs'])
    elif not run.last_eval:
        evaluate(evaluator, test_loader, trainer, run)
    if idist.get_rank() == 0:
        run.write_summary(trainer, train_cfg['epochs'])


def _device(name: str) -> torch.device:
    import ignite.distributed as idist
    if name == 'auto':
        return idist.device()
    if idist.get_world_size() > 1:
        raise ConfigError(f'runtime.device={name!r} cannot be combined with several processes; use device=auto')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'runtime.device={name!r} but CUDA is not available; use runtime.device=cpu or auto')
    return device


def _amp_dtype(runtime: dict[str, Any], device: torch.device) -> torch.dtype | None:
    if not runtime['amp']:
        return None
    if runtime['amp_dtype'] == 'float16' and device.type != 'cuda':
        raise ConfigError('runtime.amp with amp_dtype=float16 needs a CUDA device; use runtime.amp_dtype=bfloat16')
    return torch.float16 if runtime['amp_dtype'] == 'float16' else torch.bfloat16


def _model(target: RetrainTarget, config: dict[str, Any], classes: int, device: torch.device) -> nn.Module:
    import ignite.distributed as idist
    model = build_network(target, config['model'], classes)
    if config['runtime']['channels_last']:
        model = model.to(memory_format=torch.channels_last)
    if config['runtime']['device'] == 'auto':
        return idist.auto_model(model, sync_bn=config['runtime']['sync_bn'])
    return model.to(device)


def _loaders(train_set: Any, test_set: Any, config: dict[str, Any], device: torch.device) -> tuple[Any, Any]:
    import ignite.distributed as idist
    train_cfg, workers = config['train'], config['data']['num_workers']
    batch, seed = train_cfg['batch_size'], train_cfg['seed']
    # The sampler's permutation depends only on (seed, epoch): set_epoch is called when each epoch starts.
    sampler = DistributedSampler(train_set, num_replicas=idist.get_world_size(), rank=idist.get_rank(),
                                 shuffle=True, seed=seed)
    world = idist.get_world_size()
    per_process = batch // world if world > 1 and batch >= world else batch  # as auto_dataloader splits it
    common = {'num_workers': workers, 'pin_memory': device.type == 'cuda'}
    train = idist.auto_dataloader(train_set, batch_size=batch, sampler=sampler, generator=torch.Generator(),
                                  drop_last=len(sampler) % per_process == 1, **common)  # no batch of one for BN
    test = idist.auto_dataloader(test_set, batch_size=train_cfg['eval_batch_size'] or batch, shuffle=False,
                                 **common)
    return train, test


def _prepare(batch: Any, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _create_trainer(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, config: dict[str, Any],
                    device: torch.device, amp_dtype: torch.dtype | None) -> Any:
    """The ignite trainer: one SGD step with the auxiliary loss, AMP and gradient clipping."""
    from ignite.engine import Engine
    criterion = nn.CrossEntropyLoss(label_smoothing=config['train']['label_smoothing'])
    aux_weight, clip = config['model']['auxiliary_weight'], config['train']['grad_clip']
    channels_last = config['runtime']['channels_last']

    def train_step(engine: Engine, batch: Any) -> dict[str, Any]:
        model.train()
        x, y = _prepare(batch, device, channels_last)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp_dtype):
            out = model(x)
            logits, logits_aux = out if isinstance(out, tuple) else (out, None)
            loss = criterion(logits, y)
            if logits_aux is not None:
                loss = loss + aux_weight * criterion(logits_aux, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return {'loss': loss.item(), 'y_pred': logits.detach().float(), 'y': y}

    return Engine(train_step)


def _create_evaluator(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
                      top_k: int) -> Any:
    from ignite.engine import Engine
    from ignite.metrics import Accuracy, Loss, TopKCategoricalAccuracy

    @torch.no_grad()
    def eval_step(engine: Engine, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        x, y = _prepare(batch, device, channels_last)
        with _autocast(device, amp_dtype):
            logits = model(x)
        return logits.float(), y

    evaluator = Engine(eval_step)
    Accuracy(device=device).attach(evaluator, 'top1')
    TopKCategoricalAccuracy(k=top_k, device=device).attach(evaluator, 'top5')
    Loss(nn.CrossEntropyLoss(), device=device).attach(evaluator, 'loss')
    return evaluator


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
