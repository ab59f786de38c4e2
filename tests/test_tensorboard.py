"""``train.logger: tensorboard``: scalars, weight heatmaps as images and the genotype as text per epoch, in
``$NNI_OUTPUT_DIR/tensorboard`` inside an nnictl trial; the key checked when the config resolves."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl

from nni_darts_variants.config import ConfigError
from nni_darts_variants.genotype import Genotype
from nni_darts_variants.search import resolve_config
from nni_darts_variants.search.callbacks import tensorboard_epoch
from nni_darts_variants.search.evaluator import make_loggers, tensorboard_dir

GENOTYPE = Genotype(normal=[('sep_conv_3x3', 0), ('skip_connect', 1)] * 2,
                    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1)] * 2, normal_concat=[2, 3],
                    reduce_concat=[2, 3])


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (events,) = [p.parent for p in folder.rglob('events.out.tfevents.*')]
    accumulator = EventAccumulator(str(events), size_guidance={'images': 0, 'tensors': 0, 'scalars': 0})
    accumulator.Reload()
    return accumulator


def _texts(accumulator):
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in accumulator.Tensors('genotype/text_summary')]


def test_logger_key_is_checked_when_the_config_resolves(monkeypatch):
    assert resolve_config({})['train']['logger'] == 'csv'
    with pytest.raises(ConfigError, match=r"train\.logger must be one of csv, tensorboard, got 'wandb'"):
        resolve_config({'train': {'logger': 'wandb'}})
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name.startswith('tensorboard') else real(name, *a))
    with pytest.raises(ConfigError, match=r'train\.logger=tensorboard needs the tensorboard package') as error:
        resolve_config({'train': {'logger': 'tensorboard'}})
    assert '\n' not in str(error.value)


def test_tensorboard_folder_is_the_trials_inside_nni(tmp_path, monkeypatch):
    monkeypatch.setenv('NNI_OUTPUT_DIR', str(tmp_path / 'trial'))
    assert tensorboard_dir(tmp_path / 'trial' / 'search') == tmp_path / 'trial' / 'tensorboard'
    assert tensorboard_dir(tmp_path / 'elsewhere') == tmp_path / 'elsewhere' / 'tensorboard'
    monkeypatch.delenv('NNI_OUTPUT_DIR')
    assert tensorboard_dir(tmp_path / 'trial' / 'search') == tmp_path / 'trial' / 'search' / 'tensorboard'
    kinds = [type(x).__name__ for x in make_loggers({'train': {'logger': 'tensorboard'}}, tmp_path / 'run')]
    assert kinds == ['CSVLogger', 'TensorBoardLogger']
    assert [type(x).__name__ for x in make_loggers({'train': {'logger': 'csv'}}, tmp_path)] == ['CSVLogger']


def test_each_epoch_writes_heatmaps_and_the_genotype(tmp_path):
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name='', default_hp_metric=False)
    trainer = SimpleNamespace(loggers=[logger, pl.loggers.CSVLogger(str(tmp_path))], is_global_zero=True)
    probs = {'normal/op_2_0': {'sep_conv_3x3': 0.6, 'skip_connect': 0.4},
             'reduce/op_2_0': {'max_pool_3x3': 0.7, 'skip_connect': 0.3}}
    for epoch in range(2):
        tensorboard_epoch(trainer, {'epoch': epoch, 'probs': probs, 'genotype': GENOTYPE.to_dict()})
    tensorboard_epoch(trainer, {'epoch': 2, 'probs': {'block_0': {'mb3_k3': 0.2, 'mb6_k5': 0.8}}, 'genotype': None})
    events = _events(tmp_path)
    assert sorted(events.Tags()['images']) == ['alphas/choices', 'alphas/normal', 'alphas/reduce']
    normal = events.Images('alphas/normal')
    assert [e.step for e in normal] == [0, 1] and normal[0].encoded_image_string[:8] == b'\x89PNG\r\n\x1a\n'
    assert normal[0].width > 100 and normal[0].height > 50
    assert _texts(events) == [(0, 'epoch 0: `normal: [sep_conv_3x3<-0, skip_connect<-1, sep_conv_3x3<-0, '
                                  'skip_connect<-1]  reduce: [max_pool_3x3<-0, max_pool_3x3<-1, max_pool_3x3<-0, '
                                  'max_pool_3x3<-1]`'),
                              (1, _texts(events)[0][1].replace('epoch 0', 'epoch 1')),
                              (2, 'epoch 2: `block_0: mb6_k5`')]


@pytest.mark.slow
def test_a_search_inside_an_nni_trial_logs_to_its_tensorboard_folder(tmp_path, monkeypatch):
    from nni_darts_variants.search import run_search
    monkeypatch.setenv('NNI_OUTPUT_DIR', str(tmp_path / 'trial'))
    config = {'strategy': {'name': 'pcdarts', 'args': {'warmup_epochs': 0, 'partial_channels_k': 2}},
              'space': {'name': 'darts', 'args': {'width': 8, 'num_cells': 3}},
              'data': {'name': 'digits', 'batch_size': 32, 'limit': 64},
              'train': {'max_epochs': 2, 'progress_bar': False, 'eval_batches': 1, 'logger': 'tensorboard'},
              'output': {'bundle': False}}
    result = run_search(config, output=tmp_path / 'trial' / 'search')
    assert not (tmp_path / 'trial' / 'search' / 'tensorboard').exists()
    events = _events(tmp_path / 'trial' / 'tensorboard')
    assert {'supernet_val_acc', 'train_loss'} <= set(events.Tags()['scalars'])
    accuracy = [e.value for e in events.Scalars('supernet_val_acc')]
    assert len(accuracy) == 2
    assert accuracy[-1] == pytest.approx(result.metrics['supernet_val_acc'])
    assert [e.step for e in events.Images('alphas/normal')] == [0, 1]
    assert _texts(events)[-1] == (1, f'epoch 1: `{result.genotype}`')
    assert list((tmp_path / 'trial' / 'search' / 'metrics').glob('version_*/metrics.csv'))  # CSV as well


def test_nni_web_ui_folder_links_to_the_trials_tensorboard(tmp_path, monkeypatch):
    """NNI 3.0's local training service: NNI_OUTPUT_DIR is environments/local-env/trials/<id>, the TensorBoard
    button opens trials/<id>/output/tensorboard."""
    trial = tmp_path / 'exp' / 'environments' / 'local-env' / 'trials' / 'AbCdE'
    monkeypatch.setenv('NNI_OUTPUT_DIR', str(trial))
    monkeypatch.setenv('NNI_TRIAL_JOB_ID', 'AbCdE')
    make_loggers({'train': {'logger': 'tensorboard'}}, trial / 'search')
    button = tmp_path / 'exp' / 'trials' / 'AbCdE' / 'output' / 'tensorboard'
    assert button.is_symlink() and button.resolve() == (trial / 'tensorboard').resolve()
    make_loggers({'train': {'logger': 'tensorboard'}}, trial / 'search')  # a resumed trial: the link stays
    assert button.resolve() == (trial / 'tensorboard').resolve()
