"""Retraining (the DARTS evaluation protocol on pytorch-ignite): network, presets, targets, recipes, resume."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from nni_darts_variants.config import ConfigError
from nni_darts_variants.genotype import Genotype
from nni_darts_variants.retrain import (PRESETS, PUBLISHED_PARAMS_M, EvalNetwork, count_parameters, get_preset,
                                        last_checkpoint, lr_factor, resolve_config, resolve_target, run_retrain)
from nni_darts_variants.retrain.network import EvalCell, drop_path

# DARTS evaluation-network recipes; those named after another space are tested in test_retrain_spaces.py.
RECIPES = sorted(p for p in (Path(__file__).resolve().parents[1] / 'experiments' / 'retrain').glob('*.yml')
                 if not p.stem.startswith(('proxylessnas-', 'nasbench201-')))
TINY = ['model.channels=4', 'model.layers=3', 'data.source=synthetic', 'data.synthetic_size=32',
        'data.num_workers=0', 'train.batch_size=16', 'runtime.progress_bar=false']
# Papers' parameter counts that were read in the official READMEs; the others are from memory of the papers.
VERIFIED_COUNTS = {('DARTS_V2', 'cifar'), ('DARTS_V2', 'imagenet'), ('PC_DARTS_cifar', 'cifar')}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny networks run faster on one thread (and do not fight other test processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nodes(genotype: Genotype) -> dict[str, list[list[tuple[str, int]]]]:
    """Per cell type, the sorted pairs of each node (a sample dict does not keep the order within a node)."""
    return {cell: [sorted(getattr(genotype, cell)[k:k + 2]) for k in range(0, len(getattr(genotype, cell)), 2)]
            for cell in ('normal', 'reduce')}


def _rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / 'metrics.csv').open()))


# ------------------------------------------------------------------------------------------------------ network
@pytest.mark.parametrize('name', list(PRESETS))
def test_published_genotypes_build_with_the_papers_parameter_counts(name):
    genotype = get_preset(name)
    for network, (channels, layers, classes) in {'cifar': (36, 20, 10), 'imagenet': (48, 14, 1000)}.items():
        published = PUBLISHED_PARAMS_M[name].get(network)
        if published is None:
            continue
        model = EvalNetwork(genotype, channels=channels, layers=layers, num_classes=classes, network=network)
        millions = count_parameters(model) / 1e6
        assert count_parameters(model, include_auxiliary=True) > count_parameters(model)
        tolerance = 0.05 if (name, network) in VERIFIED_COUNTS else 0.15
        assert abs(millions - published) <= tolerance, f'{name} {network}: {millions:.3f}M vs {published}M'


def test_train_mode_returns_auxiliary_logits_and_eval_mode_only_logits():
    model = EvalNetwork(get_preset('PDARTS'), channels=4, layers=3, num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    logits, aux = model.train()(x)
    assert logits.shape == aux.shape == (2, 7)
    assert model.eval()(x).shape == (2, 7)
    imagenet = EvalNetwork(get_preset('DARTS_V2'), channels=4, layers=3, num_classes=5, auxiliary=False,
                           network='imagenet')
    assert imagenet.train()(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_reduction_cells_sit_at_one_and_two_thirds_and_double_channels():
    model = EvalNetwork(get_preset('DARTS_V2'), channels=4, layers=8)
    assert [i for i, cell in enumerate(model.cells) if cell.reduction] == [2, 5]
    assert model.aux_position == 5
    assert model.classifier.in_features == 4 * 4 * 4  # 4 nodes concatenated, C doubled twice


def test_drop_path_zeroes_or_rescales_whole_samples():
    torch.manual_seed(0)
    x = torch.rand(400, 3, 4, 4, dtype=torch.float64) + 1
    out = drop_path(x, 0.25)
    kept = out.flatten(1).abs().sum(1) > 0
    assert torch.allclose(out[kept], x[kept] / 0.75)
    assert 0.6 < kept.double().mean() < 0.9
    assert drop_path(x, 0.) is x


def test_drop_path_skips_identity_operations():
    torch.manual_seed(0)
    identity_cell = EvalCell([('skip_connect', 0), ('skip_connect', 1)] * 2, [2, 3], 4, 4, 4,
                             reduction=False, reduction_prev=False).train()
    pool_cell = EvalCell([('max_pool_3x3', 0), ('max_pool_3x3', 1)] * 2, [2, 3], 4, 4, 4,
                         reduction=False, reduction_prev=False).train()
    s0, s1 = torch.randn(8, 4, 6, 6), torch.randn(8, 4, 6, 6)
    for cell, should_match in ((identity_cell, True), (pool_cell, False)):
        torch.manual_seed(1)
        dropped = cell(s0, s1, drop_prob=0.9)
        torch.manual_seed(1)
        plain = cell(s0, s1, drop_prob=0.)
        assert torch.allclose(dropped, plain) is should_match


# ------------------------------------------------------------------------------------------------ LR schedules
def test_lr_factor_schedules():
    epochs, lr = 10, 0.025
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for epoch in range(epochs):
        factor = lr_factor(epoch, schedule='cosine', epochs=epochs, lr=lr)
        assert math.isclose(lr * factor, optimizer.param_groups[0]['lr'], rel_tol=1e-9, abs_tol=1e-12)
        optimizer.step()
        cosine.step()
    assert lr_factor(3, schedule='step', epochs=250, lr=0.1, gamma=0.97) == pytest.approx(0.97 ** 3)
    linear = [lr_factor(e, schedule='linear', epochs=250, lr=0.5) for e in range(250)]
    assert linear[0] == 1 and all(a >= b > 0 for a, b in zip(linear, linear[1:]))
    assert lr_factor(0, schedule='linear', epochs=250, lr=0.5, warmup_epochs=5) == pytest.approx(0.2)
    assert lr_factor(5, schedule='step', epochs=250, lr=0.1, gamma=1.0, warmup_epochs=5) == 1


# ----------------------------------------------------------------------------------------------------- targets
def test_targets_genotype_file_sample_dict_run_dir_and_preset(tmp_path):
    genotype = get_preset('PC_DARTS_cifar')
    genotype.save(tmp_path / 'cell.json')
    (tmp_path / 'sample.json').write_text(json.dumps(genotype.to_sample()))
    run = tmp_path / 'search-run'
    run.mkdir()
    genotype.save(run / 'genotype.json')
    for target in (tmp_path / 'cell.json', tmp_path / 'sample.json', run, 'pc-darts_cifar'):
        resolved, name = resolve_target(str(target))
        assert _nodes(resolved) == _nodes(genotype), target
    assert resolve_target(str(run))[1] == 'search-run'
    assert resolve_target('DARTS')[0] == get_preset('DARTS_V2')


@pytest.mark.parametrize('mutate, message', [
    (lambda g: g['normal'][0].__setitem__(0, 'conv_7x7'), 'unknown operation'),
    (lambda g: g['normal'][2].__setitem__(1, 3), 'does not exist'),
    (lambda g: g['reduce'].pop(), 'two (op, input) pairs'),
    (lambda g: [g[c].__delitem__(slice(6, 8)) for c in ('normal',)], 'normal_concat'),
])
def test_bad_genotypes_give_a_one_line_value_error(tmp_path, mutate, message):
    data = get_preset('DARTS_V2').to_dict()
    mutate(data)
    (tmp_path / 'bad.json').write_text(json.dumps(data))
    with pytest.raises(ValueError, match='.*') as info:
        resolve_target(str(tmp_path / 'bad.json'))
    assert message in str(info.value) and '\n' not in str(info.value)


def test_unknown_targets_are_one_line_errors(tmp_path):
    for target in ('NO_SUCH_CELL', str(tmp_path)):
        with pytest.raises(ValueError) as info:
            resolve_target(target)
        assert '\n' not in str(info.value)


# ----------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize('recipe', RECIPES, ids=lambda p: p.stem)
def test_every_recipe_resolves_and_builds(recipe):
    config = resolve_config(recipe)
    model = config['model']
    network = EvalNetwork(get_preset('DARTS_V2'), channels=model['channels'], layers=model['layers'],
                          num_classes=1000 if model['network'] == 'imagenet' else 10, network=model['network'])
    assert count_parameters(network) > 0
    assert config['train']['epochs'] in (250, 600)


def test_variant_recipes_differ_from_darts_where_the_papers_say():
    recipes = {p.stem: resolve_config(p) for p in RECIPES}
    assert recipes['darts-cifar10']['model']['drop_path_prob'] == 0.2
    assert recipes['pcdarts-cifar10']['model']['drop_path_prob'] == 0.3
    assert recipes['pdarts-cifar10']['train']['batch_size'] == 128
    drop = recipes['dropnas-cifar10']['train']
    assert (drop['batch_size'], drop['lr'], drop['grad_clip']) == (192, 0.05, 3.0)
    imagenet = recipes['darts-imagenet']
    assert (imagenet['model']['layers'], imagenet['model']['channels'], imagenet['train']['schedule']) == \
        (14, 48, 'step')


def test_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match='unknown key'):
        resolve_config(None, ['train.epoch=3'])
    with pytest.raises(ConfigError, match='train.schedule'):
        resolve_config(None, ['train.schedule=exp'])
    with pytest.raises(ConfigError) as info:
        run_retrain('DARTS_V2', None, TINY + [f'data.root={tmp_path}', 'data.source=cifar10'],
                    output=str(tmp_path / 'run'))
    assert 'cifar-10-batches-py' in str(info.value) and 'download=true' in str(info.value)


# -------------------------------------------------------------------------------------------------- training
def test_tiny_network_trains_with_falling_loss_and_writes_its_run_folder(tmp_path):
    out = tmp_path / 'run'
    summary = run_retrain('DARTS_V2', None, TINY + ['train.epochs=3', 'model.channels=8', 'data.synthetic_size=64'],
                          output=str(out))
    rows = _rows(out)
    assert [int(r['epoch']) for r in rows] == [1, 2, 3]
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss'])
    assert [float(r['drop_path_prob']) for r in rows] == pytest.approx([0.2 * e / 3 for e in range(3)])
    assert {'config.yaml', 'genotype.json', 'metrics.csv', 'summary.json', 'checkpoints'} <= \
        {p.name for p in out.iterdir()}
    assert summary['completed'] and summary['epochs_completed'] == 3
    assert 0 <= summary['top1'] <= summary['top5'] <= 100
    assert summary['params'] < summary['params_with_auxiliary']
    assert Genotype.load(out / 'genotype.json') == get_preset('DARTS_V2')


def _load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=False)


def test_resumed_run_repeats_the_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    run_retrain('GDAS_V1', None, TINY + ['train.epochs=3'], output=str(straight))
    first = run_retrain('GDAS_V1', None, TINY + ['train.epochs=3', 'train.stop_after_epochs=2'], output=str(resumed))
    assert not first['completed'] and last_checkpoint(resumed).name == 'checkpoint_2.pt'
    with pytest.raises(ConfigError, match='resume'):
        run_retrain('GDAS_V1', None, TINY + ['train.epochs=3'], output=str(resumed))
    summary = run_retrain(str(resumed), None, ['train.stop_after_epochs=0'], resume=True)
    assert summary['completed'] and summary['epochs_completed'] == 3
    assert [r['epoch'] for r in _rows(resumed)] == ['1', '2', '3']
    a, b = _load_checkpoint(straight / 'checkpoints' / 'checkpoint_3.pt'), _load_checkpoint(last_checkpoint(resumed))
    for key, value in a['model'].items():
        assert torch.equal(value, b['model'][key]), key
    momentum_a = [s['momentum_buffer'] for s in a['optimizer']['state'].values()]
    momentum_b = [s['momentum_buffer'] for s in b['optimizer']['state'].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))
    assert a['lr_scheduler']['last_epoch'] == b['lr_scheduler']['last_epoch'] == 3
    assert a['trainer']['iteration'] == b['trainer']['iteration'] == 3 * a['trainer']['epoch_length']
    assert _rows(straight) != [] and [r['test_top1'] for r in _rows(straight)] == \
        [r['test_top1'] for r in _rows(resumed)]


def test_imagefolder_slice_and_cpu_options(tmp_path, cifar_slice):
    summary = run_retrain('DARTS_V1', None, TINY + [
        'data.source=imagefolder', f'data.root={cifar_slice}', 'data.train_limit=32', 'data.test_limit=16',
        'train.epochs=1', 'runtime.channels_last=true', 'runtime.amp=true', 'runtime.amp_dtype=bfloat16',
        'runtime.logger=both'], output=str(tmp_path / 'run'))
    assert summary['completed'] and summary['top1'] is not None
    assert any((tmp_path / 'run' / 'tensorboard').iterdir())
    with pytest.raises(ConfigError, match='bfloat16'):
        run_retrain('DARTS_V1', None, TINY + ['runtime.amp=true', 'runtime.device=cpu'], output=str(tmp_path / 'b'))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('amp_dtype', ['float16', 'bfloat16'])
def test_gpu_mixed_precision_channels_last(tmp_path, amp_dtype):
    summary = run_retrain('PDARTS', None, TINY + [
        'train.epochs=2', 'runtime.amp=true', f'runtime.amp_dtype={amp_dtype}', 'runtime.channels_last=true'],
        output=str(tmp_path / 'run'))
    assert summary['completed'] and summary['device'].startswith('cuda')
    assert all(math.isfinite(float(r['train_loss'])) for r in _rows(tmp_path / 'run'))
    state = _load_checkpoint(last_checkpoint(tmp_path / 'run'))
    assert ('scaler' in state) is (amp_dtype == 'float16')
