"""The strategy registry: one class per name, built from keyword arguments checked against its signature."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any

__all__ = ['register_strategy', 'list_strategies', 'get_strategy', 'create_strategy', 'BUILTIN_STRATEGIES',
           'list_spaces', 'get_space', 'build_space', 'BUILTIN_SPACES']

#: Built-in strategies: name -> (module, one-line description). A module registers its class when imported, which
#: happens only when the strategy is used; a name whose module is not installed is not listed.
BUILTIN_STRATEGIES: dict[str, tuple[str, str]] = {
    'darts': ('nni_darts_variants.strategies.darts',
              'DARTS (Liu et al. 2019): softmax-mixed ops, first order or unrolled second order (order=2)'),
    'pcdarts': ('nni_darts_variants.strategies.pcdarts',
                'PC-DARTS (Xu et al. 2020): partial channel connections (1/K) and edge normalization'),
    'gdas': ('nni_darts_variants.strategies.gdas',
             'GDAS (Dong & Yang 2019): hard Gumbel-max sampling, one op per edge, straight-through gradients'),
    'proxyless': ('nni_darts_variants.strategies.proxyless',
                  'ProxylessNAS (Cai et al. 2019): binarized paths, one path per weight step, two per arch step'),
    'parsec': ('nni_darts_variants.strategies.parsec',
               'PARSEC (Casale et al. 2019): sampled child networks, importance-weighted empirical Bayes'),
    'pdarts': ('nni_darts_variants.strategies.pdarts',
               'P-DARTS (Chen et al. 2019): progressive depth 5/11/17 cells, op pruning 8/5/3/1, skip limits'),
    'mergenas': ('nni_darts_variants.strategies.mergenas',
                 'MergeNAS (Wang et al. 2020): the convolutions of an edge merged into one masked kernel'),
    'dropnas': ('nni_darts_variants.strategies.dropnas',
                'DropNAS (Hong et al. 2020): grouped operation dropout for one-level DARTS'),
}

_registry: dict[str, type] = {}


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def register_strategy(cls: type | None = None, *, name: str | None = None) -> Any:
    """Register a strategy class under ``name``. Usable as a decorator.

    A built-in class (its module is listed in :data:`BUILTIN_STRATEGIES`) takes its name and description from there,
    the one place they are written: the decorator sets the class attributes ``name`` and ``description``. Another
    class is registered under ``name`` or its ``name`` attribute. A name that is already taken (by a registered
    class or a built-in) raises ``ValueError``.
    """
    def _register(klass: type) -> type:
        builtin = [key for key, (module, _) in BUILTIN_STRATEGIES.items() if module == klass.__module__]
        key = name or vars(klass).get('name') or (builtin[0] if len(builtin) == 1 else getattr(klass, 'name', ''))
        if not key:
            raise ValueError(f'{klass.__name__} has no name; pass name=... or set the class attribute `name`')
        entry = BUILTIN_STRATEGIES.get(key)
        if key in _registry or (entry is not None and entry[0] != klass.__module__):
            raise ValueError(f'a strategy named {key!r} is already registered; choose another name')
        if entry is not None:
            for attr, value in (('name', key), ('description', entry[1])):
                if vars(klass).get(attr, value) != value:
                    raise ValueError(f'{klass.__name__}.{attr} = {vars(klass)[attr]!r} differs from the registry '
                                     f'({value!r}); write it only in registry.BUILTIN_STRATEGIES')
                setattr(klass, attr, value)
        _registry[key] = klass
        return klass
    return _register(cls) if cls is not None else _register


def list_strategies() -> dict[str, str]:
    """``{name: one-line description}`` of every available strategy, without importing the built-in ones."""
    result = {name: desc for name, (module, desc) in BUILTIN_STRATEGIES.items() if _available(module)}
    for key, klass in _registry.items():
        result.setdefault(key, getattr(klass, 'description', '') or (klass.__doc__ or '').strip().split('\n')[0])
    return dict(sorted(result.items()))


def get_strategy(name: str) -> type:
    """The strategy class registered as ``name``; an unknown name lists the valid ones."""
    if name not in _registry and name in BUILTIN_STRATEGIES and _available(BUILTIN_STRATEGIES[name][0]):
        importlib.import_module(BUILTIN_STRATEGIES[name][0])
    if name in _registry:
        return _registry[name]
    raise ValueError(f'unknown strategy {name!r}; valid strategies: {", ".join(list_strategies())}')


def strategy_parameters(klass: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters a strategy class accepts (its own and, through ``**kwargs``, its bases')."""
    params: dict[str, inspect.Parameter] = {}
    for base in klass.__mro__:
        if '__init__' not in vars(base):
            continue
        sig = inspect.signature(vars(base)['__init__'])
        own = {k: p for k, p in sig.parameters.items() if k != 'self' and p.kind is not p.VAR_KEYWORD}
        for k, p in own.items():
            params.setdefault(k, p)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return params


def check_strategy_arguments(name: str, kwargs: Any) -> type:
    """The class of strategy ``name``; an unknown keyword in ``kwargs`` is a ``TypeError`` naming it and the valid
    ones (nothing is built)."""
    klass = get_strategy(name)
    valid = strategy_parameters(klass)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f'strategy {name!r} got unknown argument(s) {unknown}; valid arguments: '
                        f'{", ".join(sorted(valid))}')
    return klass


def create_strategy(name: str, **kwargs: Any) -> Any:
    """Build the strategy ``name``; an unknown keyword is an error naming it and listing the valid ones."""
    return check_strategy_arguments(name, kwargs)(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Search spaces
# ---------------------------------------------------------------------------------------------------------------------

#: Built-in spaces: name -> (module, class, one-line description).
BUILTIN_SPACES: dict[str, tuple[str, str, str]] = {
    'darts': ('search_spaces.darts', 'DartsSpace',
              'DARTS CNN cell search network: 8 ops incl. none, 4 nodes, 14 edges; CIFAR-10 or ImageNet stem'),
    'proxylessnas': ('search_spaces.proxylessnas', 'ProxylessSpace',
                     'ProxylessNAS MobileNetV2-style space: 21 blocks, MBConv expand 3/6 x kernel 3/5/7, zero option'),
    'nasbench201': ('search_spaces.nasbench201', 'NasBench201Space',
                    'NAS-Bench-201 search network: 3 stages of N cells, 6 edges x 5 ops shared, scored by table lookup'),
    'nni-hub': ('search_spaces.nni_hub', 'NniHubSpace',
                "NNI's own hub spaces by name (args: {name: DARTS | NASNet | ENAS | ProxylessNAS | ..., its arguments})"),
}

#: The DartsSpace preset that suits each dataset of ``nni_darts_variants.data``.
_DATASET_TO_PRESET = {'digits': 'digits', 'cifar10': 'cifar10', 'imagenet': 'imagenet', 'imagefolder': 'cifar10',
                      'synthetic': 'cifar10'}


def list_spaces() -> dict[str, str]:
    """``{name: one-line description}`` of the built-in search spaces (nothing imported)."""
    return {name: desc for name, (module, _, desc) in sorted(BUILTIN_SPACES.items()) if _available(module)}


def init_signature(klass: type) -> inspect.Signature:
    """The constructor signature of a model-space class (``self`` included).

    NNI's ``ModelSpace`` wraps ``__init__`` as ``(*args, **kwargs)`` and keeps the original in the private
    ``_init_wrapped``; there is no public accessor, so this is the one place that reads it (checked against NNI 3.0).
    """
    return inspect.signature(getattr(klass, '_init_wrapped', None) or klass.__init__)


def get_space(name: str) -> type:
    if name not in BUILTIN_SPACES or not _available(BUILTIN_SPACES[name][0]):
        raise ValueError(f'unknown search space {name!r}; valid spaces: {", ".join(list_spaces())}')
    module, cls_name, _ = BUILTIN_SPACES[name]
    return getattr(importlib.import_module(module), cls_name)


def build_space(name: str, /, *, in_channels: int | None = None, num_classes: int | None = None,
                dataset_hint: str | None = None, **kwargs: Any) -> Any:
    """Build the space ``name`` for data with ``in_channels`` and ``num_classes``; unknown or clashing arguments
    are errors naming them."""
    klass = get_space(name)
    signature = init_signature(klass).parameters
    params = {k for k, p in signature.items() if k != 'self' and p.kind is not p.VAR_KEYWORD}
    unknown = sorted(set(kwargs) - params)
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in signature.values()):  # **args: the space checks them
        raise TypeError(f'space {name!r} got unknown argument(s) {unknown}; valid arguments: {", ".join(sorted(params))}')
    if 'dataset' in params and 'dataset' not in kwargs and dataset_hint in _DATASET_TO_PRESET:
        kwargs['dataset'] = _DATASET_TO_PRESET[dataset_hint]
    for key, value in (('in_channels', in_channels), ('num_classes', num_classes)):
        if value is None or key not in params:
            continue
        if kwargs.get(key) not in (None, value):
            raise ValueError(f'space.args.{key}={kwargs[key]} does not match the data ({value}); remove it or '
                             'choose matching data')
        kwargs[key] = value
    return klass(**kwargs)
