"""Shared test set-up: NNI writes only under a temporary HOME; nothing is downloaded."""
from __future__ import annotations

import logging

logging.raiseExceptions = False  # NNI logs at exit to streams pytest has already closed
import os
from pathlib import Path

import pytest

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
