"""The command line: a quiet terminal by default; list, show, export, bundle, and the search flags."""
from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nni_darts_variants.cli import EXPORT_FORMATS, build_parser, main
from nni_darts_variants.logs import configure_logging


def test_harmless_nni_warnings_are_dropped_at_their_logger_and_come_back_with_verbose():
    source = logging.getLogger('nni.nas.experiment.config.experiment')
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    source.addHandler(handler)
    try:
        configure_logging(frameworks=False)
        source.warning('`training_service` will be ignored for sequential execution engine.')
        source.warning('something else')
        assert seen == ['something else']
        configure_logging(verbose=True, frameworks=False)
        source.warning('`training_service` will be ignored for sequential execution engine.')
        assert len(seen) == 2
    finally:
        source.removeHandler(handler)
        configure_logging(frameworks=False)


def test_our_handler_is_added_once():
    configure_logging(frameworks=False)
    configure_logging(frameworks=False)
    ours = [h for h in logging.getLogger('nni_darts_variants').handlers if getattr(h, '_nni_darts', False)]
    assert len(ours) == 1


def test_list_does_not_import_nni():
    code = 'import sys; from nni_darts_variants.cli import main; main(["list"]); print("nni" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == 'False'


# ------------------------------------------------------------------------ show, export, bundle, search flags
ROOT = Path(__file__).resolve().parents[1]
NB201_ARCH = '|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|'
TINY_SEARCH = {'seed': 3, 'strategy': {'name': 'darts', 'args': {}},
               'space': {'name': 'darts', 'args': {'width': 4, 'num_cells': 3}},
               'data': {'name': 'digits', 'batch_size': 32, 'limit': 64},
               'train': {'max_epochs': 1, 'progress_bar': False, 'eval_batches': 1, 'accelerator': 'cpu'}}


@pytest.fixture(scope='module')
def search_run(tmp_path_factory):
    """One tiny real DARTS search (bundle included), for the slow bundle test."""
    from nni_darts_variants.search import run_search
    run = tmp_path_factory.mktemp('cli') / 'darts-run'
    run_search(TINY_SEARCH, output=run)
    return run


@pytest.fixture(scope='module')
def darts_run(tmp_path_factory):
    """A finished DARTS search's run folder as the search leaves it (DARTS_V2 as its genotype, two figures)."""
    from nni_darts_variants.retrain.presets import PRESETS
    run = tmp_path_factory.mktemp('cli') / 'darts-run'
    (run / 'bundle').mkdir(parents=True)
    (run / 'config.yaml').write_text(yaml.safe_dump(TINY_SEARCH))
    genotype = {**PRESETS['DARTS_V2'], 'normal_concat': [2, 3, 4, 5], 'reduce_concat': [2, 3, 4, 5]}
    (run / 'genotype.json').write_text(json.dumps(genotype))
    sample = {'normal/op_2_0': 'sep_conv_3x3', 'normal/input_2': [0, 1]}  # what export -f nni copies
    (run / 'sample.json').write_text(json.dumps(sample))
    (run / 'result.json').write_text(json.dumps({'metrics': {'supernet_val_acc': 0.421875}}))
    for name in ('cell_normal.png', 'weights_reduce.png'):
        (run / 'bundle' / name).write_bytes(b'')
    return run


@pytest.fixture
def nb201_run(tmp_path):
    """A NAS-Bench-201 run folder as the search leaves it (config, sample; no bundle)."""
    from nni_darts_variants.nasbench201 import arch_to_sample
    run = tmp_path / 'nb201-run'
    run.mkdir()
    config = {**TINY_SEARCH, 'space': {'name': 'nasbench201', 'args': {'width': 4, 'num_cells': 1}}}
    (run / 'config.yaml').write_text(yaml.safe_dump(config))
    (run / 'sample.json').write_text(json.dumps(arch_to_sample(NB201_ARCH)))
    (run / 'bundle').mkdir()
    (run / 'bundle' / 'summary.json').write_text(json.dumps({'data': {'in_channels': 1, 'image_size': 8,
                                                                       'num_classes': 10}}))
    return run


def _cli(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *words):
    """Exit code 2 and one error line (our INFO lines may precede it on stderr)."""
    errors = [line for line in err.splitlines() if line.startswith('nni-darts')]
    assert code == 2 and len(errors) == 1 and 'Traceback' not in err, err
    for word in words:
        assert word in errors[0], errors[0]


def test_version_is_the_package_version(capsys):
    version = re.search(r'^version = "(.+)"', (ROOT / 'pyproject.toml').read_text(), re.M).group(1)
    with pytest.raises(SystemExit) as info:
        main(['--version'])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f'nni-darts {version}'


@pytest.mark.parametrize('argv', [['--debug', '--verbose', 'list'], ['list', '--debug', '-v'],
                                  ['--debug', 'show', 'x', '--verbose']])
def test_log_flags_before_or_after_the_command(argv):
    args = build_parser().parse_args(argv)
    assert args.debug and args.verbose
    assert not build_parser().parse_args(['list']).debug


def test_list_shows_datasets_presets_spaces_and_arguments_without_torch():
    code = ('import sys; from nni_darts_variants.cli import main; main(["list"]); '
            'print("torch" in sys.modules, "nni" in sys.modules)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == 'False False'
    for word in ('digits', 'imagefolder', 'DARTS_V2', 'PC_DARTS_cifar', 'proxylessnas', 'nasbench201',
                 'partial_channels_k=4', 'order=1', 'arc_learning_rate=0.0006'):
        assert word in out, word


def test_strategy_arguments_read_from_source_equal_the_signatures():
    from nni_darts_variants.registry import BUILTIN_STRATEGIES, get_strategy, strategy_parameters
    from nni_darts_variants.show import strategy_arguments
    for name, (module, _) in BUILTIN_STRATEGIES.items():
        params = strategy_parameters(get_strategy(name))
        static = strategy_arguments(module)
        assert list(static) == list(params), name
        for key, param in params.items():
            assert ast.literal_eval(static[key]) == param.default, (name, key)


def test_presets_and_datasets_read_from_source_equal_the_tables():
    from nni_darts_variants.data import DATASETS
    from nni_darts_variants.retrain.presets import PRESETS, get_preset
    from nni_darts_variants.show import dataset_descriptions, preset_names
    names = preset_names()
    assert list(names) == list(PRESETS)
    for name, aliases in names.items():
        assert all(get_preset(alias) == get_preset(name) for alias in aliases)
    assert dataset_descriptions() == {key: desc for key, (_, desc) in DATASETS.items()}


def test_export_formats_of_the_parser_are_the_exporters():
    from nni_darts_variants.export import FORMATS
    assert tuple(FORMATS) == EXPORT_FORMATS


def test_print_config_is_the_resolved_yaml_and_writes_nothing(tmp_path, capsys):
    (tmp_path / 'c.yml').write_text(yaml.safe_dump(TINY_SEARCH))
    before = sorted(tmp_path.rglob('*'))
    code, out, _ = _cli(capsys, 'search', tmp_path / 'c.yml', '--print-config', '--seed', 7, '--device', 'cpu',
                        '--set', 'train.momentum=0.5')
    cfg = yaml.safe_load(out)
    assert code == 0 and sorted(tmp_path.rglob('*')) == before
    assert cfg['seed'] == 7 and cfg['train']['accelerator'] == 'cpu' and cfg['train']['momentum'] == 0.5
    assert cfg['space'] == TINY_SEARCH['space'] and cfg['data']['limit'] == 64
    # keys the file does not set come with their defaults
    assert {'evaluate', 'output'} <= set(cfg) and cfg['output']['bundle'] is True and cfg['data']['download'] is False


def test_dry_run_builds_everything_and_writes_nothing(tmp_path, capsys):
    (tmp_path / 'c.yml').write_text(yaml.safe_dump(TINY_SEARCH))
    code, out, _ = _cli(capsys, 'search', tmp_path / 'c.yml', '--dry-run', '-o', tmp_path / 'run')
    assert code == 0 and 'dry run' in out and not (tmp_path / 'run').exists()
    code, _, err = _cli(capsys, 'search', tmp_path / 'c.yml', '--dry-run', '-o', tmp_path / 'run',
                        '--set', 'space.args.width=6', '--set', 'strategy.name=pcdarts')  # K=4 does not divide 6
    _one_line_error(code, err, 'pcdarts')
    assert not (tmp_path / 'run').exists()


def test_show_prints_architecture_metrics_and_figures(darts_run, capsys):
    code, out, _ = _cli(capsys, 'show', darts_run)
    assert code == 0
    genotype = json.loads((darts_run / 'genotype.json').read_text())
    op, node = genotype['normal'][0]
    assert f'{op}<-{node}' in out
    assert '42.19 %' in out  # supernet accuracy 0.421875
    assert 'cell_normal.png' in out and 'weights_reduce.png' in out


def test_show_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    code, _, err = _cli(capsys, 'show', tmp_path)
    _one_line_error(code, err, 'no config.yaml')


def test_export_genotype_and_nni_are_the_run_files(darts_run, tmp_path, capsys):
    code, out, _ = _cli(capsys, 'export', darts_run, '--format', 'genotype')
    assert code == 0 and json.loads(out) == json.loads((darts_run / 'genotype.json').read_text())
    code, _, _ = _cli(capsys, 'export', darts_run, '--format', 'nni', '-o', tmp_path / 'sample.json')
    assert json.loads((tmp_path / 'sample.json').read_text()) == json.loads((darts_run / 'sample.json').read_text())


def test_export_nb201_string_and_its_error_elsewhere(darts_run, nb201_run, tmp_path, capsys):
    code, out, _ = _cli(capsys, 'export', nb201_run, '--format', 'nb201')
    assert code == 0 and out.strip() == NB201_ARCH
    code, _, err = _cli(capsys, 'export', darts_run, '--format', 'nb201', '-o', tmp_path / 'x.txt')
    _one_line_error(code, err, 'NAS-Bench-201', '--format nni')
    assert not (tmp_path / 'x.txt').exists()
    code, _, err = _cli(capsys, 'export', nb201_run, '--format', 'genotype')
    _one_line_error(code, err, 'no DARTS genotype')


@pytest.fixture
def tiny_recipe(tmp_path):
    recipe = tmp_path / 'tiny.yml'
    recipe.write_text(yaml.safe_dump({'model': {'channels': 4, 'layers': 3}}))
    return recipe


def test_export_torchscript_loads_and_runs(darts_run, nb201_run, tiny_recipe, tmp_path, capsys):
    import torch
    code, _, _ = _cli(capsys, 'export', darts_run, '-f', 'torchscript', '-o', tmp_path / 'darts.pt',
                      '--recipe', tiny_recipe)
    assert code == 0
    assert torch.jit.load(str(tmp_path / 'darts.pt'))(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    code, _, _ = _cli(capsys, 'export', nb201_run, '-f', 'torchscript')  # the searched network: 1x8x8 digits
    assert code == 0
    assert torch.jit.load(str(nb201_run / 'export' / 'model.pt'))(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def test_export_onnx_checks(darts_run, nb201_run, tiny_recipe, tmp_path, capsys):
    onnx = pytest.importorskip('onnx')
    for run, name, extra in ((darts_run, 'darts.onnx', ['--recipe', tiny_recipe]), (nb201_run, 'nb201.onnx', [])):
        code, _, _ = _cli(capsys, 'export', run, '-f', 'onnx', '-o', tmp_path / name, *extra)
        assert code == 0
        model = onnx.load(str(tmp_path / name))
        onnx.checker.check_model(model)
        assert [o.name for o in model.graph.output] == ['logits']


@pytest.mark.slow  # a real search, then the figures again: about 50 s on the loaded 2-core machine
def test_bundle_redraws_the_figures(search_run, tmp_path, capsys):
    run = tmp_path / 'copy'
    shutil.copytree(search_run, run, ignore=shutil.ignore_patterns('checkpoints', 'nni'))
    drawn = sorted(p.name for p in (search_run / 'bundle').iterdir())
    shutil.rmtree(run / 'bundle')
    (run / 'bundle').mkdir()  # the search-time data description is gone too: the data are loaded again
    code, out, _ = _cli(capsys, 'bundle', run)
    assert code == 0 and sorted(p.name for p in (run / 'bundle').iterdir()) == drawn
    summary = json.loads((run / 'bundle' / 'summary.json').read_text())
    assert summary['errors'] == [] and summary['data']['in_channels'] == 1


@pytest.mark.slow  # 22.70 s loaded: NNI's freeze of 21 LayerChoices and torch.jit.trace of 21 blocks
def test_export_of_a_proxylessnas_space_run_is_its_frozen_network(tmp_path, capsys):
    import torch
    from search_spaces.proxylessnas import ProxylessSpace
    run = tmp_path / 'proxyless-run'
    (run / 'bundle').mkdir(parents=True)
    space = {'name': 'proxylessnas', 'args': {'width_multiplier': 0.25}}
    (run / 'config.yaml').write_text(yaml.safe_dump({**TINY_SEARCH, 'space': space}))
    sample = {f'block_{i}': 'zero' if i in (1, 2) else 'mb3_k3' for i in range(21)}
    (run / 'sample.json').write_text(json.dumps(sample))
    (run / 'bundle' / 'summary.json').write_text(json.dumps({'data': {'in_channels': 1, 'image_size': 8,
                                                                       'num_classes': 10}}))
    code, _, err = _cli(capsys, 'export', run, '-f', 'torchscript', '-o', tmp_path / 'p.pt')
    assert code == 0, err
    loaded = torch.jit.load(str(tmp_path / 'p.pt'))
    expected = ProxylessSpace(num_classes=10, in_channels=1, width_multiplier=0.25, dataset='digits').freeze(sample)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in expected.parameters())
    assert loaded(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    code, _, err = _cli(capsys, 'export', run, '-f', 'torchscript', '--recipe', tmp_path / 'r.yml')
    _one_line_error(code, err, '--recipe')
