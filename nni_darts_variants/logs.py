"""Terminal logging for the command line: our own lines by default, NNI's and Lightning's with ``--verbose``.

NNI 3.0 gives its ``nni`` logger a coloured stdout handler and lets records propagate, so a root handler (e.g.
``logging.basicConfig``) printed each NNI line twice. Here the root logger is left alone: this package's logger
gets one handler, NNI keeps its own. By default NNI and Lightning log warnings only, and the warnings known to be
harmless for one-shot searches are dropped at the logger that emits them.
"""
from __future__ import annotations

import logging
import sys
import warnings

__all__ = ['HARMLESS_NNI_WARNINGS', 'configure_logging']

#: ``{logger: message starts}`` of NNI warnings that one-shot searches always trigger and that mean nothing.
HARMLESS_NNI_WARNINGS: dict[str, tuple[str, ...]] = {
    'nni.nas.experiment.config.experiment': ('`training_service` will be ignored for sequential execution engine',),
    'nni.nas.oneshot.pytorch.strategy': ('Checkpoint callback does not have last_model_path',),
    'nni.nas.evaluator.pytorch.lightning': ('Validation dataloaders are missing',),
}
#: Python warnings (``warnings.warn``) of NNI and Lightning that are harmless here (regular expressions).
HARMLESS_WARNINGS = ('When using training service to spawn trials',
                     'You defined a `validation_step` but have no `val_dataloader`',
                     r'`isinstance\(treespec, LeafSpec\)` is deprecated',
                     '.*is found to be not a nn.Module')


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is when a line is written: pytest, notebooks and nnictl's trial
    runner swap it, and a handler bound to an earlier (since closed) stream would fail on every line."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102 - the current stderr, always
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__/setStream assign it: nothing to keep
        pass


def configure_logging(verbose: bool = False, debug: bool = False, frameworks: bool = True) -> None:
    """Set up the terminal: this package's lines on stderr, NNI/Lightning quiet unless ``verbose`` (or ``debug``).

    ``frameworks=False`` (commands that never import NNI, e.g. ``list``) leaves NNI and Lightning unimported.
    """
    package = logging.getLogger('nni_darts_variants')
    if not any(getattr(h, '_nni_darts', False) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter('%(levelname)s %(message)s'))
        handler._nni_darts = True
        package.addHandler(handler)
    package.setLevel(logging.DEBUG if debug else logging.INFO)
    loud = verbose or debug
    if not loud and frameworks:  # both set their loggers' level when imported: import them first
        import nni.runtime.log  # noqa: F401
        import pytorch_lightning  # noqa: F401
    for name in ('nni', 'pytorch_lightning', 'lightning.pytorch', 'lightning.fabric'):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO if loud else logging.WARNING)
    for name, starts in HARMLESS_NNI_WARNINGS.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropMessages)]:
            logger.removeFilter(old)
        if not loud:
            logger.addFilter(_DropMessages(starts))
    if not loud:
        for message in HARMLESS_WARNINGS:
            warnings.filterwarnings('ignore', message=message)
        _import_gym_silently()


def _import_gym_silently() -> None:
    """NNI imports ``gym`` when installed, which prints an unmaintained-package notice to stderr: import it first,
    with stderr captured."""
    import contextlib
    import importlib.util
    import io
    if 'gym' in sys.modules or importlib.util.find_spec('gym') is None:
        return
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(Exception):  # NNI copes without gym
        import gym  # noqa: F401
