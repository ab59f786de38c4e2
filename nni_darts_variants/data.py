"""Datasets for searching: the embedded digits, CIFAR-10, any ImageFolder tree, and synthetic data.

An unreadable image in an ImageFolder tree stops the search with a :class:`DataError` naming the file
(:func:`load_image`). Every dataset yields a training set (split 50/50 into the weight half and the architecture half, as in DARTS) and a
held-out test set. Nothing is downloaded unless ``download=True``; a missing dataset is a :class:`DataError` naming
the path and the fix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ['DataError', 'SearchData', 'build_search_data', 'DATASETS', 'split_indices', 'class_balanced_subsets',
           'SUBSETS', 'DecodedImages', 'decoded_in_memory', 'load_image']

_logger = logging.getLogger(__name__)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """A dataset that cannot be loaded, with a one-line message naming the path and the fix.

    Raised in a ``DataLoader`` worker (``data.num_workers > 0``), it comes back re-raised by PyTorch with the message
    ``Caught DataError in DataLoader worker process N`` and the worker's traceback; the message is then cut back to
    the worker's own one line, so that the error still names the file.
    """

    def __init__(self, message: str = '') -> None:
        if message.startswith(f'Caught {type(self).__name__} in DataLoader worker'):
            message = message.rstrip().splitlines()[-1].split(f'{type(self).__name__}: ', 1)[-1]
        super().__init__(message)


@dataclass
class SearchData:
    """Loaders for a search: the weight half, the architecture half, and the held-out test set."""
    train: DataLoader
    val: DataLoader
    test: DataLoader | None
    in_channels: int
    num_classes: int
    image_size: int
    description: str


def split_indices(n: int, portion: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded permutation of ``range(n)`` cut at ``portion`` (DARTS: 0.5 -> weight half, architecture half)."""
    if not 0 < portion < 1:
        raise DataError(f'data.train_portion must be in (0, 1), got {portion}')
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(round(n * portion))
    if cut == 0 or cut == n:
        raise DataError(f'data.train_portion={portion} leaves one half of the {n} training images empty')
    return perm[:cut], perm[cut:]


#: Search-data recipes over a training folder (``data.subset``): name -> description.
SUBSETS: dict[str, str] = {
    'pcdarts': "PC-DARTS ImageNet search: random, class-balanced weight_fraction (10%) / arch_fraction (2.5%) of "
               "each class's images",
}


def class_balanced_subsets(targets: list[int] | torch.Tensor, fractions: tuple[float, ...], seed: int
                           ) -> list[list[int]]:
    """Disjoint, class-balanced random subsets of a labelled dataset, as index lists (no image is copied).

    For every class, its indices are shuffled with a generator seeded by ``seed`` and cut into consecutive slices of
    ``round(fraction * n_class)`` images (at least one), one slice per fraction: the PC-DARTS ImageNet recipe
    (Xu et al., ICLR 2020, README: "randomly sample 10% and 2.5% images for each class" of the training set).
    Returns one sorted index list per fraction.
    """
    if not fractions or any(not 0 < f < 1 for f in fractions) or sum(fractions) > 1:
        raise DataError(f'subset fractions must each be in (0, 1) and sum to at most 1, got {list(fractions)}')
    labels = torch.as_tensor(targets, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    subsets: list[list[int]] = [[] for _ in fractions]
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        sizes = [max(1, round(f * len(members))) for f in fractions]
        if sum(sizes) > len(members):
            raise DataError(f'class {label} has {len(members)} image(s), too few for the fractions {list(fractions)}')
        start = 0
        for subset, size in zip(subsets, sizes):
            subset.extend(members[start:start + size])
            start += size
    return [sorted(subset) for subset in subsets]


def _subset_indices(train: Dataset, subset: str, fractions: tuple[float, float], seed: int
                    ) -> tuple[list[int], list[int]]:
    if subset not in SUBSETS:
        raise DataError(f'unknown data.subset {subset!r}; valid: {", ".join(SUBSETS)} (or null for the 50/50 split)')
    targets = getattr(train, 'targets', None)
    if targets is None:
        raise DataError(f'data.subset={subset!r} needs a labelled ImageFolder dataset (data.name imagenet or '
                        'imagefolder)')
    weight_idx, arch_idx = class_balanced_subsets(targets, fractions, seed)
    return weight_idx, arch_idx


def random_subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """The first ``limit`` items of a ``seed``-fixed permutation (the whole dataset when ``limit`` is unset, 0 or
    not smaller than it). The one subset helper of search and retrain data."""
    if not limit or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    return Subset(dataset, order[:limit].tolist())


def _digits(root: str | None, download: bool, image_size: int | None, seed: int) -> tuple[Dataset, Dataset, int, int]:
    """scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes): 80% search, 20% held out."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(bunch.target, dtype=torch.long)
    if image_size and image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode='bilinear', align_corners=False)
    train_idx, test_idx = split_indices(len(y), 0.8, seed + 1)
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx]), 1, 10


def _transforms(image_size: int, train: bool, imagenet: bool) -> Any:
    from torchvision import transforms as T
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (CIFAR_MEAN, CIFAR_STD)
    if imagenet:
        ops = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] if train else \
            [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
    else:
        ops = ([T.Resize(image_size)] if image_size != 32 else []) + \
            ([T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()] if train else [])
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def _cifar10(root: str | None, download: bool, image_size: int | None, seed: int):
    from torchvision.datasets import CIFAR10
    root_path = Path(root or '~/.cache/nni-darts/cifar10').expanduser()
    size = image_size or 32
    try:
        train = CIFAR10(str(root_path), train=True, download=download, transform=_transforms(size, True, False))
        test = CIFAR10(str(root_path), train=False, download=download, transform=_transforms(size, False, False))
    except RuntimeError as err:
        raise DataError(f'CIFAR-10 not found under {root_path} ({err}); set data.download=true to fetch it, or point '
                        'data.root at a folder that holds cifar-10-batches-py') from None
    return train, test, 3, 10


def load_image(path: str) -> Any:
    """An ImageFolder image as RGB; a corrupt or truncated file is a :class:`DataError` naming it (not skipped: a
    silently smaller dataset would change the search, and the user can fix the file and resume)."""
    from PIL import Image
    try:
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')  # convert() decodes the whole image: truncation shows here
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for unreadable, truncated or corrupt files
        raise DataError(f'cannot read the image {path} ({err}); replace or remove the file, then resume the search '
                        '(--resume RUN_DIR)') from None


def _imagefolder(root: str | None, download: bool, image_size: int | None, seed: int, imagenet: bool = False):
    from torchvision.datasets import ImageFolder
    if not root:
        raise DataError('data.root is required for an ImageFolder dataset; point it at a folder with train/ '
                        '(and optionally test/ or val/) class folders')
    base = Path(root).expanduser()
    train_dir = base / 'train' if (base / 'train').is_dir() else base
    if not train_dir.is_dir():
        raise DataError(f'dataset folder {base} does not exist; point data.root at an ImageFolder tree')
    test_dir = next((base / d for d in ('test', 'val') if (base / d).is_dir()), None)
    size = image_size or (224 if imagenet else 32)
    try:
        train = ImageFolder(str(train_dir), transform=_transforms(size, True, imagenet), loader=load_image)
        test = ImageFolder(str(test_dir), transform=_transforms(size, False, imagenet),
                           loader=load_image) if test_dir else None
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f'{train_dir} holds no images in class folders ({str(err).splitlines()[0]}); '
                        'an ImageFolder tree is root/train/<class>/<image>') from None
    if len(train) < 2:
        raise DataError(f'{train_dir} holds {len(train)} image(s); a search needs at least two')
    return train, test, 3, len(train.classes)


def _synthetic(root: str | None, download: bool, image_size: int | None, seed: int):
    from .synthetic import learnable_images as tiny_dataset
    size = image_size or 8
    return tiny_dataset(256, channels=3, size=size, seed=seed), tiny_dataset(64, channels=3, size=size,
                                                                             seed=seed + 1), 3, 10


#: The most bytes of decoded images :func:`decoded_in_memory` keeps (``data.in_memory``).
IN_MEMORY_BYTES = 2 * 2 ** 30


class DecodedImages(Dataset):
    """A torchvision image dataset whose images are decoded once and kept, the random augmentation drawn per access.

    The dataset's ``transform`` (a ``Compose``) is cut into a deterministic PIL prefix (``Resize``, ``CenterCrop``),
    random crops and flips, and ``ToTensor`` + ``Normalize``. The first access of an image runs the prefix and keeps
    the result as a ``uint8`` tensor; every access then applies the same crop and flip objects to that tensor (they
    draw the same random numbers, and zero padding of a ``uint8`` tensor equals PIL's), then ``ToTensor``'s
    ``/ 255`` and ``Normalize``: the samples equal the dataset's own, bitwise, for the same random state.
    """

    def __init__(self, dataset: Dataset, indices: Any, prefix: Any, augment: list, normalize: Any):
        self.dataset, self.indices = dataset, list(indices)
        self.prefix, self.augment, self.normalize = prefix, augment, normalize
        self._images: dict[int, tuple[torch.Tensor, Any]] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def _decoded(self, index: int) -> tuple[torch.Tensor, Any]:
        if index not in self._images:
            from torchvision.transforms.functional import pil_to_tensor
            original = self.dataset.transform
            self.dataset.transform = self.prefix
            try:
                image, target = self.dataset[self.indices[index]]
            finally:
                self.dataset.transform = original
            self._images[index] = (pil_to_tensor(image), target)
        return self._images[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        image, target = self._decoded(index)
        for op in self.augment:
            image = op(image)
        return self.normalize(image.to(torch.get_default_dtype()).div(255)), target


def _split_transform(transform: Any) -> tuple[Any, list, Any] | None:
    """``(prefix, augment, normalize)`` of a ``Compose`` :class:`DecodedImages` can replay exactly, else ``None``."""
    from torchvision import transforms as T
    ops = list(getattr(transform, 'transforms', ()))
    if len(ops) < 2 or not isinstance(ops[-2], T.ToTensor) or not isinstance(ops[-1], T.Normalize):
        return None
    body = ops[:-2]
    n_prefix = next((i for i, op in enumerate(body) if not isinstance(op, (T.Resize, T.CenterCrop))), len(body))
    augment = body[n_prefix:]
    if not all(type(op) in (T.RandomCrop, T.RandomHorizontalFlip) for op in augment):
        return None
    if any(isinstance(op, T.RandomCrop) and op.padding_mode != 'constant' for op in augment):
        return None
    return T.Compose(body[:n_prefix]), augment, ops[-1]


def decoded_in_memory(dataset: Dataset, max_bytes: int = IN_MEMORY_BYTES) -> Dataset:
    """``dataset`` (or a ``Subset`` of one) as :class:`DecodedImages` when its transform allows an exact replay and
    its decoded images fit in ``max_bytes``; otherwise ``dataset`` itself."""
    base, indices = (dataset.dataset, dataset.indices) if isinstance(dataset, Subset) else (dataset,
                                                                                             range(len(dataset)))
    plan = _split_transform(getattr(base, 'transform', None))
    if plan is None or len(indices) == 0:
        return dataset
    cached = DecodedImages(base, indices, *plan)
    first = cached._decoded(0)[0]
    if first.numel() * first.element_size() * len(cached) > max_bytes:
        _logger.info('data: %d decoded images exceed %d bytes; decoding every epoch', len(cached), max_bytes)
        return dataset
    return cached


DATASETS = {
    'digits': (_digits, "scikit-learn's bundled handwritten digits, 1x8x8, 10 classes (no download)"),
    'cifar10': (_cifar10, 'CIFAR-10 through torchvision (download only with data.download=true)'),
    'imagefolder': (_imagefolder, 'an ImageFolder tree (root/train/<class>/..., optional root/test or root/val)'),
    'imagenet': (lambda *a: _imagefolder(*a, imagenet=True), 'ImageNet layout (ImageFolder) with 224px transforms'),
    'synthetic': (_synthetic, 'random learnable 3-channel images for tests'),
}


def build_search_data(name: str, root: str | None = None, download: bool = False, batch_size: int = 64,
                      train_portion: float = 0.5, num_workers: int = 0, image_size: int | None = None,
                      limit: int | None = None, seed: int = 0, test_batch_size: int | None = None,
                      subset: str | None = None, weight_fraction: float = 0.1, arch_fraction: float = 0.025,
                      in_memory: bool = True) -> SearchData:
    """Build the loaders of a search on dataset ``name`` (see :data:`DATASETS`).

    With ``subset='pcdarts'`` (ImageFolder data such as ``'imagenet'``), the weight and architecture halves are
    disjoint class-balanced random subsets holding ``weight_fraction`` and ``arch_fraction`` of each class's
    training images (:func:`class_balanced_subsets`) instead of the ``train_portion`` split; ``limit`` must be unset.
    With ``in_memory`` the training images are decoded once and kept when they fit (:func:`decoded_in_memory`; the
    same samples, bitwise).
    """
    if name not in DATASETS:
        raise DataError(f'unknown dataset {name!r}; valid datasets: {", ".join(DATASETS)}')
    if batch_size < 1:
        raise DataError(f'data.batch_size must be positive, got {batch_size}')
    factory, _ = DATASETS[name]
    train, test, in_channels, num_classes = factory(root, download, image_size, seed)
    if subset is not None:
        if limit is not None:
            raise DataError(f'data.limit={limit} cannot be combined with data.subset={subset!r}; unset one of them')
        w_idx, a_idx = _subset_indices(train, subset, (weight_fraction, arch_fraction), seed)
    else:
        train = random_subset(train, limit, seed + 7)
        w_idx, a_idx = split_indices(len(train), train_portion, seed)
    if in_memory:
        train = decoded_in_memory(train)
    generator = torch.Generator().manual_seed(seed)
    common = {'num_workers': num_workers, 'persistent_workers': num_workers > 0}
    train_loader = DataLoader(Subset(train, w_idx), batch_size=batch_size, shuffle=True, drop_last=False,
                              generator=generator, **common)
    val_loader = DataLoader(Subset(train, a_idx), batch_size=batch_size, shuffle=True, drop_last=False,
                            generator=torch.Generator().manual_seed(seed + 1), **common)
    test_loader = DataLoader(test, batch_size=test_batch_size or batch_size, **common) if test is not None else None
    sample_x = train[0][0]
    desc = (f'{name}: {len(w_idx)} weight / {len(a_idx)} architecture images'
            + (f', {len(test)} held out' if test is not None else ''))
    return SearchData(train_loader, val_loader, test_loader, in_channels, num_classes, int(sample_x.shape[-1]), desc)
