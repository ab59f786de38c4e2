"""The ProxylessNAS MobileNetV2-style space: layout (algorithms.md §3), zero option, freeze, one search step."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from nni.nas.nn.pytorch import LayerChoice
from nni.nas.space import model_context

from nni_darts_variants.data import build_search_data
from nni_darts_variants.testing import run_tiny_search
from search_spaces import ProxylessSpace
from search_spaces.proxylessnas import CANDIDATES, STAGES, MBConv, SearchBlock, candidate_name

MBCONV_NAMES = [candidate_name(e, k) for e, k in CANDIDATES]


def blocks_of(space: nn.Module) -> list[SearchBlock]:
    return list(space.blocks)


@pytest.fixture(scope='module')
def space():
    return ProxylessSpace()


def test_choices_and_zero_option_only_on_stride1_same_width_blocks(space):
    choices = space.simplify()
    assert list(choices) == [f'block_{i}' for i in range(21)]
    assert sorted(MBCONV_NAMES) == sorted(f'mb{e}_k{k}' for e in (3, 6) for k in (3, 5, 7))
    first_of_stage = {sum(d for _, d, _ in STAGES[:s]) for s in range(len(STAGES))}
    with_zero = [label for label, choice in choices.items() if 'zero' in choice.values]
    assert len(with_zero) == 15
    assert {int(label.split('_')[1]) for label in with_zero} == set(range(21)) - first_of_stage
    for block, (label, choice) in zip(blocks_of(space), choices.items()):
        convs = [m for m in block.op['mb3_k3'].modules() if isinstance(m, nn.Conv2d)]
        same_shape = convs[1].stride == (1, 1) and convs[0].in_channels == convs[-1].out_channels
        assert ('zero' in choice.values) == same_shape == block.residual, label
        assert list(choice.values[:6]) == MBCONV_NAMES


def test_layout_matches_the_paper(space):
    convs = [m for m in space.modules() if isinstance(m, nn.Conv2d)]
    assert (convs[0].in_channels, convs[0].out_channels, convs[0].stride) == (3, 32, (2, 2))
    assert isinstance(space.stem[-1], nn.ReLU6)
    first = [m for m in space.first_block.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.groups) for c in first] == [(32, 32, 32), (32, 16, 1)]  # MBConv1
    widths = [blocks_of(space)[i].op['mb6_k5'][-1][0].out_channels for i in range(21)]
    expected = [w for w, d, _ in STAGES for _ in range(d)]
    assert widths == expected
    strides = [blocks_of(space)[i].op['mb6_k5'][1][0].stride[0] for i in range(21)]
    assert strides == [s if j == 0 else 1 for _, d, s in STAGES for j in range(d)]
    assert space.feature_mix[0].out_channels == 1280 and space.classifier.in_features == 1280


def test_mbconv_is_expand_depthwise_linear_projection():
    block = MBConv(16, 24, expand=6, kernel=5, stride=2)
    expand, depthwise, project = block
    assert expand[0].kernel_size == (1, 1) and expand[0].out_channels == 96 and isinstance(expand[-1], nn.ReLU6)
    assert depthwise[0].kernel_size == (5, 5) and depthwise[0].groups == 96 and depthwise[0].stride == (2, 2)
    assert isinstance(depthwise[-1], nn.ReLU6)
    assert project[0].kernel_size == (1, 1) and isinstance(project[-1], nn.BatchNorm2d)  # linear: no activation
    assert block(torch.randn(2, 16, 8, 8)).shape == (2, 24, 4, 4)


def test_forward_small_input(space):
    assert space(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_freeze_gives_the_discrete_network_and_zero_is_the_identity(space):
    choices = space.simplify()
    sample = {label: 'zero' if 'zero' in c.values else MBCONV_NAMES[i % 6]
              for i, (label, c) in enumerate(choices.items())}
    frozen = space.freeze(sample)
    assert not any(isinstance(m, LayerChoice) for m in frozen.modules())
    chosen = sum(p.numel() for block, (label, value) in zip(blocks_of(space), sample.items()) if value != 'zero'
                 for p in block.op[value].parameters())
    fixed = sum(p.numel() for name, p in space.named_parameters() if not name.startswith('blocks.'))
    assert sum(p.numel() for p in frozen.parameters()) == chosen + fixed
    x = torch.randn(2, 24, 8, 8)
    assert torch.equal(frozen.blocks[1](x), x)  # zero => only the shortcut
    assert isinstance(frozen.blocks[1].op, nn.Identity)
    frozen.eval()
    assert frozen(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_built_in_a_fixed_context_is_the_frozen_network():
    sample = {f'block_{i}': 'zero' if i == 1 else 'mb3_k3' for i in range(21)}
    with model_context(sample):
        fixed = ProxylessSpace(dataset='cifar10', width_multiplier=0.25)
    assert isinstance(fixed.blocks[1].op, nn.Identity) and not fixed.blocks[1].residual
    assert not any(isinstance(m, LayerChoice) for m in fixed.modules())


@pytest.mark.parametrize('dataset, shape', [('cifar10', (2, 3, 32, 32)), ('digits', (2, 1, 8, 8))])
def test_small_image_presets(dataset, shape):
    space = ProxylessSpace(dataset=dataset, width_multiplier=0.25)
    assert space.stem[0].stride == (1, 1)
    assert space(torch.randn(*shape)).shape == (2, 10)


def test_width_multiplier_rounds_to_multiples_of_8():
    space = ProxylessSpace(width_multiplier=0.35, num_classes=10)
    widths = {m.out_channels for m in space.modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    assert all(w % 8 == 0 for w in widths)
    assert space.feature_mix[0].out_channels == 1280  # kept unless the multiplier exceeds 1


@pytest.mark.parametrize('kwargs, message', [({'dataset': 'mnist'}, 'unknown dataset'),
                                             ({'width_multiplier': 0}, 'width_multiplier'),
                                             ({'dropout': 1.0}, 'dropout')])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProxylessSpace(**kwargs)


# ----- one search step on a tiny ImageFolder tree -----
def write_image_folder(root, classes=10, per_class=2, size=16):
    """Random PNGs in ``root/train/<class>/`` (10 classes: the classes of ``testing.tiny_evaluator``)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        folder = root / 'train' / f'class{c}'
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f'{i}.png')


def tiny_search(tmp_path, strategy):
    write_image_folder(tmp_path / 'data')
    data = build_search_data('imagefolder', root=str(tmp_path / 'data'), batch_size=4, image_size=16, seed=0)
    space = ProxylessSpace(dataset='cifar10', num_classes=data.num_classes, width_multiplier=0.25)
    result = run_tiny_search(strategy, space, loaders=(data.train, data.val), workdir=str(tmp_path / 'nni'))
    choices = space.simplify()
    assert set(result.sample) == set(choices)
    assert all(result.sample[label] in choice.values for label, choice in choices.items())
    assert result.snapshot.losses and all(math.isfinite(v) for v in result.snapshot.losses)
    moved = [not torch.equal(a, b) for a, b in zip(result.snapshot.before, result.snapshot.after)]
    assert any(moved), 'no architecture parameter moved'
    frozen = ProxylessSpace(dataset='cifar10', num_classes=data.num_classes, width_multiplier=0.25).freeze(
        result.sample)
    assert frozen(torch.randn(2, 3, 16, 16)).shape == (2, data.num_classes)
    return result


def test_one_step_with_our_proxyless(tmp_path):
    from nni_darts_variants.registry import create_strategy, get_strategy
    strategy = create_strategy('proxyless', **get_strategy('proxyless').smoke_kwargs())
    tiny_search(tmp_path, strategy)


@pytest.mark.parametrize('name', ['Proxyless', 'DARTS'])
def test_one_step_with_nni_builtin(tmp_path, name):
    import nni.nas.strategy as strategies
    tiny_search(tmp_path, getattr(strategies, name)())
