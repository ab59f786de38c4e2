"""Faults lose nothing (issue 16): atomic checkpoints with a fallback, a bad start that leaves no folder, one writer
per run folder, SIGTERM/Ctrl-C, a full disk, a corrupt image, a random ``kill -9`` soak, and DDP faults."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from nni_darts_variants import list_strategies
from nni_darts_variants.atomic import atomic_write_bytes, atomic_write_json
from nni_darts_variants.cli import main
from nni_darts_variants.config import ConfigError
from nni_darts_variants.search import RunLock, SearchInterrupted, choose_checkpoint, run_search

REPO = Path(__file__).resolve().parents[1]


def tiny_config(strategy='darts', epochs=2, **strategy_args):
    return {'seed': 3, 'strategy': {'name': strategy, 'args': strategy_args},
            'space': {'name': 'darts', 'args': {'width': 8, 'num_cells': 3}},
            'data': {'name': 'digits', 'batch_size': 64, 'limit': 256},
            'train': {'max_epochs': epochs, 'progress_bar': False, 'eval_batches': 2},
            'output': {'bundle': False}}


def write_config(path: Path, cfg: dict) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith('nni-darts')]
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------------------------------

def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    (tmp_path / 'run').mkdir()
    target = tmp_path / 'run' / 'result.json'
    atomic_write_json(target, {'old': 1})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'fsync', full_disk)
    with pytest.raises(OSError, match='No space'):
        atomic_write_json(target, {'new': 2})
    assert json.loads(target.read_text()) == {'old': 1}
    assert [p.name for p in target.parent.iterdir()] == ['result.json']


def test_keep_previous_rotates_only_after_the_new_file_is_written(tmp_path):
    last, previous = tmp_path / 'last.ckpt', tmp_path / 'previous.ckpt'
    atomic_write_bytes(last, b'one', keep_previous=previous)
    assert last.read_bytes() == b'one' and not previous.exists()
    atomic_write_bytes(last, b'two', keep_previous=previous)
    assert (last.read_bytes(), previous.read_bytes()) == (b'two', b'one')
    assert oct(last.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: previous.ckpt kept, resume falls back, none loads -> one line, exit 2
# ---------------------------------------------------------------------------------------------------------------------

class _Kill(pl.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.fixture(scope='module')
def interrupted_and_full(tmp_path_factory):
    """A 3-epoch search interrupted at the start of epoch 2 (last.ckpt = epoch 1, previous.ckpt = epoch 0), and the
    same search uninterrupted."""
    root = tmp_path_factory.mktemp('faults')
    old_home = os.environ.get('HOME')
    os.environ['HOME'] = str(root)
    try:
        full = run_search(tiny_config(epochs=3), output=root / 'full')
        with pytest.raises(BaseException):
            run_search(tiny_config(epochs=3), output=root / 'part', callbacks=[_Kill(2)])
    finally:
        os.environ['HOME'] = old_home or ''
    return root / 'part', full


def _copy(run: Path, to: Path) -> Path:
    import shutil
    shutil.copytree(run, to)
    return to


def test_checkpoints_are_last_and_previous(interrupted_and_full):
    part, _ = interrupted_and_full
    names = sorted(p.name for p in (part / 'checkpoints').iterdir())
    assert names == ['last.ckpt', 'previous.ckpt']
    epochs = [torch.load(part / 'checkpoints' / n, weights_only=True)['epoch'] for n in names]
    assert epochs == [1, 0]
    assert not (part / '.lock').exists()


def test_a_truncated_last_checkpoint_falls_back_to_the_previous(tmp_path, interrupted_and_full, caplog):
    run = _copy(interrupted_and_full[0], tmp_path / 'run')
    last = run / 'checkpoints' / 'last.ckpt'
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])  # what a kill -9 without atomic writes left
    with caplog.at_level('WARNING', logger='nni_darts_variants'):
        resumed = run_search(None, resume=run)
    lines = [r.getMessage() for r in caplog.records if 'cannot load' in r.getMessage()]
    assert len(lines) == 1 and 'last.ckpt' in lines[0] and 'resuming from previous.ckpt' in lines[0], lines
    full = interrupted_and_full[1]
    assert resumed.genotype == full.genotype
    assert json.loads((run / 'alphas.json').read_text()) == json.loads((full.run_dir / 'alphas.json').read_text())


def test_no_loadable_checkpoint_is_one_line_exit_2(tmp_path, interrupted_and_full, capsys):
    run = _copy(interrupted_and_full[0], tmp_path / 'run')
    (run / 'checkpoints' / 'last.ckpt').write_bytes(b'')
    (run / 'checkpoints' / 'previous.ckpt').write_bytes(b'not a checkpoint at all')
    assert main(['search', '--resume', str(run)]) == 2
    line = one_error_line(capsys)
    assert 'last.ckpt' in line and 'previous.ckpt' in line and 'can be loaded' in line, line


def test_a_checkpoint_with_code_is_not_executed(tmp_path):
    """``torch.load(weights_only=True)``: a pickle that would run code is refused, and the resume says so."""
    folder = tmp_path / 'checkpoints'
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "pwned"}',))
    torch.save({'state_dict': {}, 'loops': {}, 'optimizer_states': [], 'epoch': 0, 'x': Evil()}, folder / 'last.ckpt')
    with pytest.raises(ConfigError, match='last.ckpt'):
        choose_checkpoint(folder)
    assert not (tmp_path / 'pwned').exists()


# ---------------------------------------------------------------------------------------------------------------------
# Validation before anything is written
# ---------------------------------------------------------------------------------------------------------------------

#: One bad argument per strategy, and the key the error must name.
BAD_ARGUMENTS = {'darts': ('order', 3), 'pcdarts': ('partial_channels_k', 0), 'gdas': ('tau_min', -1.0),
                 'proxyless': ('grad_binary_mode', 'nope'), 'parsec': ('num_samples', 0),
                 'pdarts': ('epochs_per_stage', 0), 'mergenas': ('arc_learning_rate', -1.0),
                 'dropnas': ('drop_rate', 1.5)}


@pytest.mark.parametrize('name', sorted(list_strategies()))
def test_a_bad_strategy_argument_fails_before_the_run_folder(tmp_path, capsys, name):
    key, value = BAD_ARGUMENTS.get(name, ('arc_learning_rate', -1.0))
    config = write_config(tmp_path / 'c.yml', tiny_config(name))
    assert main(['search', str(config), '--set', f'strategy.args.{key}={value}', '-o', str(tmp_path / 'run')]) == 2
    line = one_error_line(capsys)
    assert key in line and 'strategy.args' in line, line
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('override, message', [
    ('strategy.args.partial_channels_k=3', 'not divisible by partial_channels_k=3'),  # width 8: edges of 8, 16
    ('data.root=/nowhere', 'does not exist'),
])
def test_a_failed_start_leaves_no_folder(tmp_path, capsys, override, message):
    cfg = tiny_config('pcdarts')
    if override.startswith('data'):
        cfg['data']['name'] = 'imagefolder'
    config = write_config(tmp_path / 'c.yml', cfg)
    assert main(['search', str(config), '--set', override, '-o', str(tmp_path / 'run')]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / 'run').exists()


def test_a_failed_start_keeps_the_users_folder_as_it_was(tmp_path, capsys):
    """P-DARTS with a max_epochs its stages do not fill fails when training starts: the folder the user made
    stays, with only what was there before."""
    run = tmp_path / 'mine'
    run.mkdir()
    (run / 'notes.txt').write_text('keep me')
    config = write_config(tmp_path / 'c.yml', tiny_config('pdarts', epochs=1))
    assert main(['search', str(config), '-o', str(run)]) == 2
    assert "max_epochs" in one_error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == ['notes.txt']


# ---------------------------------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------------------------------

def test_a_live_writer_is_refused_with_one_line(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    writer = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        import socket
        (run / '.lock').write_text(json.dumps({'pid': writer.pid, 'host': socket.gethostname()}))
        config = write_config(tmp_path / 'c.yml', tiny_config(epochs=1))
        assert main(['search', str(config), '-o', str(run)]) == 2
        line = one_error_line(capsys)
        assert f'live process {writer.pid}' in line, line
        assert sorted(p.name for p in run.iterdir()) == ['.lock']  # nothing written, the lock left to its owner
    finally:
        writer.kill()
        writer.wait()


def test_a_dead_writers_lock_is_stale(tmp_path, caplog):
    import socket
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    lock = RunLock(tmp_path)
    (tmp_path / '.lock').write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname()}))
    with caplog.at_level('WARNING', logger='nni_darts_variants'):
        lock.acquire()
    assert 'stale lock' in caplog.text and json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid()
    lock.release()
    assert not (tmp_path / '.lock').exists()
