"""The NNI evaluator of a search (:class:`SearchClassification` in a traced Lightning ``Trainer``), its loggers, and
the from-scratch evaluation of a found architecture (:func:`evaluate_sample`)."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import nni
import pytorch_lightning as pl
import torch
import torch.nn as nn
from nni.nas.evaluator.pytorch import Lightning, Trainer
from nni.nas.evaluator.pytorch.lightning import ClassificationModule

from ..data import SearchData
from ..distributed import lightning_strategy

__all__ = ['SearchClassification', 'make_loggers', 'tensorboard_dir', 'search_evaluator', 'evaluate_sample']


@nni.trace
class SearchClassification(ClassificationModule):
    """NNI's classification module with the DARTS weight recipe: SGD with momentum, cosine to ``learning_rate_min``.

    ``lr_warmup_epochs`` > 0 multiplies the first epochs' learning rate by ``(epoch + 1) / lr_warmup_epochs`` (the
    official PC-DARTS ImageNet search, ``train_search_imagenet.py``: 5 epochs when the batch exceeds 256).
    Results are reported by the search runner, not by this module (so an ``nnictl`` trial reports once).
    """

    def __init__(self, *, learning_rate: float = 0.025, learning_rate_min: float = 0.001, momentum: float = 0.9,
                 weight_decay: float = 3e-4, nesterov: bool = False, num_classes: int = 10, max_epochs: int = 50,
                 lr_warmup_epochs: int = 0):
        super().__init__(criterion=nn.CrossEntropyLoss, learning_rate=learning_rate, weight_decay=weight_decay,
                         optimizer=torch.optim.SGD, num_classes=num_classes)
        self.momentum = momentum
        self.nesterov = nesterov
        self.learning_rate_min = learning_rate_min
        self.max_epochs = max_epochs
        self.lr_warmup_epochs = lr_warmup_epochs

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate, momentum=self.momentum,
                                    weight_decay=self.hparams.weight_decay, nesterov=self.nesterov)
        if self.lr_warmup_epochs:
            from ..retrain.recipe import lr_factor  # the same cosine, times the warm-up factor
            scheduler: Any = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
                lr_factor, schedule='cosine', epochs=self.max_epochs, lr=self.hparams.learning_rate,
                lr_min=self.learning_rate_min, warmup_epochs=self.lr_warmup_epochs))
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.max_epochs,
                                                                   eta_min=self.learning_rate_min)
        return [optimizer], [{'scheduler': scheduler, 'interval': 'epoch'}]

    def on_validation_epoch_end(self) -> None:
        """Reporting belongs to the runner."""

    def _final_report(self) -> None:
        """Reporting belongs to the runner."""


def tensorboard_dir(run_dir: Path) -> Path:
    """Where a search's TensorBoard events go: ``$NNI_OUTPUT_DIR/tensorboard`` when the run folder lies inside
    ``$NNI_OUTPUT_DIR`` (an ``nnictl`` trial: the folder NNI's web UI TensorBoard button opens), else
    ``run_dir/tensorboard``."""
    nni_output = os.environ.get('NNI_OUTPUT_DIR')
    if nni_output and Path(run_dir).resolve().is_relative_to(Path(nni_output).resolve()):
        return Path(nni_output) / 'tensorboard'
    return Path(run_dir) / 'tensorboard'


def make_loggers(cfg: dict[str, Any], run_dir: Path) -> list[Any]:
    """The trainer's loggers: Lightning's CSV logger in ``run_dir/metrics/version_N`` (one version per session),
    and with ``train.logger: tensorboard`` also Lightning's TensorBoard logger in :func:`tensorboard_dir`
    (``version_N`` likewise; the per-epoch monitor adds the weight heatmaps and the genotype there)."""
    loggers: list[Any] = [pl.loggers.CSVLogger(str(run_dir), name='metrics')]
    if cfg['train'].get('logger') == 'tensorboard':
        folder = tensorboard_dir(run_dir)
        loggers.append(pl.loggers.TensorBoardLogger(str(folder), name='', default_hp_metric=False))
        _link_for_the_web_ui(folder)
    return loggers


def _link_for_the_web_ui(folder: Path) -> None:
    """NNI 3.0's local training service gives a trial ``NNI_OUTPUT_DIR=<experiment>/environments/local-env/trials/
    <trial>``, but its TensorBoard button opens ``<experiment>/trials/<trial>/output/tensorboard`` and never copies
    anything there: link that folder to ours (when the layout is that one and the folder is not there yet)."""
    nni_output, trial = os.environ.get('NNI_OUTPUT_DIR'), os.environ.get('NNI_TRIAL_JOB_ID')
    if not nni_output or not trial or folder != Path(nni_output) / 'tensorboard':
        return
    trial_dir = Path(nni_output).resolve()
    if trial_dir.name != trial or len(trial_dir.parents) < 4 or trial_dir.parents[2].name != 'environments':
        return
    target = trial_dir.parents[3] / 'trials' / trial / 'output' / 'tensorboard'
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not target.exists() and not target.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(folder.resolve(), target_is_directory=True)
    except OSError:  # the events are still in NNI_OUTPUT_DIR/tensorboard
        pass


def search_evaluator(cfg: dict[str, Any], data: SearchData, run_dir: Path, callbacks: list,
                     ckpt_path: str | None = None, schedule_epochs: int | None = None,
                     plugins: list | None = None) -> Lightning:
    """NNI ``Lightning`` evaluator with :class:`SearchClassification`, the loggers of :func:`make_loggers` and the
    given callbacks (the runner's include the per-epoch checkpoints)."""
    train = cfg['train']
    module = SearchClassification(learning_rate=train['learning_rate'], learning_rate_min=train['learning_rate_min'],
                                  momentum=train['momentum'], weight_decay=train['weight_decay'],
                                  nesterov=train['nesterov'], num_classes=data.num_classes,
                                  max_epochs=schedule_epochs or train['max_epochs'],
                                  lr_warmup_epochs=train['lr_warmup_epochs'])
    trainer = Trainer(max_epochs=train['max_epochs'], accelerator=train['accelerator'], devices=train['devices'],
                      num_nodes=train['num_nodes'],
                      precision=train['precision'], enable_progress_bar=train['progress_bar'],
                      strategy=lightning_strategy(train['strategy'], train['devices'], train['accelerator']),
                      enable_model_summary=False, callbacks=callbacks, logger=make_loggers(cfg, run_dir),
                      num_sanity_val_steps=0, log_every_n_steps=1, plugins=plugins or None)
    return Lightning(module, trainer, train_dataloaders=data.train, val_dataloaders=data.val,
                     fit_kwargs={'ckpt_path': ckpt_path} if ckpt_path else None)


def evaluate_sample(space_factory: Callable[[], Any], sample: dict[str, Any], data: SearchData, epochs: int,
                    learning_rate: float, accelerator: str = 'auto', seed: int = 0) -> dict[str, float]:
    """Train the discrete network of ``sample`` from scratch on both search halves, test on the held-out set."""
    from torch.utils.data import ConcatDataset, DataLoader
    pl.seed_everything(seed, verbose=False)
    model = space_factory().freeze(sample)
    module = SearchClassification(learning_rate=learning_rate, learning_rate_min=0.0, weight_decay=3e-4,
                                  num_classes=data.num_classes, max_epochs=epochs)
    module.set_model(model)
    both = ConcatDataset([data.train.dataset, data.val.dataset])
    loader = DataLoader(both, batch_size=data.train.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, train_dataloaders=loader)
    if data.test is None:
        return {}
    result = trainer.test(module, dataloaders=data.test, verbose=False)[0]
    params = sum(p.numel() for p in model.parameters())
    return {'test_acc': float(result['test_acc']), 'test_loss': float(result['test_loss']), 'params': params}
