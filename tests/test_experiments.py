"""Every YAML under experiments/ parses; every nnictl config passes NNI's own schema and builds its search.

The nnictl configs (experiments/{cifar10,imagenet,smoke}/*.yml) are loaded with ``ExperimentConfig.load`` (what
``nnictl create`` uses) and validated; the search recipe named by their ``trialCommand`` is resolved for every point
of the ``searchSpace`` grid, and its search is built: space, strategy and evaluator, the space mutated into the
supernet and the evaluator wrapped by the strategy. Nothing is trained and nothing is downloaded (CIFAR-10 and
ImageNet are replaced by a few fake images: only the shapes matter).
"""
from __future__ import annotations

import itertools
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / 'experiments'
NNICTL_FOLDERS = ('cifar10', 'imagenet', 'smoke')
NNICTL_CONFIGS = sorted(p for folder in NNICTL_FOLDERS for p in (EXPERIMENTS / folder).glob('*.yml'))
ALL_YAML = sorted(EXPERIMENTS.rglob('*.yml'))
#: Search recipes that no nnictl config names (built once each).
OTHER_RECIPES = sorted((EXPERIMENTS / 'quickstart').glob('*.yml'))
#: (input channels, classes) of each dataset, for the fake data.
DATA_SHAPES = {'digits': (1, 10), 'cifar10': (3, 10), 'imagenet': (3, 1000), 'imagefolder': (3, 10),
               'synthetic': (3, 10)}
def _recipe_names() -> tuple[str, ...]:
    """One recipe per registered strategy; DARTS has two (first and second order)."""
    from nni_darts_variants.registry import list_strategies
    return ('darts-1st', 'darts-2nd') + tuple(sorted(name for name in list_strategies() if name != 'darts'))


VARIANTS = _recipe_names()
TRIAL_PREFIX = ['python3', '-m', 'nni_darts_variants.trial']


def _rel(path: Path) -> str:
    return str(path.relative_to(EXPERIMENTS))


def _load_nnictl(path: Path):
    from nni.experiment.config import ExperimentConfig
    config = ExperimentConfig.load(str(path))
    return config, config.canonical_copy()


def _trial_args(canonical):
    """The parsed arguments of the trial command and the recipe path it names (from the trial code folder)."""
    from nni_darts_variants.trial import build_parser
    words = shlex.split(canonical.trial_command)
    assert words[:3] == TRIAL_PREFIX, f'trialCommand must run `{" ".join(TRIAL_PREFIX)}`, got {words[:3]}'
    args = build_parser().parse_args(words[3:])
    return args, Path(canonical.trial_code_directory) / args.config


def _grid(search_space: dict) -> list[dict]:
    keys = sorted(search_space)
    for key in keys:
        assert search_space[key]['_type'] == 'choice', f'{key}: GridSearch sweeps choices here'
    return [dict(zip(keys, values)) for values in itertools.product(*(search_space[k]['_value'] for k in keys))]


def _fake_data(name: str):
    from torch.utils.data import DataLoader

    from nni_darts_variants.data import SearchData
    from nni_darts_variants.testing import tiny_dataset
    channels, classes = DATA_SHAPES[name]
    loader = DataLoader(tiny_dataset(4, channels=channels, num_classes=min(classes, 10)), batch_size=2)
    return SearchData(loader, loader, None, channels, classes, 8, f'fake {name}')


def build_search(cfg: dict, run_dir: Path):
    """Space, strategy and evaluator of a resolved config, the supernet made and the evaluator wrapped."""
    from nni_darts_variants.data import DATASETS, split_indices
    from nni_darts_variants.registry import build_space, create_strategy, list_spaces
    from nni_darts_variants.search import search_evaluator
    d = cfg['data']
    assert d['name'] in DATASETS, f'unknown dataset {d["name"]}'
    split_indices(1000, d['train_portion'], 0)
    assert cfg['space']['name'] in list_spaces(), f'unknown search space {cfg["space"]["name"]!r}'
    channels, classes = DATA_SHAPES[d['name']]
    space = build_space(cfg['space']['name'], in_channels=channels, num_classes=classes, dataset_hint=d['name'],
                        **cfg['space']['args'])
    strategy = create_strategy(cfg['strategy']['name'], **cfg['strategy']['args'])
    evaluator = search_evaluator(cfg, _fake_data(d['name']), run_dir, [])
    type(strategy).check_trainer(cfg['train']['max_epochs'], **cfg['strategy']['args'])
    supernet = strategy.mutate_model(space)
    wrapped = strategy.mutate_evaluator(evaluator)
    assert any(True for _ in supernet.parameters())
    return strategy, supernet, wrapped


@pytest.mark.parametrize('path', ALL_YAML, ids=_rel)
def test_every_yaml_parses(path):
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict) and data, f'{path} must hold a non-empty mapping'


def test_every_variant_has_an_experiment():
    for folder in ('cifar10', 'smoke'):
        names = {p.stem for p in (EXPERIMENTS / folder).glob('*.yml')}
        assert set(VARIANTS) <= names, f'experiments/{folder} lacks {sorted(set(VARIANTS) - names)}'
    assert {'pcdarts', 'proxyless'} <= {p.stem for p in (EXPERIMENTS / 'imagenet').glob('*.yml')}
    names = [yaml.safe_load(p.read_text())['experimentName'] for p in NNICTL_CONFIGS]
    assert len(names) == len(set(names)), 'experiment names must be unique'


@pytest.mark.parametrize('path', NNICTL_CONFIGS, ids=_rel)
def test_nnictl_config_is_valid(path):
    config, canonical = _load_nnictl(path)
    config.validate()
    service = canonical.training_service
    assert service.platform == 'local'
    assert Path(canonical.trial_code_directory).resolve() == REPO
    assert canonical.tuner.name == 'GridSearch'
    grid = _grid(canonical.search_space)
    assert canonical.max_trial_number == len(grid), 'maxTrialNumber should be the size of the grid'
    smoke = path.parent.name == 'smoke'
    if smoke:
        assert canonical.trial_gpu_number == 0 and canonical.trial_concurrency == 1
        assert canonical.max_trial_number <= 2
    else:
        assert canonical.trial_gpu_number == 1
        assert service.use_active_gpu is not None and service.gpu_indices
        assert canonical.trial_concurrency <= len(service.gpu_indices)


def _grid_configs(path: Path) -> list[dict]:
    """The resolved search config of every grid point of an nnictl config (each tuner value checked to arrive)."""
    from nni_darts_variants.config import apply_overrides, load_yaml
    from nni_darts_variants.search import resolve_config
    from nni_darts_variants.trial import apply_parameters
    _, canonical = _load_nnictl(path)
    args, recipe = _trial_args(canonical)
    assert recipe.is_file(), f'{path.name}: trialCommand names {args.config}, which does not exist'
    assert recipe.parent == path.parent / 'search', 'search recipes live next to their experiment, in search/'
    raw = apply_overrides(load_yaml(recipe), args.overrides)
    configs = []
    for point in _grid(canonical.search_space):
        cfg = resolve_config(apply_parameters(raw, point))
        for key, value in point.items():
            node = cfg
            for part in key.split('.'):
                node = node[part]
            assert node == value, f'{key} did not reach the config'
        configs.append(cfg)
    return configs


@pytest.mark.parametrize('path', NNICTL_CONFIGS, ids=_rel)
def test_nnictl_recipe_resolves_and_builds(path, tmp_path):
    """Every grid point resolves; the first one (the paper's recipe where it sweeps seeds) is built."""
    configs = _grid_configs(path)
    data_name = configs[0]['data']['name']
    assert (data_name == 'digits') == (path.parent.name == 'smoke')
    if path.parent.name == 'imagenet':
        assert data_name == 'imagenet'
    build_search(configs[0], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize('path', NNICTL_CONFIGS, ids=_rel)
def test_nnictl_recipe_builds_for_every_grid_point(path, tmp_path):
    """The other grid points that change the strategy or the space (K = 8 must suit C = 16, ...) build too."""
    configs = _grid_configs(path)
    seen = [{k: c[k] for k in ('strategy', 'space')} for c in configs[:1]]
    for i, cfg in enumerate(configs[1:], 1):
        key = {k: cfg[k] for k in ('strategy', 'space')}
        if key not in seen:
            seen.append(key)
            build_search(cfg, tmp_path / f'run{i}')


@pytest.mark.parametrize('path', OTHER_RECIPES, ids=_rel)
def test_other_search_recipes_build(path, tmp_path):
    from nni_darts_variants.search import resolve_config
    build_search(resolve_config(str(path)), tmp_path)


def test_paper_recipes_match_algorithms_md():
    """A few numbers of algorithms.md section 9 that are easy to get wrong (the strategies' defaults included)."""
    from test_recipes import effective

    from nni_darts_variants.search import resolve_config as _resolve

    def resolve_config(path):
        return effective(_resolve(path))
    cfg = {v: resolve_config(str(EXPERIMENTS / 'cifar10' / 'search' / f'{v}.yml')) for v in VARIANTS}
    assert cfg['darts-1st']['strategy']['args']['order'] == 1 and cfg['darts-2nd']['strategy']['args']['order'] == 2
    pc = cfg['pcdarts']
    assert (pc['strategy']['args']['partial_channels_k'], pc['strategy']['args']['warmup_epochs']) == (4, 15)
    assert (pc['data']['batch_size'], pc['train']['learning_rate'], pc['train']['learning_rate_min']) == (256, 0.1, 0)
    gd = cfg['gdas']
    assert (gd['train']['max_epochs'], gd['train']['nesterov'], gd['train']['weight_decay']) == (250, True, 5e-4)
    assert gd['space']['args']['num_cells'] == 6, 'the official GDAS search network has 6 cells'
    pd = cfg['pdarts']
    args = pd['strategy']['args']
    assert pd['train']['max_epochs'] == len(args['stage_cells']) * args['epochs_per_stage'] == 75
    dn = cfg['dropnas']
    assert (dn['space']['args']['num_cells'], dn['data']['batch_size'], dn['train']['max_epochs']) == (14, 96, 76)
    assert dn['train']['weight_decay'] == 0, 'DropNAS decays inside the strategy, not in the optimizer'
    for v in ('darts-1st', 'darts-2nd', 'parsec', 'mergenas', 'proxyless'):
        assert (cfg[v]['data']['batch_size'], cfg[v]['train']['max_epochs']) == (64, 50)
    for v in VARIANTS:
        assert cfg[v]['space']['args']['width'] == 16
    im = resolve_config(str(EXPERIMENTS / 'imagenet' / 'search' / 'pcdarts.yml'))
    assert im['strategy']['args']['partial_channels_k'] == 2 and im['strategy']['args']['warmup_epochs'] == 35
    assert im['space']['args']['dataset'] == 'imagenet' and im['data']['subset'] == 'pcdarts'
    assert (im['data']['weight_fraction'], im['data']['arch_fraction']) == (0.1, 0.025)
    px = resolve_config(str(EXPERIMENTS / 'imagenet' / 'search' / 'proxyless.yml'))
    assert px['space']['name'] == 'proxylessnas' and px['strategy']['args']['arc_betas'] == [0.0, 0.999]


@pytest.mark.parametrize('path', sorted((EXPERIMENTS / 'retrain').glob('*.yml')), ids=_rel)
def test_retrain_recipes_parse(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)
