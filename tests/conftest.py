"""Shared test set-up: NNI writes only under a temporary HOME; nothing is downloaded."""
from __future__ import annotations

import logging

logging.raiseExceptions = False  # NNI logs at exit to streams pytest has already closed
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# HOME for the whole session (each test sets its own on top): what runs after the tests, such as NNI's exit hooks,
# writes here too, never into the real ~/nni-experiments. Removed at exit, after NNI's hooks (atexit runs LIFO).
_SESSION_HOME = tempfile.mkdtemp(prefix='nni-darts-tests-home-')
os.environ['HOME'] = _SESSION_HOME
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)

SHARED = Path(__file__).resolve().parents[1].parent / 'shared'
CIFAR_SLICE = SHARED / 'data' / 'cifar10-slice'


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """NNI writes ``~/nni-experiments``; keep it (and anything else under HOME) in the test's tmp folder."""
    home = tmp_path / 'home'
    home.mkdir()
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.setenv('NNI_OUTPUT_DIR', str(tmp_path / 'nni-output'))
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope='session', autouse=True)
def _no_manifest_rewrites_at_exit():
    """NNI stops every ``NasExperiment`` at exit, and each stop rewrites ``~/nni-experiments/.experiment`` twice: with
    hundreds of test experiments that is quadratic work after the last test. Their manifests lived in the tests'
    temporary HOMEs, so after the session the stop skips that update (NNI 3.0's ``_stop_without_nni_manager``)."""
    yield
    from nni.nas.experiment.experiment import NasExperiment
    NasExperiment._stop_without_nni_manager = lambda self: None


@pytest.fixture(scope='session', autouse=True)
def _one_thread():
    """The test tensors are tiny: one intra-op thread is faster than two and never oversubscribes the cores."""
    import torch
    torch.set_num_threads(1)


@pytest.fixture(scope='session', autouse=True)
def _quiet_logs():
    for name in ('nni', 'pytorch_lightning', 'lightning', 'lightning.pytorch'):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault('PL_DISABLE_FORK', '1')


@pytest.fixture
def cifar_slice():
    """The shared CIFAR-10 slice; tests that need it are skipped where it is absent."""
    if not (CIFAR_SLICE / 'train').is_dir():
        pytest.skip(f'CIFAR-10 slice not found at {CIFAR_SLICE}')
    return CIFAR_SLICE


class _Supernet:
    """``supernet(strategy, seed=0, space=None, dtype=None, **space_kwargs)``: the strategy's mutated tiny space.

    ``supernet.lightning(strategy, ...)`` also wraps it in the strategy's Lightning module (no trainer) and returns
    ``(module, space)``.
    """

    def __call__(self, strategy, seed: int = 0, space=None, dtype=None, **space_kwargs):
        import torch

        from nni_darts_variants.testing import tiny_space
        torch.manual_seed(seed)
        net = strategy.mutate_model(space if space is not None else tiny_space(**space_kwargs))
        return net.to(dtype) if dtype is not None else net

    def lightning(self, strategy, seed: int = 0, space=None, dtype=None, **space_kwargs):
        from nni_darts_variants.testing import tiny_evaluator
        net = self(strategy, seed=seed, space=space, **space_kwargs)
        module = strategy.configure_oneshot_module(tiny_evaluator().module)
        module.set_model(net)
        if dtype is not None:
            module.to(dtype)
        return module, net


@pytest.fixture
def supernet():
    """Build a strategy's supernet on the tiny space (see :class:`_Supernet`)."""
    return _Supernet()


def _edges_of(net, kind=None, per_label: bool = False) -> list:
    """Modules of ``net`` that are instances of ``kind`` (default: any ``MixedEdge``), in module order; with
    ``per_label`` only the first module of each label (modules of a label share their parameters)."""
    from nni_darts_variants.strategies.base import MixedEdge
    kind = kind or MixedEdge
    found, labels = [], set()
    for module in net.modules():
        if isinstance(module, kind) and not (per_label and module.label in labels):
            labels.add(getattr(module, 'label', None))
            found.append(module)
    return found


@pytest.fixture
def edges_of():
    """``edges_of(net, kind=MixedEdge, per_label=False)``: the supermodules of a kind in a network."""
    return _edges_of


@pytest.fixture
def search_with(tmp_path):
    """``search_with(strategy, callbacks, loaders=None, max_epochs=1, seed=0, space=None)``: a tiny NNI search with
    extra Lightning callbacks; returns the exported sample."""
    def run(strategy, callbacks, loaders=None, max_epochs: int = 1, seed: int = 0, space=None):
        import pytorch_lightning as pl
        from nni.nas.experiment import NasExperiment

        from nni_darts_variants.testing import tiny_evaluator, tiny_space
        pl.seed_everything(seed, verbose=False)
        evaluator = tiny_evaluator(max_epochs=max_epochs, callbacks=list(callbacks), loaders=loaders)
        experiment = NasExperiment(space if space is not None else tiny_space(), evaluator, strategy)
        experiment.config.experiment_working_directory = str(tmp_path / 'search')
        experiment.run()
        return experiment.export_top_models(formatter='dict')[0]
    return run
