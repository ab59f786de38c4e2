"""The search runner and the CLI: run folder, resume, divergence, and one-line errors for bad input."""
from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl

from nni_darts_variants import list_strategies
from nni_darts_variants.cli import main
from nni_darts_variants.config import ConfigError
from nni_darts_variants.search import DivergenceError, resolve_config, run_search
from nni_darts_variants.registry import get_strategy


def tiny_config(strategy='darts', epochs=2, **strategy_args):
    return {'seed': 3, 'strategy': {'name': strategy, 'args': strategy_args},
            'space': {'name': 'darts', 'args': {'width': 8, 'num_cells': 3}},
            'data': {'name': 'digits', 'batch_size': 64, 'limit': 256},
            'train': {'max_epochs': epochs, 'progress_bar': False, 'eval_batches': 2},
            'output': {'bundle': False}}


def test_run_folder_holds_everything(tmp_path):
    cfg = tiny_config()
    cfg['output']['bundle'] = True
    result = run_search(cfg, output=tmp_path / 'run')
    run = tmp_path / 'run'
    for name in ('config.yaml', 'config.json', 'genotype.json', 'sample.json', 'alphas.json', 'alpha_history.json',
                 'result.json', 'checkpoints/last.ckpt', 'bundle/summary.json', 'bundle/cell_normal.png',
                 'bundle/cell_reduce.png', 'bundle/weights_normal.png', 'bundle/history_normal.png'):
        assert (run / name).exists(), name
    history = json.loads((run / 'alpha_history.json').read_text())
    assert [h['epoch'] for h in history] == [0, 1]
    assert 0.0 <= history[-1]['supernet_val_acc'] <= 1.0
    assert json.loads((run / 'sample.json').read_text()) == result.sample
    assert list((run / 'metrics').glob('version_*/metrics.csv'))


def test_finished_run_is_not_overwritten(tmp_path):
    run_search(tiny_config(epochs=1), output=tmp_path / 'run')
    with pytest.raises(ConfigError, match='already holds a finished run'):
        run_search(tiny_config(epochs=1), output=tmp_path / 'run')
    with pytest.raises(ConfigError, match='nothing to resume'):
        run_search(None, resume=tmp_path / 'run')
    run_search(tiny_config(epochs=1), output=tmp_path / 'run', overwrite=True)


class _Kill(pl.Callback):
    """Interrupts the search at the start of ``epoch`` (after the previous epoch's checkpoint)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


# P-DARTS: three 1-epoch stages, so the interruption (after epoch 1) falls inside stage 2 of 3.
RESUME_ARGS = {'pdarts': {'stage_cells': [3, 4, 5], 'num_to_keep': [5, 3, 1], 'epochs_per_stage': 1,
                          'stage_warmup_epochs': 0}}


# The default run keeps a diagonal: GDAS (weight step first, zero-filled gradients kept in the optimizer state),
# ProxylessNAS (sampled paths) and P-DARTS (an interruption inside a stage); the others are `slow`.
RESUME_DEFAULT = {'gdas', 'proxyless', 'pdarts'}


@pytest.mark.parametrize('name', [n if n in RESUME_DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(list_strategies())])
def test_resumed_search_equals_uninterrupted(tmp_path, name):
    args = RESUME_ARGS.get(name) or dict(get_strategy(name).smoke_kwargs())
    cfg = tiny_config(name, epochs=3, **args)
    full = run_search(cfg, output=tmp_path / 'full')
    with pytest.raises(BaseException):
        run_search(cfg, output=tmp_path / 'part', callbacks=[_Kill(2)])
    assert (tmp_path / 'part' / 'checkpoints' / 'last.ckpt').exists()
    assert not (tmp_path / 'part' / 'result.json').exists()
    resumed = run_search(None, resume=tmp_path / 'part')
    assert resumed.genotype == full.genotype
    assert json.loads((tmp_path / 'part' / 'alphas.json').read_text()) == \
        json.loads((tmp_path / 'full' / 'alphas.json').read_text())
    assert [h['epoch'] for h in json.loads((tmp_path / 'part' / 'alpha_history.json').read_text())] == [0, 1, 2]


@pytest.mark.parametrize('strategy, args', [('darts', {'order': 2}), ('gdas', {})])
def test_mixed_precision_and_channels_last_search(tmp_path, strategy, args):
    """bf16 autocast and the channels-last layout run every part of a search step, including second-order DARTS's
    Hessian-vector product and GDAS's Gumbel sampling, and leave finite, moved alphas."""
    cfg = tiny_config(strategy, epochs=1, arc_learning_rate=0.1, **args)  # large steps: alphas must visibly move
    cfg['train'].update(precision='bf16-mixed', channels_last=True)
    result = run_search(cfg, output=tmp_path / 'run')
    alphas = json.loads((tmp_path / 'run' / 'alphas.json').read_text())
    values = [v for vs in alphas.values() for v in (vs if isinstance(vs[0], float) else sum(vs, []))]
    assert all(abs(v) < 1e3 for v in values) and any(abs(v) > 1e-2 for v in values)
    assert result.genotype is not None


def test_same_seed_same_run(tmp_path):
    a = run_search(tiny_config(epochs=1), output=tmp_path / 'a')
    b = run_search(tiny_config(epochs=1), output=tmp_path / 'b')
    assert a.genotype == b.genotype
    assert (tmp_path / 'a' / 'alphas.json').read_text() == (tmp_path / 'b' / 'alphas.json').read_text()


def test_divergence_stops_with_epoch_and_step(tmp_path):
    cfg = tiny_config(epochs=3)
    cfg['train']['learning_rate'] = 1e12
    cfg['train']['momentum'] = 0.0
    with pytest.raises(DivergenceError, match=r'epoch \d+, step \d+'):
        run_search(cfg, output=tmp_path / 'run')
    assert not (tmp_path / 'run' / 'result.json').exists()


@pytest.mark.parametrize('override, message', [
    ('strategy.name=dartz', "unknown strategy 'dartz'; valid strategies: darts"),
    ('space.name=nope', "unknown search space 'nope'"),
    ('data.name=mnist', "unknown dataset 'mnist'"),
    ('train.max_epoch=3', "unknown key(s) ['max_epoch']"),
    ('strategy.args.ordr=2', "unknown argument(s) ['ordr']"),
    ('train.learning_rate=-1', 'train.learning_rate must be >= 0'),
    ('train.max_epochs=two', 'train.max_epochs must be a number'),
    ('strategy.args.arc_learning_rate=-0.1', 'arc_learning_rate must be positive'),
    ('data.name=imagefolder', 'data.root is required'),
    ('space.args.width=7', 'width must be even'),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, override, message):
    config = tmp_path / 'c.yml'
    config.write_text('space: {args: {width: 8, num_cells: 3}}\ntrain: {max_epochs: 1, progress_bar: false}\n')
    code = main(['search', str(config), '--set', override, '-o', str(tmp_path / 'run')])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    config = tmp_path / 'bad.yml'
    config.write_text('strategy:\n  name: darts\n  args: {order: 2\n')
    assert main(['search', str(config)]) == 2
    err = capsys.readouterr().err
    assert 'malformed YAML at line' in err and err.count('\n') == 1


def test_missing_dataset_folder(tmp_path, capsys):
    config = tmp_path / 'c.yml'
    config.write_text(f'data: {{name: imagefolder, root: {tmp_path / "nowhere"}}}\n')
    assert main(['search', str(config)]) == 2
    assert 'does not exist' in capsys.readouterr().err


def test_empty_dataset_folder(tmp_path, capsys):
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    config = tmp_path / 'c.yml'
    config.write_text(f'data: {{name: imagefolder, root: {tmp_path / "empty"}}}\n')
    assert main(['search', str(config)]) == 2
    assert 'holds no images' in capsys.readouterr().err


def test_resolve_config_fills_defaults():
    cfg = resolve_config({'strategy': {'name': 'darts', 'args': {'order': 2}}})
    assert cfg['train']['max_epochs'] == 50 and cfg['data']['train_portion'] == 0.5
    assert cfg['strategy']['args'] == {'order': 2}


def test_cli_search_prints_architecture_and_files(tmp_path, capsys):
    config = tmp_path / 'c.yml'
    config.write_text('space: {args: {width: 8, num_cells: 3}}\ndata: {limit: 256}\n'
                      'train: {max_epochs: 1, progress_bar: false, eval_batches: 2}\nevaluate: {epochs: 1}\n')
    assert main(['search', str(config), '-o', str(tmp_path / 'run')]) == 0
    out = capsys.readouterr().out
    assert 'architecture: normal: [' in out and 'test accuracy' in out and str(tmp_path / 'run') in out


def test_cli_list_and_help(capsys):
    assert main(['list']) == 0
    out = capsys.readouterr().out
    assert 'darts' in out and 'search spaces:' in out
    with pytest.raises(SystemExit) as exc:
        main(['--help'])
    assert exc.value.code == 0
