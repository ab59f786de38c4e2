"""The PC-DARTS ImageNet search subset (Xu et al. 2020, README): 10% / 2.5% of each class, disjoint, seeded."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from nni_darts_variants.data import DataError, build_search_data, class_balanced_subsets
from nni_darts_variants.search import resolve_config

PER_CLASS = (40, 80, 120)  # unequal classes: balance means the same fraction of each


@pytest.fixture
def image_root(tmp_path):
    """An ImageNet-layout tree ``train/<class>/<image>.png`` of tiny random PNGs."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c, n in enumerate(PER_CLASS):
        folder = tmp_path / 'imagenet' / 'train' / f'n0{c}'
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray((torch.rand(4, 4, 3, generator=g) * 255).to(torch.uint8).numpy()).save(folder / f'{i}.png')
    return tmp_path / 'imagenet'


def build(root, seed=0, **kwargs):
    return build_search_data('imagenet', root=str(root), batch_size=8, image_size=8, seed=seed, subset='pcdarts',
                             **kwargs)


def halves(data):
    return data.train.dataset.indices, data.val.dataset.indices, data.train.dataset.dataset.targets


def test_fractions_class_balance_and_disjointness(image_root):
    weight, arch, targets = halves(build(image_root))
    assert not set(weight) & set(arch)
    weight_counts, arch_counts = Counter(targets[i] for i in weight), Counter(targets[i] for i in arch)
    for label, n in enumerate(PER_CLASS):
        assert weight_counts[label] == round(0.1 * n)
        assert arch_counts[label] == round(0.025 * n)


def test_same_seed_same_subsets_other_seed_other_subsets(image_root):
    first, second, other = halves(build(image_root)), halves(build(image_root)), halves(build(image_root, seed=1))
    assert first[:2] == second[:2]
    assert first[:2] != other[:2]


def test_subsets_index_one_image_folder_without_copies(image_root):
    data = build(image_root, weight_fraction=0.5, arch_fraction=0.25)
    assert data.train.dataset.dataset is data.val.dataset.dataset
    assert len(data.train.dataset) == sum(round(0.5 * n) for n in PER_CLASS)
    assert sorted(p.name for p in image_root.rglob('*') if p.is_dir()) == ['n00', 'n01', 'n02', 'train']


def test_class_balanced_subsets_small_classes_keep_one_image_each():
    targets = [0] * 3 + [1] * 50
    weight, arch = class_balanced_subsets(targets, (0.1, 0.025), seed=0)
    assert Counter(targets[i] for i in weight) == {0: 1, 1: 5}
    assert Counter(targets[i] for i in arch) == {0: 1, 1: 1}


@pytest.mark.parametrize('fractions', [(0.0, 0.1), (0.8, 0.3), (1.0, 0.1)])
def test_bad_fractions(fractions):
    with pytest.raises(DataError, match='fractions'):
        class_balanced_subsets([0, 1] * 10, fractions, seed=0)


def test_unknown_subset_and_limit_clash(image_root):
    with pytest.raises(DataError, match='unknown data.subset'):
        build_search_data('imagenet', root=str(image_root), subset='random')
    with pytest.raises(DataError, match='data.limit'):
        build(image_root, limit=10)


def test_config_keys(tmp_path):
    cfg = resolve_config({'data': {'name': 'imagenet', 'subset': 'pcdarts'}})
    assert (cfg['data']['subset'], cfg['data']['weight_fraction'], cfg['data']['arch_fraction']) == \
        ('pcdarts', 0.1, 0.025)
