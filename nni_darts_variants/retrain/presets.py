"""Published DARTS-space cells, as data, for retraining by name.

Each entry lists the ``(operation, input)`` pairs of the normal and the reduction cell (two per intermediate node,
inputs 0 and 1 are the cell inputs, 2.. the earlier intermediate nodes) exactly as the authors released them:

* ``DARTS_V1`` / ``DARTS_V2`` -- DARTS first / second order (Liu et al., ICLR 2019; ``cnn/genotypes.py`` of
  quark0/darts). README: the V2 cell reaches 2.76 +- 0.09 % CIFAR-10 test error with 3.3M parameters.
* ``PC_DARTS_cifar`` / ``PC_DARTS_image`` -- PC-DARTS (Xu et al., ICLR 2020; ``genotypes.py`` of
  yuhuixu1993/PC-DARTS), searched on CIFAR-10 and on ImageNet. README: 2.57 % with 3.6M parameters on CIFAR-10.
* ``PDARTS`` -- P-DARTS (Chen et al., ICCV 2019; ``genotypes.py`` of chenxin061/pdarts). Paper (unverified): 2.50 %,
  3.4M parameters.
* ``GDAS_V1`` -- GDAS (Dong & Yang, CVPR 2019; ``nas_infer_model/DXYs/genotypes.py`` of D-X-Y/AutoDL-Projects), same
  input numbering. Paper (unverified): 2.93 %, 3.4M parameters (counted on the authors' own evaluation network).

``PUBLISHED_PARAMS_M`` holds the parameter counts the papers report for the CIFAR-10 evaluation network (20 cells,
C=36, auxiliary head excluded, as the official ``count_parameters_in_MB`` does) and for the ImageNet mobile network
(14 cells, C=48, 1000 classes).
"""
from __future__ import annotations

from ..genotype import Genotype

__all__ = ['PRESETS', 'PUBLISHED_PARAMS_M', 'get_preset', 'list_presets']

_CONCAT = [2, 3, 4, 5]

#: name -> genotype as the JSON-like dict accepted by :meth:`Genotype.from_dict`.
PRESETS: dict[str, dict] = {
    'DARTS_V1': {
        'normal': [['sep_conv_3x3', 1], ['sep_conv_3x3', 0], ['skip_connect', 0], ['sep_conv_3x3', 1],
                   ['skip_connect', 0], ['sep_conv_3x3', 1], ['sep_conv_3x3', 0], ['skip_connect', 2]],
        'reduce': [['max_pool_3x3', 0], ['max_pool_3x3', 1], ['skip_connect', 2], ['max_pool_3x3', 0],
                   ['max_pool_3x3', 0], ['skip_connect', 2], ['skip_connect', 2], ['avg_pool_3x3', 0]],
    },
    'DARTS_V2': {
        'normal': [['sep_conv_3x3', 0], ['sep_conv_3x3', 1], ['sep_conv_3x3', 0], ['sep_conv_3x3', 1],
                   ['sep_conv_3x3', 1], ['skip_connect', 0], ['skip_connect', 0], ['dil_conv_3x3', 2]],
        'reduce': [['max_pool_3x3', 0], ['max_pool_3x3', 1], ['skip_connect', 2], ['max_pool_3x3', 1],
                   ['max_pool_3x3', 0], ['skip_connect', 2], ['skip_connect', 2], ['max_pool_3x3', 1]],
    },
    'PC_DARTS_cifar': {
        'normal': [['sep_conv_3x3', 1], ['skip_connect', 0], ['sep_conv_3x3', 0], ['dil_conv_3x3', 1],
                   ['sep_conv_5x5', 0], ['sep_conv_3x3', 1], ['avg_pool_3x3', 0], ['dil_conv_3x3', 1]],
        'reduce': [['sep_conv_5x5', 1], ['max_pool_3x3', 0], ['sep_conv_5x5', 1], ['sep_conv_5x5', 2],
                   ['sep_conv_3x3', 0], ['sep_conv_3x3', 3], ['sep_conv_3x3', 1], ['sep_conv_3x3', 2]],
    },
    'PC_DARTS_image': {
        'normal': [['skip_connect', 1], ['sep_conv_3x3', 0], ['sep_conv_3x3', 0], ['skip_connect', 1],
                   ['sep_conv_3x3', 1], ['sep_conv_3x3', 3], ['sep_conv_3x3', 1], ['dil_conv_5x5', 4]],
        'reduce': [['sep_conv_3x3', 0], ['skip_connect', 1], ['dil_conv_5x5', 2], ['max_pool_3x3', 1],
                   ['sep_conv_3x3', 2], ['sep_conv_3x3', 1], ['sep_conv_5x5', 0], ['sep_conv_3x3', 3]],
    },
    'PDARTS': {
        'normal': [['skip_connect', 0], ['dil_conv_3x3', 1], ['skip_connect', 0], ['sep_conv_3x3', 1],
                   ['sep_conv_3x3', 1], ['sep_conv_3x3', 3], ['sep_conv_3x3', 0], ['dil_conv_5x5', 4]],
        'reduce': [['avg_pool_3x3', 0], ['sep_conv_5x5', 1], ['sep_conv_3x3', 0], ['dil_conv_5x5', 2],
                   ['max_pool_3x3', 0], ['dil_conv_3x3', 1], ['dil_conv_3x3', 1], ['dil_conv_5x5', 3]],
    },
    'GDAS_V1': {
        'normal': [['skip_connect', 0], ['skip_connect', 1], ['skip_connect', 0], ['sep_conv_5x5', 2],
                   ['sep_conv_3x3', 3], ['skip_connect', 0], ['sep_conv_5x5', 4], ['sep_conv_3x3', 3]],
        'reduce': [['sep_conv_5x5', 0], ['sep_conv_3x3', 1], ['sep_conv_5x5', 2], ['sep_conv_5x5', 1],
                   ['dil_conv_5x5', 2], ['sep_conv_3x3', 1], ['sep_conv_5x5', 0], ['sep_conv_5x5', 1]],
    },
}
for _cell in PRESETS.values():
    _cell.setdefault('normal_concat', list(_CONCAT))
    _cell.setdefault('reduce_concat', list(_CONCAT))

#: Parameter counts (millions) reported by the papers / READMEs: ``{name: {'cifar': M, 'imagenet': M}}``.
PUBLISHED_PARAMS_M: dict[str, dict[str, float]] = {
    'DARTS_V1': {'cifar': 3.3},       # paper, first order (unverified)
    'DARTS_V2': {'cifar': 3.3, 'imagenet': 4.7},  # README
    'PC_DARTS_cifar': {'cifar': 3.6},  # README
    'PC_DARTS_image': {'imagenet': 5.3},  # paper (unverified)
    'PDARTS': {'cifar': 3.4, 'imagenet': 4.9},  # paper (unverified)
    'GDAS_V1': {'cifar': 3.4},        # paper (unverified), authors' own evaluation network
}

_ALIASES = {'DARTS': 'DARTS_V2', 'PC_DARTS': 'PC_DARTS_cifar', 'PCDARTS': 'PC_DARTS_cifar', 'P_DARTS': 'PDARTS',
            'GDAS': 'GDAS_V1'}


def _normalize(name: str) -> str:
    return name.strip().replace('-', '_').upper()


def list_presets() -> list[str]:
    """The names of the published genotypes."""
    return list(PRESETS)


def get_preset(name: str) -> Genotype:
    """The published genotype ``name`` (case-insensitive; ``-`` and ``_`` interchangeable; ``DARTS`` = ``DARTS_V2``).

    Raises
    ------
    KeyError
        When ``name`` is no preset (the message lists the valid names).
    """
    wanted = _normalize(name)
    wanted = _normalize(_ALIASES.get(wanted, wanted))
    for key, data in PRESETS.items():
        if _normalize(key) == wanted:
            return Genotype.from_dict(data)
    raise KeyError(f'no published genotype named {name!r}; valid names: {", ".join(PRESETS)}')
