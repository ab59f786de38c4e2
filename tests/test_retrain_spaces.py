"""Retraining run folders of other spaces than DARTS: ProxylessNAS, NAS-Bench-201 and NNI hub spaces, frozen."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from nni_darts_variants.config import ConfigError
from nni_darts_variants.retrain import resolve_config, run_retrain
from nni_darts_variants.retrain.network import build_network, parameter_groups
from nni_darts_variants.retrain.target import resolve_retrain_target

RETRAIN = Path(__file__).resolve().parents[1] / 'experiments' / 'retrain'
#: The searched blocks of a ProxylessNAS-space run: every candidate kind, two skipped (``zero``) blocks.
PROXYLESS_SAMPLE = {f'block_{i}': ['mb3_k3', 'mb6_k3', 'mb3_k5', 'mb6_k5', 'mb3_k7', 'mb6_k7'][i % 6]
                    for i in range(21)} | {'block_1': 'zero', 'block_19': 'zero'}
NB201_SAMPLE = {'nb201/op_1_0': 'nor_conv_3x3', 'nb201/op_2_0': 'skip_connect', 'nb201/op_2_1': 'nor_conv_1x1',
                'nb201/op_3_0': 'none', 'nb201/op_3_1': 'avg_pool_3x3', 'nb201/op_3_2': 'nor_conv_3x3'}
TINY = ['data.source=synthetic', 'data.synthetic_size=16', 'data.image_size=16', 'data.num_workers=0',
        'train.batch_size=8', 'train.epochs=1', 'runtime.progress_bar=false', 'model.num_classes=10']


def search_run_folder(folder: Path, space: dict, sample: dict, data: str = 'digits') -> Path:
    """A finished search's run folder as ``nni-darts search`` leaves it (the files retrain reads)."""
    folder.mkdir(parents=True)
    config = {'seed': 0, 'strategy': {'name': 'proxyless', 'args': {}}, 'space': space, 'data': {'name': data}}
    (folder / 'config.yaml').write_text(yaml.safe_dump(config))
    (folder / 'sample.json').write_text(json.dumps(sample))
    return folder


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_space_recipes_follow_the_official_training_scripts():
    proxyless = resolve_config(RETRAIN / 'proxylessnas-imagenet.yml')
    train = proxyless['train']
    # mit-han-lab/proxylessnas search/imagenet_run_exp.py defaults; training/README.md: --epochs 300
    assert (train['epochs'], train['batch_size'], train['lr'], train['schedule']) == (300, 256, 0.05, 'cosine')
    assert (train['momentum'], train['nesterov'], train['weight_decay'], train['weight_decay_bn']) == \
        (0.9, True, 4e-5, False)
    assert train['label_smoothing'] == 0.1 and train['grad_clip'] == 0
    assert proxyless['model']['space_args'] == {'dataset': 'imagenet', 'dropout': 0.1}
    assert proxyless['data']['image_size'] == 224
    nb201 = resolve_config(RETRAIN / 'nasbench201-cifar10.yml')['train']
    # NAS-Bench-201 (Dong & Yang 2020), section 2.3: 200 epochs, Nesterov SGD 0.1 cosine, wd 5e-4, batch 256
    assert (nb201['epochs'], nb201['lr'], nb201['nesterov'], nb201['weight_decay'], nb201['batch_size']) == \
        (200, 0.1, True, 5e-4, 256)


def test_parameter_groups_leave_batch_norm_undecayed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    decayed, plain = parameter_groups(model, 4e-5, weight_decay_bn=False)
    assert {id(p) for p in plain['params']} == {id(model[1].weight), id(model[1].bias)} and plain['weight_decay'] == 0
    assert len(decayed['params']) == 3 and decayed['weight_decay'] == 4e-5  # conv weight, linear weight and bias
    (everything,) = parameter_groups(model, 4e-5)
    assert len(everything['params']) == 5


# 17.72 s on the loaded 2-core machine (NNI's freeze of 21 LayerChoices takes seconds, three times); the same frozen
# path runs by default in the NAS-Bench-201 test below.
@pytest.mark.slow
def test_a_proxylessnas_space_run_folder_retrains(tmp_path):
    from search_spaces.proxylessnas import ProxylessSpace
    run = search_run_folder(tmp_path / 'search', {'name': 'proxylessnas', 'args': {}}, PROXYLESS_SAMPLE)
    overrides = TINY + ['model.space_args.width_multiplier=0.25', 'model.space_args.dataset=cifar10',
                        'data.image_size=8']  # two steps of 8 images
    summary = run_retrain(str(run), str(RETRAIN / 'proxylessnas-imagenet.yml'), overrides,
                          output=str(tmp_path / 'retrain'))
    assert summary['completed'] and summary['epochs_completed'] == 1
    assert 0 <= summary['top1'] <= 100 and torch.isfinite(torch.tensor(summary['train_loss']))
    # The network is the space (as the recipe reshapes it) frozen to the sample, built here without the library.
    expected = ProxylessSpace(num_classes=10, in_channels=3, width_multiplier=0.25, dropout=0.1,
                              dataset='cifar10').freeze(PROXYLESS_SAMPLE)
    assert summary['params'] == n_params(expected)
    saved = json.loads((tmp_path / 'retrain' / 'target.json').read_text())
    assert saved == {'space': {'name': 'proxylessnas', 'args': {}}, 'sample': PROXYLESS_SAMPLE}
    # Nesterov SGD, and no weight decay on the batch-norm group (ProxylessNAS no_decay_keys='bn').
    checkpoint = torch.load(next((tmp_path / 'retrain' / 'checkpoints').glob('*.pt')), weights_only=False)
    groups = checkpoint['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [4e-5, 0.0] and all(g['nesterov'] for g in groups)


def test_a_nasbench201_run_folder_retrains_in_the_benchmark_network(tmp_path):
    from search_spaces.nasbench201 import NasBench201Space
    run = search_run_folder(tmp_path / 'search', {'name': 'nasbench201', 'args': {'width': 8, 'num_cells': 1}},
                            NB201_SAMPLE)
    overrides = TINY + ['model.space_args.width=4', 'model.space_args.num_cells=1']
    summary = run_retrain(str(run), str(RETRAIN / 'nasbench201-cifar10.yml'), overrides,
                          output=str(tmp_path / 'retrain'))
    assert summary['completed']
    expected = NasBench201Space(width=4, num_cells=1, num_classes=10, in_channels=3, affine=True,
                                track_running_stats=True).freeze(NB201_SAMPLE)
    assert summary['params'] == n_params(expected)


def test_an_nni_hub_space_run_folder_freezes(tmp_path):
    hub_sample = {'cell/0_1': 'conv_3x3', 'cell/0_2': 'skip_connect', 'cell/1_2': 'conv_1x1', 'cell/0_3': 'none',
                  'cell/1_3': 'avg_pool_3x3', 'cell/2_3': 'conv_3x3'}
    space = {'name': 'nni-hub', 'args': {'name': 'NasBench201', 'stem_out_channels': 4, 'num_modules_per_stack': 1}}
    target = resolve_retrain_target(search_run_folder(tmp_path / 'search', space, hub_sample))
    model = resolve_config(None, ['model.auxiliary_weight=0', 'model.drop_path_prob=0'])['model']
    network = build_network(target, model, num_classes=7)
    assert network(torch.zeros(2, 3, 16, 16)).shape == (2, 7)


def test_frozen_targets_refuse_darts_only_settings_before_writing(tmp_path):
    run = search_run_folder(tmp_path / 'search', {'name': 'proxylessnas', 'args': {}}, PROXYLESS_SAMPLE)
    with pytest.raises(ConfigError, match='model.auxiliary_weight') as info:
        run_retrain(str(run), None, TINY, output=str(tmp_path / 'out'))  # the DARTS defaults: auxiliary head 0.4
    assert '\n' not in str(info.value) and 'proxylessnas-imagenet.yml' in str(info.value)
    assert not (tmp_path / 'out').exists()


def test_a_sample_the_space_cannot_take_is_one_line_and_writes_nothing(tmp_path):
    bad = PROXYLESS_SAMPLE | {'block_0': 'mb9_k9'}
    run = search_run_folder(tmp_path / 'search', {'name': 'proxylessnas', 'args': {}}, bad)
    with pytest.raises(ValueError) as info:
        run_retrain(str(run), str(RETRAIN / 'proxylessnas-imagenet.yml'), TINY, output=str(tmp_path / 'out'))
    assert '\n' not in str(info.value) and 'proxylessnas' in str(info.value)
    assert not (tmp_path / 'out').exists()


def test_the_cli_error_for_a_frozen_target_is_one_line_with_exit_code_2(tmp_path, capsys):
    from nni_darts_variants.cli import main
    run = search_run_folder(tmp_path / 'search', {'name': 'proxylessnas', 'args': {}}, PROXYLESS_SAMPLE)
    assert main(['retrain', str(run), '-o', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('nni-darts retrain: error: model.auxiliary_weight')
    assert not (tmp_path / 'out').exists()
