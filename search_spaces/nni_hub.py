"""NNI's own hub spaces (``nni.nas.hub.pytorch``) by name, for YAML and CLI: ``space: {name: nni-hub, args: {...}}``.

``NniHubSpace(name='DARTS', width=16, num_cells=8)`` returns ``nni.nas.hub.pytorch.DARTS(width=16, num_cells=8)``.
Pretrained weights are never loaded (nothing is downloaded).
"""
from __future__ import annotations

import inspect
from typing import Any

__all__ = ['NniHubSpace', 'hub_space_names']


def _hub() -> Any:
    import nni.nas.hub.pytorch as hub
    return hub


def hub_space_names() -> list[str]:
    """Names of the model spaces in ``nni.nas.hub.pytorch``."""
    from nni.nas.nn.pytorch import ModelSpace
    hub = _hub()
    return sorted(n for n in dir(hub) if isinstance(getattr(hub, n), type) and issubclass(getattr(hub, n), ModelSpace))


class NniHubSpace:
    """Build the NNI hub space ``name`` with ``args``; ``num_classes`` sets its ``num_labels`` where it has one.

    Parameters
    ----------
    name
        A class of ``nni.nas.hub.pytorch`` (``DARTS``, ``NASNet``, ``ENAS``, ``AmoebaNet``, ``PNAS``, ``NasBench201``,
        ``ProxylessNAS``, ``MobileNetV3Space``, ``ShuffleNetSpace``, ...).
    num_classes
        Classes of the data: passed as ``num_labels``; for the NASNet-family spaces it must match their ``dataset``
        (10 for ``'cifar'``, 1000 for ``'imagenet'``).
    **args
        The hub class's own constructor arguments.
    """

    def __init__(self, name: str, num_classes: int | None = None, **args: Any) -> None:
        """Never runs (``__new__`` returns the hub space); it states the signature for ``build_space``."""

    def __new__(cls, name: str, num_classes: int | None = None, **args: Any) -> Any:
        names = hub_space_names()
        if name not in names:
            raise ValueError(f'unknown NNI hub space {name!r}; valid names: {", ".join(names)}')
        klass = getattr(_hub(), name)
        init = getattr(klass, '_init_wrapped', None) or klass.__init__
        params = [p for p in inspect.signature(init).parameters if p != 'self']
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise TypeError(f'NNI hub space {name} got unknown argument(s) {unknown}; valid arguments: '
                            f'{", ".join(params)}')
        if num_classes is not None and 'num_labels' in params:
            if args.get('num_labels', num_classes) != num_classes:
                raise ValueError(f'space.args.num_labels={args["num_labels"]} does not match the data ({num_classes})')
            args['num_labels'] = num_classes
        space = klass(**args)
        expected = getattr(space, 'num_labels', num_classes)
        if num_classes is not None and expected != num_classes:
            raise ValueError(f'NNI hub space {name} classifies into {expected} classes but the data has {num_classes}; '
                             "choose its dataset ('cifar': 10, 'imagenet': 1000) or matching data")
        return space
