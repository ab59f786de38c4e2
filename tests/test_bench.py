"""``nni-darts bench``: the saved-tensor accounting on known answers, the step meter, rows, ratios and JSON."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from nni_darts_variants import bench, bench_cli
from nni_darts_variants.bench import BenchConfig, add_ratios
from nni_darts_variants.max_batch import find_max_batch
from nni_darts_variants.memory import LiveSavedTensorCounter, SavedTensorCounter

TINY = ['--width', '4', '--cells', '3', '--batch-size', '2', '--image-size', '8', '--steps', '1', '--warmup', '1',
        '--device', 'cpu', '--no-prime']
TINY_CFG = dict(width=4, num_cells=3, batch_size=2, image_size=8, steps=1, warmup=1, device='cpu', prime=False)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.mark.parametrize('counter_class', [SavedTensorCounter, LiveSavedTensorCounter])
@pytest.mark.parametrize('include_parameters', [False, True])
def test_one_conv_saves_its_input_and_weight(counter_class, include_parameters):
    conv = nn.Conv2d(3, 5, 3, bias=False)
    x = torch.randn(4, 3, 9, 9)
    counter = counter_class(include_parameters=include_parameters, parameters=conv.parameters())
    with counter.active():
        conv(x).sum().backward()
    expected = _nbytes(x) + (_nbytes(conv.weight) if include_parameters else 0)
    assert counter.bytes == expected


def test_live_counter_peak_is_one_graph_and_total_is_both():
    """Two graphs one after the other (an architecture and a weight step): peak = one input, total = two."""
    conv = nn.Conv2d(3, 5, 3, bias=False)
    counter = LiveSavedTensorCounter(parameters=conv.parameters())
    with counter.active():
        for _ in range(2):
            x = torch.randn(4, 3, 9, 9)
            conv(x).sum().backward()
            assert counter.live_bytes == 0  # backward released what it saved
            del x
    assert counter.peak_bytes == _nbytes(torch.empty(4, 3, 9, 9))
    assert counter.bytes == 2 * counter.peak_bytes


def test_live_counter_two_graphs_alive_together_add_up():
    conv = nn.Conv2d(3, 5, 3, bias=False)
    counter = LiveSavedTensorCounter(parameters=conv.parameters())
    xs = [torch.randn(2, 3, 9, 9) for _ in range(2)]
    with counter.active():
        losses = [conv(x).sum() for x in xs]
        assert counter.live_bytes == sum(map(_nbytes, xs))
        sum(losses).backward()
    assert counter.peak_bytes == counter.bytes == sum(map(_nbytes, xs)) and counter.live_bytes == 0


def test_step_meter_counts_one_conv_step_in_a_real_trainer():
    """The Lightning callback path: the activation of a one-conv training step is its input."""
    import pytorch_lightning as pl

    class OneConv(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)

        def training_step(self, batch, batch_idx):
            return self.conv(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cfg = BenchConfig(**TINY_CFG, channels_last=False).check()
    meter = bench.step_meter(warmup=1, steps=2, device='cpu', channels_last=False, rss_baseline=0)
    loaders = bench.bench_loaders(BenchConfig(**{**TINY_CFG, 'steps': 2}), batch_size=3)
    bench.bench_trainer(cfg, 1, [meter]).fit(OneConv(), train_dataloaders=loaders['train'])
    assert meter.activation == [_nbytes(torch.empty(3, 3, 8, 8))]
    assert len(meter.seconds) == 2 and all(s > 0 for s in meter.seconds)
    assert meter.params == 4 * 3 * 3 * 3


@pytest.fixture(scope='module')
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    code = bench.bench_main(TINY + ['--strategies', 'darts', 'nni-darts', '--output', str(out)])
    return code, json.loads(out.read_text())


def test_tiny_bench_returns_every_field_for_ours_and_nni(tiny_report):
    code, report = tiny_report
    assert code == 0
    rows = {r['name']: r for r in report['rows']}
    assert set(rows) == {'darts', 'nni-darts'}
    for row in rows.values():
        assert row['error'] is None
        for figure in bench.FIGURES:
            assert row[figure] > 0
            assert row[f'{figure}_vs_darts'] is not None and row[f'{figure}_vs_nni'] is not None
    assert rows['nni-darts']['source'] == 'nni' and rows['darts']['source'] == 'ours'
    assert all(row['arch_params'] > 0 for row in rows.values())
    assert all(0 < row['step_cpu_seconds'] and 0 < row['first_step_seconds'] for row in rows.values())


def test_ratios_to_the_reference_rows_are_one(tiny_report):
    rows = {r['name']: r for r in tiny_report[1]['rows']}
    for figure in bench.FIGURES:
        assert rows['darts'][f'{figure}_vs_darts'] == 1.0
        assert rows['nni-darts'][f'{figure}_vs_nni'] == 1.0
        assert math.isclose(rows['nni-darts'][f'{figure}_vs_darts'] * rows['darts'][f'{figure}_vs_nni'], 1.0)


def test_json_flag_prints_parseable_json(capsys, monkeypatch):
    rows = [{'name': 'darts', 'batch_size': 2, 'error': None, 'activation_bytes': 10, 'saved_bytes': 20,
             'peak_bytes': 30, 'step_seconds': 0.5, 'params': 7}]
    monkeypatch.setattr(bench_cli, 'run_bench', lambda cfg, progress=None: add_ratios([dict(r) for r in rows]))
    assert bench.bench_main(TINY + ['--json']) == 0
    report = json.loads(capsys.readouterr().out)
    assert report['rows'][0]['activation_bytes_vs_darts'] == 1.0
    assert report['rows'][0]['activation_bytes_vs_nni'] is None  # no nni-darts row
    assert report['config']['batch_size'] == 2


def test_table_lists_rows_and_errors(capsys, monkeypatch):
    rows = [{'name': 'darts', 'batch_size': 2, 'error': None, 'activation_bytes': 2 ** 20, 'saved_bytes': 2 ** 21,
             'peak_bytes': 2 ** 22, 'step_seconds': 0.5, 'params': 10 ** 6, 'note': 'x=1'},
            {'name': 'broken', 'batch_size': 2, 'error': 'ImportError: nope'}]
    monkeypatch.setattr(bench_cli, 'run_bench', lambda cfg, progress=None: add_ratios([dict(r) for r in rows]))
    assert bench.bench_main(TINY) == 1  # a failed row is reported, and the exit code says so
    out = capsys.readouterr().out
    assert '1.0 (1.00/-)' in out and '500.0 (1.00/-)' in out and 'broken  error: ImportError: nope' in out


def test_a_failing_strategy_becomes_an_error_row(monkeypatch):
    def broken(row):
        raise ImportError(f'{row} cannot be imported')
    monkeypatch.setattr(bench, 'build_row_strategy', broken)
    rows = bench.run_bench(strategies=['gdas'], **TINY_CFG)
    assert rows[0]['name'] == 'gdas' and rows[0]['error'] == 'ImportError: gdas cannot be imported'


def test_rows_cover_the_registry_and_nni():
    from nni_darts_variants import list_strategies
    rows = bench.available_rows()
    assert set(list_strategies()) <= set(rows)
    assert {'darts-2nd', 'nni-darts', 'nni-gumbel', 'nni-proxyless'} <= set(rows)
    with pytest.raises(ValueError, match='unknown bench row'):
        bench.run_bench(strategies=['nope'], **TINY_CFG)


def test_bench_overrides_make_every_batch_a_full_search_step():
    strategy, note = bench.build_row_strategy('darts-2nd')
    assert strategy.order == 2
    if 'proxyless' in bench.available_rows():
        strategy, note = bench.build_row_strategy('proxyless')
        assert strategy.arch_update_every == 1 and 'arch_update_every=1' in note
    if 'pdarts' in bench.available_rows():
        strategy, note = bench.build_row_strategy('pdarts')
        assert strategy.stage_warmup_epochs == 0 and 'stage-1' in note


@pytest.mark.parametrize('bad', [dict(dtype='float64'), dict(device='tpu'), dict(steps=0),
                                 dict(dtype='float16', device='cpu'), dict(probe_batches=(8, 4))])
def test_bad_config_raises_value_error_naming_it(bad):
    with pytest.raises(ValueError):
        BenchConfig(**{**TINY_CFG, **bad}).check()


def test_max_batch_solves_the_affine_memory_model():
    """m(b) = 1000 + 300 b: a budget of 10000 fits 30 samples; the result is verified at that size."""
    calls = []

    def fake(row, cfg, batch):
        calls.append(batch)
        return {'activation_bytes': 1000 + 300 * batch}

    cfg = BenchConfig(**TINY_CFG, probe_batches=(2, 6)).check()
    out = find_max_batch('darts', cfg, 10000, measure=fake)
    assert out['max_batch'] == 30 and out['max_batch_fits'] and out['max_batch_bytes'] == 10000
    assert calls == [2, 6, 30]
    assert find_max_batch('darts', cfg, 1200, measure=fake)['max_batch'] is None


@pytest.mark.slow
def test_max_batch_on_a_real_tiny_row():
    cfg = BenchConfig(**TINY_CFG, probe_batches=(2, 4)).check()
    cache = {}

    def measure(row, cfg, batch):
        if batch not in cache:
            cache[batch] = bench.measure_row(row, cfg, batch)
        return cache[batch]

    out = find_max_batch('darts', cfg, 3 * measure('darts', cfg, 4)['activation_bytes'], measure=measure)
    assert out['max_batch'] >= 8 and out['max_batch_fits']


@pytest.mark.parametrize('row', ['darts-2nd', 'gdas', 'nni-gumbel'])
def test_bf16_autocast_and_channels_last_keep_the_search_step_finite(row):
    """Second-order DARTS (``torch.autograd.grad`` HVP) and Gumbel sampling under CPU bf16 autocast."""
    if row not in bench.available_rows():
        pytest.skip(f'{row} not registered')
    import pytorch_lightning as pl
    cfg = BenchConfig(**TINY_CFG, dtype='bfloat16', channels_last=True).check()
    pl.seed_everything(0, verbose=False)
    strategy, module, epochs, _ = bench.build_row_module(row, cfg)
    alphas = [p.detach().clone() for p in module.arch_parameters()]
    meter = bench.step_meter(cfg.warmup, cfg.steps, 'cpu', True, 0)
    bench.bench_trainer(cfg, epochs, [meter]).fit(module, train_dataloaders=bench.bench_loaders(cfg, 2))
    after = module.arch_parameters()
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(alphas, after))
    assert all(torch.isfinite(w).all() for w in module.parameters())
    assert len(meter.seconds) == 1 and meter.activation[0] > 0


def test_isolated_child_gets_the_same_config():
    """``--isolate`` re-runs each row as ``python -m nni_darts_variants.bench_cli`` with the config as arguments."""
    cfg = BenchConfig(**{**TINY_CFG, 'strategies': ['darts'], 'dtype': 'bfloat16', 'channels_last': True,
                         'compile': True, 'max_batch': 12345, 'probe_batches': (2, 3)})
    args = bench_cli.build_parser().parse_args(bench_cli._config_argv(cfg))
    for key in ('width', 'num_cells', 'batch_size', 'image_size', 'device', 'dtype', 'channels_last', 'compile',
                'steps', 'warmup', 'seed', 'strategies', 'max_batch', 'max_batch_metric', 'prime'):
        assert getattr(args, key) == getattr(cfg, key), key
    assert tuple(args.probe_batches) == cfg.probe_batches


@pytest.mark.gpu
@pytest.mark.parametrize('dtype', ['float32', 'float16', 'bfloat16'])
def test_tiny_bench_on_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device')
    rows = bench.run_bench(strategies=['darts', 'gdas', 'nni-darts'],
                           **{**TINY_CFG, 'device': 'cuda', 'dtype': dtype, 'channels_last': True})
    for row in rows:
        assert row['error'] is None, row
        assert row['peak_kind'] == 'cuda_max_allocated' and row['peak_bytes'] > row['activation_bytes'] > 0


def _captured_config(monkeypatch, argv):
    seen = {}

    def fake(cfg, progress=None):
        seen['cfg'] = cfg
        return add_ratios([{'name': 'darts', 'batch_size': cfg.batch_size, 'error': None, 'activation_bytes': 1,
                            'saved_bytes': 1, 'peak_bytes': 1, 'step_seconds': 1.0, 'params': 1}])
    monkeypatch.setattr(bench_cli, 'run_bench', fake)
    assert bench_cli.bench_main(argv) == 0
    return seen['cfg']


def test_default_is_the_quick_preset_and_paper_is_one_flag_away(monkeypatch):
    quick = _captured_config(monkeypatch, ['--device', 'cpu', '--no-prime'])
    assert (quick.batch_size, quick.steps, quick.warmup, quick.num_cells, quick.width) == (8, 1, 1, 8, 16)
    paper = _captured_config(monkeypatch, ['--device', 'cpu', '--paper'])
    assert (paper.batch_size, paper.steps, paper.warmup) == (64, 5, 2)
    mixed = _captured_config(monkeypatch, ['--device', 'cpu', '--paper', '--batch-size', '32'])
    assert (mixed.batch_size, mixed.steps) == (32, 5)  # an explicit option overrides the preset


def test_strategies_take_commas_as_well_as_spaces(monkeypatch):
    rows = _captured_config(monkeypatch, ['--device', 'cpu', '--no-prime', '--strategies', 'darts,gdas', 'pcdarts'])
    assert rows.strategies == ['darts', 'gdas', 'pcdarts']


def test_a_progress_line_per_row_and_the_ratio_to_nni_of_the_same_algorithm(monkeypatch, capsys):
    calls = []

    def fake_measure(row, cfg, batch_size=None):
        seconds = {'darts': 1.0, 'nni-darts': 2.0, 'gdas': 3.0, 'nni-gumbel': 4.0}[row]
        return {'name': row, 'batch_size': 2, 'error': None, 'activation_bytes': 2 ** 20, 'saved_bytes': 1,
                'peak_bytes': 1, 'step_seconds': seconds, 'params': 1}
    monkeypatch.setattr(bench, 'measure_row', fake_measure)
    rows = bench.run_bench(strategies=['darts', 'gdas', 'nni-darts', 'nni-gumbel'], **TINY_CFG,
                           progress=lambda i, n, row: calls.append(bench_cli.progress_line(i, n, row)))
    assert calls == ['[1/4] darts: 1000.0 ms per step, activation 1.0 MB',
                     '[2/4] gdas: 3000.0 ms per step, activation 1.0 MB',
                     '[3/4] nni-darts: 2000.0 ms per step, activation 1.0 MB',
                     '[4/4] nni-gumbel: 4000.0 ms per step, activation 1.0 MB']
    by_name = {r['name']: r for r in rows}
    assert by_name['darts']['step_seconds_vs_counterpart'] == 0.5
    assert by_name['gdas']['step_seconds_vs_counterpart'] == 0.75
    assert by_name['nni-darts']['step_seconds_vs_counterpart'] is None
    table = bench_cli.format_table(rows)
    assert 'step vs NNI' in table.splitlines()[0] and ' 0.75 ' in table
