"""NAS-Bench-201: the search space, the benchmark strings and table, every strategy on the space, recipes."""
from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nni_darts_variants.nasbench201 import (
    NasBench201Table,
    TableError,
    all_archs,
    arch_to_sample,
    export_nb201,
    parse_arch,
    sample_to_arch,
    skip_share,
)
from search_spaces.nasbench201 import NB201_OPERATIONS, NasBench201Space

ROOT = Path(__file__).resolve().parents[1]
SHARED_TABLE = ROOT.parent / 'shared' / 'data' / 'nasbench201' / 'nb201_cifar10.csv'
OPS = ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')  # the benchmark's list, written out
ALL_SKIP = '|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|'
OPTIMUM = '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|'


def _independent_strings() -> set[str]:
    """The 15,625 strings built directly from the benchmark's format (node t lists ops from nodes 0..t-1)."""
    strings = set()
    for ops in itertools.product(OPS, repeat=6):
        a, b, c, d, e, f = ops
        strings.add(f'|{a}~0|+|{b}~0|{c}~1|+|{d}~0|{e}~1|{f}~2|')
    return strings


# ----- strings and samples -----

def test_every_benchmark_string_maps_to_a_sample_and_back():
    space = NasBench201Space(width=4, num_cells=1)
    labels = set(space.simplify())
    strings = list(all_archs())
    assert set(strings) == _independent_strings() and len(strings) == 15625
    for arch in strings:
        sample = arch_to_sample(arch)
        assert set(sample) == labels
        assert sample_to_arch(sample) == arch
        assert sample_to_arch(arch_to_sample(arch, hub=True)) == arch


def test_sample_labels_are_the_benchmark_edges():
    sample = arch_to_sample('|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|none~2|')
    assert sample == {'nb201/op_1_0': 'nor_conv_3x3', 'nb201/op_2_0': 'none', 'nb201/op_2_1': 'skip_connect',
                      'nb201/op_3_0': 'avg_pool_3x3', 'nb201/op_3_1': 'nor_conv_1x1', 'nb201/op_3_2': 'none'}
    hub = arch_to_sample('|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|none~2|', hub=True)
    assert hub['cell/0_1'] == 'conv_3x3' and hub['cell/1_3'] == 'conv_1x1' and hub['cell/1_2'] == 'skip_connect'


def test_frozen_sample_builds_exactly_the_cell():
    arch = '|nor_conv_3x3~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|none~2|'
    space = NasBench201Space(width=4, num_cells=2)
    model = space.freeze(arch_to_sample(arch))
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    cell = model.cells[0]
    convs = [m for m in cell.modules() if isinstance(m, nn.Conv2d)]
    assert sorted(c.kernel_size for c in convs) == [(1, 1), (3, 3)]


@pytest.mark.parametrize('bad', ['|nor_conv_3x3~0|+|none~0|', '|conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|',
                                 '|none~1|+|none~0|none~1|+|none~0|none~1|none~2|', 'resnet', 42])
def test_unknown_benchmark_string_is_a_one_line_error(bad):
    with pytest.raises(TableError) as err:
        parse_arch(bad)
    assert '\n' not in str(err.value) and 'NAS-Bench-201' in str(err.value)


def test_skip_share():
    assert skip_share(ALL_SKIP) == 1.0
    assert skip_share(OPTIMUM) == pytest.approx(1 / 6)


# ----- the table -----

def test_shipped_table_lookup_and_reference_points():
    table = NasBench201Table()
    assert len(table) == 15625 and set(table.accuracy) == _independent_strings()
    assert table.lookup(ALL_SKIP) == pytest.approx(54.297)
    assert table.lookup(arch_to_sample(OPTIMUM)) == pytest.approx(94.373)
    assert table.lookup(arch_to_sample(OPTIMUM, hub=True)) == pytest.approx(94.373)
    stats = table.stats()
    assert stats['optimum_arch'] == OPTIMUM
    assert stats['median'] == pytest.approx(90.745) and stats['mean'] == pytest.approx(87.06, abs=0.01)
    assert table.percentile(stats['optimum']) == 100.0
    assert table.percentile(stats['median']) == pytest.approx(50.0, abs=0.01)


@pytest.mark.skipif(not SHARED_TABLE.exists(), reason=f'the shared NAS-Bench-201 table is absent ({SHARED_TABLE})')
def test_shipped_table_equals_the_shared_csv():
    rows = SHARED_TABLE.read_text().strip().splitlines()[1:]
    shared = {arch: float(acc) for arch, acc in (r.rsplit(',', 1) for r in rows)}
    assert NasBench201Table(SHARED_TABLE).accuracy == shared == NasBench201Table().accuracy


def test_table_reads_plain_and_gzipped_csv(tmp_path):
    text = f'arch,cifar10_test\n{ALL_SKIP},54.3\n{OPTIMUM},94.4\n'
    (tmp_path / 't.csv').write_text(text)
    (tmp_path / 't.csv.gz').write_bytes(gzip.compress(text.encode()))
    for name in ('t.csv', 't.csv.gz'):
        table = NasBench201Table(tmp_path / name)
        assert table.lookup(OPTIMUM) == 94.4 and table.percentile(60.0) == 50.0
        with pytest.raises(TableError, match='not in'):
            table.lookup('|none~0|+|none~0|none~1|+|none~0|none~1|none~2|')


def test_missing_or_malformed_table_is_a_one_line_error(tmp_path):
    cases = {tmp_path / 'absent.csv': 'not found',
             tmp_path / 'header.csv': 'header',
             tmp_path / 'row.csv': 'line 2 is malformed',
             tmp_path / 'arch.csv': 'line 2 is malformed'}
    (tmp_path / 'header.csv').write_text('cell,accuracy\n')
    (tmp_path / 'row.csv').write_text(f'arch,cifar10_test\n{ALL_SKIP},high\n')
    (tmp_path / 'arch.csv').write_text('arch,cifar10_test\n|x~0|,1.0\n')
    for path, message in cases.items():
        with pytest.raises(TableError, match=message) as err:
            NasBench201Table(path)
        assert '\n' not in str(err.value)


def test_export_writes_nb201_json(tmp_path):
    record = export_nb201(arch_to_sample(ALL_SKIP), tmp_path)
    assert record['arch'] == ALL_SKIP and record['cifar10_test'] == pytest.approx(54.297)
    assert json.loads((tmp_path / 'nb201.json').read_text()) == record
    assert export_nb201({'normal/op_2_0': 'sep_conv_3x3'}, tmp_path / 'x') is None


# ----- the space -----

def test_space_is_the_official_search_network():
    space = NasBench201Space(width=16, num_cells=5)
    assert tuple(NB201_OPERATIONS) == OPS
    kinds = [type(m).__name__ for m in space.cells]
    assert kinds == ['NasBench201Cell'] * 5 + ['ResNetBasicBlock'] + ['NasBench201Cell'] * 5 + \
        ['ResNetBasicBlock'] + ['NasBench201Cell'] * 5
    assert [space.cells[i].channels for i in (0, 6, 12)] == [16, 32, 64]
    assert space.stem[0].out_channels == 16 and space.classifier.in_features == 64
    assert isinstance(space.lastact[0], nn.BatchNorm2d) and isinstance(space.lastact[1], nn.ReLU)
    mutables = space.simplify()
    assert len(mutables) == 6 and all(list(m.values) == list(OPS) for m in mutables.values())
    edge = space.cells[0].edges['2_1']
    assert edge.darts_edge.channels == 16 and edge.darts_edge.stride == 1 and not edge.darts_edge.pool_bn
    bns = [m for m in edge.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not bn.affine and not bn.track_running_stats for bn in bns)
    tracked = NasBench201Space(width=4, num_cells=1, track_running_stats=True, affine=True).cells[0].edges['1_0']
    assert all(m.affine and m.track_running_stats for m in tracked.modules() if isinstance(m, nn.BatchNorm2d))
    assert space(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_block_halves_and_doubles():
    space = NasBench201Space(width=4, num_cells=1)
    block = space.cells[1]
    assert block(torch.randn(2, 4, 8, 8)).shape == (2, 8, 4, 4)


def test_bad_space_argument_is_an_error():
    with pytest.raises(ValueError, match='positive'):
        NasBench201Space(width=0)
    with pytest.raises(ValueError, match='operations'):
        NasBench201Space(width=4, num_cells=1, operations=['sep_conv_3x3'])


def test_space_is_registered():
    from nni_darts_variants.registry import build_space, list_spaces
    assert 'nasbench201' in list_spaces()
    assert isinstance(build_space('nasbench201', num_classes=10, in_channels=3, width=4, num_cells=1),
                      NasBench201Space)


# ----- the strategies on the space -----

def _tiny_nb201(**kwargs):
    return NasBench201Space(width=4, num_cells=1, in_channels=1, **kwargs)


def _strategy_kwargs(name):
    from nni_darts_variants.registry import get_strategy
    kwargs = get_strategy(name).smoke_kwargs()
    if name == 'pdarts':  # fixed depth: 1 cell per stage in every stage
        kwargs['stage_cells'] = (1,)
    return kwargs


def _registered():
    from nni_darts_variants.registry import list_strategies
    return sorted(list_strategies())


@pytest.mark.parametrize('name', _registered())
def test_every_strategy_exports_a_valid_cell(name):
    from nni_darts_variants.registry import create_strategy
    from nni_darts_variants.testing import run_tiny_search, tiny_loaders
    result = run_tiny_search(create_strategy(name, **_strategy_kwargs(name)), space=_tiny_nb201(),
                             loaders=tiny_loaders(n=16))
    arch = sample_to_arch(result.sample)
    assert arch in _independent_strings()
    assert NasBench201Table().lookup(arch) > 0
    moved = [float((a - b).abs().max()) for a, b in zip(result.snapshot.after, result.snapshot.before)]
    assert moved and max(moved) > 0


def test_pdarts_prunes_the_edges_with_a_fixed_depth():
    from nni_darts_variants.registry import create_strategy
    from nni_darts_variants.testing import run_tiny_search, tiny_loaders
    strategy = create_strategy('pdarts', stage_cells=(1, 1), num_to_keep=(3, 1), epochs_per_stage=1,
                               stage_warmup_epochs=0, skip_dropout=(0.0, 0.0))
    result = run_tiny_search(strategy, space=_tiny_nb201(), loaders=tiny_loaders(n=16), max_epochs=2)
    kept = strategy.oneshot_module.stage_operations
    assert sorted(kept) == sorted(arch_to_sample(ALL_SKIP)) and all(len(ops) == 3 for ops in kept.values())
    assert all(result.sample[label] in ops for label, ops in kept.items())


def test_pcdarts_runs_partial_channels_on_every_edge():
    from nni_darts_variants.registry import create_strategy
    from nni_darts_variants.strategies.pcdarts import PartialChannelEdge
    space = NasBench201Space(width=8, num_cells=1, in_channels=1)
    create_strategy('pcdarts', partial_channels_k=4).mutate_model(space)
    edges = [m for m in space.modules() if isinstance(m, PartialChannelEdge)]
    assert len(edges) == 18  # 3 cells x 6 edges
    for edge in edges:
        conv = next(m for m in edge['nor_conv_3x3'].modules() if isinstance(m, nn.Conv2d))
        assert conv.in_channels == conv.out_channels == edge.config.get('channels', conv.in_channels)
        assert edge.partial_channels_k == 4
    widths = sorted({next(m for m in e['nor_conv_1x1'].modules() if isinstance(m, nn.Conv2d)).in_channels
                     for e in edges})
    assert widths == [2, 4, 8]  # C/K at C = 8, 16, 32
    assert space(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_mergenas_merges_the_dense_convolutions_with_skip_and_pool_folded_in():
    from nni_darts_variants.merged_conv import MergedDenseEdgeOp
    torch.manual_seed(0)
    op = MergedDenseEdgeOp(3, OPS).eval()
    x = torch.randn(2, 3, 6, 6)
    relu = torch.relu(x)
    weight = op.weight.detach()

    def bn(y):  # non-affine BN with batch statistics, as in training; the module is in eval with fresh stats
        return (y - y.mean((0, 2, 3), keepdim=True)) / torch.sqrt(y.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                   + op.bn.eps)
    op.train()
    conv3 = nn.functional.conv2d(relu, weight, padding=1)
    conv1 = nn.functional.conv2d(relu, weight[:, :, 1:2, 1:2])
    pool = nn.AvgPool2d(3, 1, 1, count_include_pad=True)(x)
    one_hot = {name: torch.eye(5)[i] for i, name in enumerate(OPS)}
    assert torch.allclose(op(x, one_hot['nor_conv_3x3']), bn(conv3), atol=1e-4)
    assert torch.allclose(op(x, one_hot['nor_conv_1x1']), bn(conv1), atol=1e-4)
    assert torch.allclose(op(x, one_hot['skip_connect']), x, atol=1e-6)
    assert torch.allclose(op(x, one_hot['avg_pool_3x3']), pool, atol=1e-6)
    assert torch.count_nonzero(op(x, one_hot['none'])) == 0
    w = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    expected = 0.45 * bn((0.3 * conv1 + 0.15 * conv3) / 0.45) + 0.2 * x + 0.25 * pool
    assert torch.allclose(op(x, w), expected, atol=1e-4)


def test_mergenas_edges_on_the_space_use_the_dense_merge_and_freeze_to_benchmark_ops():
    from nni_darts_variants.merged_conv import MergedDenseEdgeOp
    from nni_darts_variants.registry import create_strategy
    from nni_darts_variants.strategies.mergenas import MergedEdge
    space = _tiny_nb201()
    create_strategy('mergenas').mutate_model(space)
    edges = [m for m in space.modules() if isinstance(m, MergedEdge)]
    assert len(edges) == 18 and all(isinstance(e.merged, MergedDenseEdgeOp) for e in edges)
    frozen = edges[0].freeze({edges[0].label: 'nor_conv_1x1'})
    assert [m.kernel_size for m in frozen.modules() if isinstance(m, nn.Conv2d)] == [(1, 1)]


def test_dropnas_groups_convolutions_against_parameter_free_ops():
    from nni_darts_variants.registry import create_strategy
    from nni_darts_variants.strategies.dropnas import DropEdge
    space = _tiny_nb201()
    create_strategy('dropnas').mutate_model(space)
    edge = next(m for m in space.modules() if isinstance(m, DropEdge))
    groups = [[edge.names[i] for i in g] for g in edge.groups]
    assert groups == [['nor_conv_1x1', 'nor_conv_3x3'], ['none', 'skip_connect', 'avg_pool_3x3']]


def test_gdas_exports_the_argmax_of_each_edge():
    from nni_darts_variants.registry import create_strategy
    space = _tiny_nb201()
    strategy = create_strategy('gdas')
    strategy.mutate_model(space)
    from nni_darts_variants.strategies.gdas import GumbelMaxEdge
    edges = {m.label: m for m in space.modules() if isinstance(m, GumbelMaxEdge)}
    with torch.no_grad():
        for k, edge in enumerate(edges.values()):
            edge.alpha.copy_(torch.eye(5)[k % 5] * 3.0)
    expected = {label: OPS[k % 5] for k, label in enumerate(edges)}
    assert {label: edge.export({})[label] for label, edge in edges.items()} == expected


def test_hub_nasbench201_labels_map_to_benchmark_strings():
    from nni.nas.hub.pytorch import NasBench201
    hub = NasBench201()
    labels = set(hub.simplify())
    assert labels == set(arch_to_sample(OPTIMUM, hub=True))
    for mutable in hub.simplify().values():
        assert {('nor_' + v if v.startswith('conv') else v) for v in mutable.values} == set(OPS)
    sample = {label: mutable.values[0] for label, mutable in hub.simplify().items()}
    assert parse_arch(sample_to_arch(sample))


# ----- recipes -----

RECIPES = sorted((ROOT / 'experiments' / 'nasbench201').glob('*.yml'))
CPU_RECIPES = sorted((ROOT / 'experiments' / 'nasbench201' / 'cpu').glob('*.yml'))
def _variants() -> tuple[str, ...]:
    """One recipe per registered strategy (DARTS twice: first and second order)."""
    from nni_darts_variants.registry import list_strategies
    return ('darts-1st', 'darts-2nd') + tuple(sorted(name for name in list_strategies() if name != 'darts'))


VARIANTS = _variants()


def test_every_variant_has_paper_cpu_and_nnictl_recipes():
    folder = ROOT / 'experiments' / 'nasbench201'
    for sub in ('', 'cpu/', 'nnictl/'):
        assert sorted(p.stem for p in (folder / sub).glob('*.yml')) == sorted(VARIANTS), sub


@pytest.mark.parametrize('path', RECIPES + CPU_RECIPES, ids=lambda p: f'{p.parent.name}/{p.name}')
def test_recipes_resolve_with_the_official_settings(path):
    from nni_darts_variants.search import resolve_config
    cfg = resolve_config(path)
    assert cfg['space']['name'] == 'nasbench201'
    assert cfg['space']['args']['affine'] is False and cfg['space']['args']['track_running_stats'] is False
    t, d = cfg['train'], cfg['data']
    assert (t['learning_rate'], t['learning_rate_min'], t['momentum'], t['nesterov']) == (0.025, 0.001, 0.9, True)
    assert d['batch_size'] == 64 and d['train_portion'] == 0.5
    assert t['weight_decay'] == (0.0 if cfg['strategy']['name'] == 'dropnas' else 5e-4)
    if path.parent.name == 'cpu':  # the recipes repeat the benchmark's cpu protocol: they must agree
        from nni_darts_variants.quality import PROTOCOLS, quality_rows
        protocol = PROTOCOLS['cpu']
        assert cfg['space']['args'] == {**protocol['space'], 'affine': False, 'track_running_stats': False}
        assert {k: d[k] for k in ('image_size', 'limit', 'batch_size')} == \
            {k: protocol['data'][k] for k in ('image_size', 'limit', 'batch_size')}
        row = {'darts-1st': 'darts', 'darts-2nd': 'darts-2nd'}.get(path.stem, path.stem)
        assert t['max_epochs'] == protocol['epochs_rows'].get(row, protocol['train']['max_epochs'])
        expected = {**protocol['arch'], **quality_rows()[row][2], **protocol['rows'].get(row, {})}
        if cfg['strategy']['name'] == 'dropnas':  # DropNAS decays the alphas itself
            del expected['arc_weight_decay']
        args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg['strategy']['args'].items()}
        assert {k: args.get(k) for k in expected} == expected
        return
    assert cfg['space']['args']['width'] == 16 and cfg['space']['args']['num_cells'] == 5
    assert d['name'] == 'cifar10'  # 50,000 training images, split 25k / 25k
    expected_epochs = {'gdas': 250, 'pdarts': 75}.get(cfg['strategy']['name'], 50)
    assert t['max_epochs'] == expected_epochs
    args = cfg['strategy']['args']
    if cfg['strategy']['name'] in ('darts', 'gdas'):
        assert args['arc_learning_rate'] == 3e-4 and args['arc_weight_decay'] == 1e-3


def test_nnictl_wrappers_run_the_paper_recipes():
    import yaml
    for variant in VARIANTS:
        config = yaml.safe_load((ROOT / 'experiments' / 'nasbench201' / 'nnictl' / f'{variant}.yml').read_text())
        assert config['trialCommand'].endswith(f'--config experiments/nasbench201/{variant}.yml')
        assert config['searchSpace']['seed']['_value'] == [0, 1, 2]


def test_trial_final_metric_is_the_table_accuracy(tmp_path):
    from nni_darts_variants.search import SearchResult
    from nni_darts_variants.trial import final_metrics
    record = export_nb201(arch_to_sample(OPTIMUM), tmp_path)
    result = SearchResult(tmp_path, None, arch_to_sample(OPTIMUM), {'supernet_val_acc': 0.5, 'nb201': record})
    final = final_metrics(result)
    assert final['default'] == pytest.approx(94.373) and final['supernet_val_acc'] == 0.5
    assert final['nb201_arch'] == OPTIMUM


# ----- the quality benchmark -----

def test_unknown_protocol_is_a_one_line_error(capsys):
    from nni_darts_variants.bench import bench_main
    assert bench_main(['--quality', '--protocol', 'gpu-fast']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and "unknown protocol 'gpu-fast'" in err and 'cpu' in err and 'paper' in err


def test_quality_benchmark_rows_on_a_tiny_protocol(monkeypatch, tmp_path):
    from nni_darts_variants import quality
    tiny = {'space': {'width': 4, 'num_cells': 1},
            'data': {'name': 'synthetic', 'root': None, 'image_size': 8, 'limit': 64, 'batch_size': 16},
            'train': {'max_epochs': 2, 'learning_rate': 0.025, 'learning_rate_min': 0.001, 'momentum': 0.9,
                      'weight_decay': 5e-4, 'nesterov': True},
            'epochs': {}, 'arch': {'arc_learning_rate': 1e-2, 'arc_weight_decay': 1e-3}, 'rows': {},
            'epochs_rows': {}}
    monkeypatch.setitem(quality.PROTOCOLS, 'tiny', tiny)
    lines = []
    report = quality.run_quality(quality.QualityConfig(protocol='tiny', seeds=(0, 1), rows=['darts', 'nni-DARTS'],
                                                       progress=False), progress=lines.append)
    assert len(lines) == 4 and lines[0].startswith('[1/4] darts seed 0')
    table = NasBench201Table()
    for row in report['rows']:
        assert row['failed'] == 0 and len(row['runs']) == 2
        accs = [r['accuracy'] for r in row['runs']]
        assert accs == [table.lookup(r['arch']) for r in row['runs']]
        assert row['mean'] == pytest.approx(sum(accs) / 2, abs=0.01) and row['worst'] == min(accs)
        assert row['alpha_delta'] > 0 and 0.2 < row['top_prob'] <= 1
        assert all(len(r['skip_share_per_epoch']) == 2 for r in row['runs'])
    text = quality.format_quality_table(report)
    assert 'darts' in text and 'paper: GDAS' in text and '93.61 ± 0.09' in text


@pytest.mark.parametrize('name', ['darts', 'gdas'])
def test_our_strategies_on_the_hub_nasbench201_export_a_benchmark_cell(name):
    from nni.nas.hub.pytorch import NasBench201

    from nni_darts_variants.registry import create_strategy
    from nni_darts_variants.testing import run_tiny_search, tiny_loaders
    result = run_tiny_search(create_strategy(name, **_strategy_kwargs(name)),
                             space=NasBench201(stem_out_channels=4, num_modules_per_stack=1),
                             loaders=tiny_loaders(n=16, channels=3))
    arch = sample_to_arch(result.sample)
    assert arch in _independent_strings() and NasBench201Table().lookup(result.sample) > 0


def test_search_run_folder_gets_the_benchmark_cell(tmp_path, capsys):
    from nni_darts_variants.cli import main
    config = {'seed': 0, 'strategy': {'name': 'gdas', 'args': {}},
              'space': {'name': 'nasbench201', 'args': {'width': 4, 'num_cells': 1}},
              'data': {'name': 'synthetic', 'batch_size': 16, 'limit': 32},
              'train': {'max_epochs': 1, 'accelerator': 'cpu', 'progress_bar': False, 'eval_batches': 1},
              'output': {'bundle': False}}
    import yaml
    (tmp_path / 'nb201.yml').write_text(yaml.safe_dump(config))
    assert main(['search', str(tmp_path / 'nb201.yml'), '--output', str(tmp_path / 'run')]) == 0
    record = json.loads((tmp_path / 'run' / 'nb201.json').read_text())
    result = json.loads((tmp_path / 'run' / 'result.json').read_text())
    assert record['arch'] == sample_to_arch(result['sample']) and result['metrics']['nb201'] == record
    assert record['cifar10_test'] == NasBench201Table().lookup(record['arch'])
    assert f'NAS-Bench-201 cell: {record["arch"]}, CIFAR-10 test accuracy {record["cifar10_test"]}' in \
        capsys.readouterr().out
