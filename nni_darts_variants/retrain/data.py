"""Datasets for retraining: CIFAR-10 (torchvision), an ImageFolder tree (CIFAR-style or ImageNet), synthetic images
(:func:`nni_darts_variants.synthetic.learnable_images`, the same builder as the search's ``data.name=synthetic``).

Augmentation follows the official evaluation scripts: CIFAR -- random crop 32 with padding 4, horizontal flip,
normalization, then cutout (DARTS ``utils._data_transforms_cifar10``); ImageNet -- random resized crop 224, flip,
colour jitter (0.4, 0.4, 0.4, 0.2), normalization; test images resized to 256/224 of the size and centre-cropped.
Nothing is downloaded unless ``data.download`` is true.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from ..data import random_subset
from ..synthetic import learnable_images

__all__ = ['Cutout', 'build_datasets']

CIFAR_MEAN, CIFAR_STD = (0.49139968, 0.48215827, 0.44653124), (0.24703233, 0.24348505, 0.26158768)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_FOLDER = 'cifar-10-batches-py'


class Cutout:
    """Zero one ``length`` x ``length`` square (clipped at the border) centred at a random pixel of a CHW tensor.

    DeVries & Taylor 2017, as used by DARTS (``--cutout --cutout_length 16``).
    """

    def __init__(self, length: int):
        self.length = length

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        y = int(torch.randint(height, ()).item())
        x = int(torch.randint(width, ()).item())
        half = self.length // 2
        image = image.clone()
        image[..., max(0, y - half):min(height, y + half), max(0, x - half):min(width, x + half)] = 0.
        return image


def _transforms(network: str, image_size: int, cutout: int) -> tuple[Any, Any]:
    from torchvision import transforms as T
    if network == 'cifar':
        train = [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                 T.Normalize(CIFAR_MEAN, CIFAR_STD)] + ([Cutout(cutout)] if cutout > 0 else [])
        test = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    else:
        train = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(),
                 T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2), T.ToTensor(),
                 T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        test = [T.Resize(image_size * 256 // 224), T.CenterCrop(image_size), T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(train), T.Compose(test)


def _cifar10(data: dict[str, Any], train_tf: Any, test_tf: Any) -> tuple[Dataset, Dataset, int]:
    from torchvision.datasets import CIFAR10
    root = Path(data['root']).expanduser()
    if not data['download'] and not (root / CIFAR10_FOLDER).is_dir():
        raise ConfigError(f'CIFAR-10 not found at {root / CIFAR10_FOLDER}; set data.root to the folder that holds '
                          f'{CIFAR10_FOLDER}, or data.download=true to fetch it')
    kwargs = {'root': str(root), 'download': bool(data['download'])}
    return CIFAR10(train=True, transform=train_tf, **kwargs), CIFAR10(train=False, transform=test_tf, **kwargs), 10


def _image_folder(data: dict[str, Any], train_tf: Any, test_tf: Any) -> tuple[Dataset, Dataset, int]:
    from torchvision.datasets import ImageFolder
    root = Path(data['root']).expanduser()
    folders = [root / data['train_split'], root / data['test_split']]
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f'image folder {folder} not found; set data.root (and data.train_split / '
                              'data.test_split) to a tree of <split>/<class>/<image> files')
    train, test = ImageFolder(str(folders[0]), train_tf), ImageFolder(str(folders[1]), test_tf)
    if train.classes != test.classes:
        raise ConfigError(f'{folders[0]} and {folders[1]} hold different classes; both splits need the same ones')
    return train, test, len(train.classes)


def build_datasets(config: dict[str, Any]) -> tuple[Dataset, Dataset, int]:
    """``(train, test, num_classes)`` for a resolved retrain config (sections ``data``, ``model``, ``train``)."""
    data, network, seed = config['data'], config['model']['network'], config['train']['seed']
    if data['source'] == 'synthetic':
        classes = config['model']['num_classes'] or 10
        size = data['synthetic_size']
        shape = {'channels': 3, 'size': data['image_size'], 'num_classes': classes}
        train = learnable_images(size, seed=seed, **shape)
        test = learnable_images(max(size // 4, 1), seed=seed + 1, **shape)
    else:
        train_tf, test_tf = _transforms(network, data['image_size'], data['cutout'])
        loader = _cifar10 if data['source'] == 'cifar10' else _image_folder
        train, test, classes = loader(data, train_tf, test_tf)
    return random_subset(train, data['train_limit'], seed), random_subset(test, data['test_limit'], seed + 1), classes
