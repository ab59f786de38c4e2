"""The result bundle: files, figures, sizes and FLOPs, and its place in the search runner."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn as nn

from nni_darts_variants import bundle
from nni_darts_variants.bundle import count_multiply_adds, count_parameters, op_choices, write_bundle
from nni_darts_variants.genotype import Genotype
from nni_darts_variants.testing import tiny_space

PNG = b'\x89PNG\r\n\x1a\n'
DATA_INFO = {'in_channels': 1, 'image_size': 8, 'num_classes': 10}
GENOTYPE = Genotype(
    normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 1),
            ('dil_conv_3x3', 2), ('skip_connect', 0), ('sep_conv_5x5', 1), ('dil_conv_5x5', 3)],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1),
            ('avg_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)])


def synthetic_history(choices, epochs=3, seed=0):
    """Alphas drifting from uniform to a random point; ``probs`` as the runner's ``alpha_history.json`` holds them."""
    g = torch.Generator().manual_seed(seed)
    final = {label: torch.randn(len(names), generator=g, dtype=torch.float64) for label, names in choices.items()}

    def probs(label, names, e):
        return dict(zip(names, torch.softmax(final[label] * e / max(epochs - 1, 1), 0).tolist()))
    history = [{'epoch': e, 'probs': {label: probs(label, names, e) for label, names in choices.items()}}
               for e in range(epochs)]
    return history, {label: a.tolist() for label, a in final.items()}


def write_tiny_bundle(run_dir, genotype=GENOTYPE, factory=tiny_space, data_info=DATA_INFO, command='nni-darts x',
                      epochs=3):
    space = factory()
    history, alphas = synthetic_history(op_choices(space), epochs)
    sample = genotype.to_sample(space) if genotype is not None else {k: v[0] for k, v in op_choices(space).items()}
    return write_bundle(run_dir, genotype=genotype, sample=sample, alpha_history=history,
                        final_alphas=alphas, space_factory=factory, data_info=data_info,
                        retrain_command=command), sample


@pytest.fixture(scope='module')
def darts_bundle(tmp_path_factory):
    """One bundle of a DARTS genotype, in a run folder that already holds ``genotype.json`` (as the runner leaves)."""
    run_dir = tmp_path_factory.mktemp('run')
    GENOTYPE.save(run_dir / 'genotype.json')
    summary, sample = write_tiny_bundle(run_dir)
    return run_dir, summary, sample


def test_bundle_files_are_valid_png_and_json(darts_bundle):
    run_dir, summary, sample = darts_bundle
    out = run_dir / 'bundle'
    pictures = ['cell_normal.png', 'cell_reduce.png', 'weights_normal.png', 'weights_reduce.png',
                'history_normal.png', 'history_reduce.png']
    for name in pictures:
        assert (out / name).read_bytes()[:8] == PNG, name
    on_disk = json.loads((out / 'summary.json').read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk['sample'] == sample and Genotype.from_dict(on_disk['genotype']) == GENOTYPE
    assert on_disk['retrain_command'] == 'nni-darts x' and on_disk['errors'] == []
    readme = (out / 'README.md').read_text()
    assert all(f'`{name}`' in readme for name in on_disk['files'])
    assert set(pictures) <= set(on_disk['files'])
    for probs in on_disk['final_probs'].values():
        assert sum(probs.values()) == pytest.approx(1.0)
    assert len(on_disk['final_probs']) == 2 * 14  # every edge of both cell types, no input choices


def test_genotype_and_sample_are_referenced_when_the_run_folder_has_them(darts_bundle):
    run_dir, summary, _ = darts_bundle
    assert '../genotype.json' in summary['files'] and not (run_dir / 'bundle' / 'genotype.json').exists()
    assert 'sample.json' in summary['files'] and (run_dir / 'bundle' / 'sample.json').exists()


def test_final_probs_are_the_softmax_of_the_final_alphas(tmp_path):
    space = tiny_space()
    choices = op_choices(space)
    _, alphas = synthetic_history(choices)
    probs = bundle.final_probabilities(alphas, choices)
    label = 'normal/op_3_1'
    expected = torch.softmax(torch.tensor(alphas[label], dtype=torch.float64), 0)
    assert torch.allclose(torch.tensor(list(probs[label].values()), dtype=torch.float64), expected)
    assert list(probs[label]) == choices[label]


def test_network_sizes(darts_bundle):
    _, summary, sample = darts_bundle
    frozen = tiny_space().freeze(sample)
    search = summary['networks']['search_network']
    assert search['params'] == sum(p.numel() for p in frozen.parameters())
    assert search['flops'] == count_multiply_adds(frozen, (1, 1, 8, 8)) > 0
    retrain = summary['networks']['retrain_network']
    assert retrain['params'] > search['params']


def test_multiply_adds_of_conv_and_linear():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_multiply_adds(conv, (1, 3, 10, 10)) == 8 * 10 * 10 * 3 * 3 * 3
    depthwise = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
    assert count_multiply_adds(depthwise, (1, 8, 10, 10)) == 8 * 5 * 5 * 1 * 3 * 3
    assert count_multiply_adds(nn.Linear(16, 4), (1, 16)) == 64


def test_multiply_adds_agree_with_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 5, stride=2, groups=4),
                        nn.Flatten(), nn.LazyLinear(7))
    net(torch.zeros(1, 3, 12, 12))
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, 3, 12, 12))
    assert count_multiply_adds(net, (1, 3, 12, 12)) * 2 == counter.get_total_flops()


def test_count_parameters_is_the_sum_of_numel():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(5, 2))
    assert count_parameters(net) == (4 * 3 * 9 + 4) + (4 + 4) + (5 * 2 + 2)


def test_a_failing_figure_or_count_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError('no fonts')
    monkeypatch.setattr(bundle, 'draw_heatmap', broken)
    monkeypatch.setattr(bundle, 'count_multiply_adds', broken)
    with caplog.at_level(logging.WARNING, logger='nni_darts_variants.bundle'):
        summary, _ = write_tiny_bundle(tmp_path, epochs=0)
    assert sorted(e.split(':')[0] for e in summary['errors']) == [
        'retrain_network', 'search_network', 'weights_normal.png', 'weights_reduce.png']
    assert 'no fonts' in caplog.text and summary['networks'] == {}
    assert (tmp_path / 'bundle' / 'cell_normal.png').exists() and (tmp_path / 'bundle' / 'summary.json').exists()
    assert 'could not be made' in (tmp_path / 'bundle' / 'README.md').read_text()


def test_space_without_cells_gets_block_figures_and_no_retrain_command(tmp_path):
    from search_spaces import ProxylessSpace

    def factory():
        return ProxylessSpace(dataset='cifar10', width_multiplier=0.25)
    summary, _ = write_tiny_bundle(tmp_path, genotype=None, factory=factory, command=None,
                                   data_info={'in_channels': 3, 'image_size': 32, 'num_classes': 10})
    out = tmp_path / 'bundle'
    assert (out / 'weights_choices.png').read_bytes()[:8] == PNG
    assert (out / 'history_choices.png').read_bytes()[:8] == PNG
    assert (out / 'blocks.png').read_bytes()[:8] == PNG and 'blocks.png' in summary['files']
    assert not list(out.glob('cell_*.png')) and 'retrain_network' not in summary['networks']
    assert summary['retrain_command'] is None and 'does not apply' in (out / 'README.md').read_text()
    assert len(summary['final_probs']) == 21


def test_retrain_command_uses_the_variant_recipe_or_darts():
    assert bundle.retrain_command('runs/a', 'pcdarts', 'cifar10', GENOTYPE) == \
        'nni-darts retrain runs/a experiments/retrain/pcdarts-cifar10.yml'
    assert bundle.retrain_command('runs/a', 'no-such-variant', 'imagenet', GENOTYPE).endswith('darts-imagenet.yml')
    assert bundle.retrain_command('runs/a', 'darts', 'cifar10', None) is None


def test_search_runner_writes_the_bundle(tmp_path):
    from nni_darts_variants.search import run_search
    config = {'seed': 3, 'strategy': {'name': 'darts'},
              'space': {'name': 'darts', 'args': {'width': 8, 'num_cells': 3}},
              'data': {'name': 'digits', 'batch_size': 64, 'limit': 128},
              'train': {'max_epochs': 1, 'progress_bar': False, 'eval_batches': 1}}
    run_search(config, output=tmp_path / 'run')
    summary = json.loads((tmp_path / 'run' / 'bundle' / 'summary.json').read_text())
    assert summary['epochs'] == 1 and summary['errors'] == []
    for name in ('cell_normal.png', 'cell_normal.dot', 'cell_normal.svg', 'cell_normal.pdf', 'curves.png',
                 'skip_connect.png', 'genotypes.png'):
        assert (tmp_path / 'run' / 'bundle' / name).stat().st_size > 0 and name in summary['files'], name
    assert summary['retrain_command'].startswith(f'nni-darts retrain {tmp_path / "run"} experiments/retrain/darts-')
    assert summary['sample'] == json.loads((tmp_path / 'run' / 'sample.json').read_text())


def test_a_broken_bundle_only_warns(tmp_path, monkeypatch, caplog):
    from types import SimpleNamespace

    from nni_darts_variants import search

    def broken(*args, **kwargs):
        raise RuntimeError('disk full')
    monkeypatch.setattr(bundle, 'write_bundle', broken)
    with caplog.at_level(logging.WARNING, logger='nni_darts_variants.search'):
        search._write_result_bundle(tmp_path, search.resolve_config({}), GENOTYPE, {}, [], {}, tiny_space,
                                    SimpleNamespace(**DATA_INFO))
    assert 'disk full' in caplog.text


def test_retrain_recipe_list_matches_the_repository():
    """The bundle names retrain recipes from a list (no path into the repository): it must equal the folder."""
    from pathlib import Path

    from nni_darts_variants.bundle import RETRAIN_RECIPES
    folder = Path(__file__).resolve().parents[1] / 'experiments' / 'retrain'
    assert RETRAIN_RECIPES == {p.stem for p in folder.glob('*.yml')}


def test_library_code_points_nowhere_into_the_repository():
    """No module of the package builds a path to the repository's own folders (it may be installed from a wheel)."""
    from pathlib import Path
    package = Path(__file__).resolve().parents[1] / 'nni_darts_variants'
    # config.recipe_root is the one allowed place: its checkout fallback serves a source tree that was never built
    # (PYTHONPATH, editable installs); an installed wheel reads the recipes as package data (tests/test_recipes.py).
    offenders = [str(p.relative_to(package)) for p in package.rglob('*.py')
                 if p.relative_to(package).as_posix() != 'config.py'
                 and ('parents[1]' in p.read_text() or "'experiments'" in p.read_text())]
    assert not offenders, f'paths into the repository in {offenders}'
