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
from test_search import _Kill, tiny_config  # the same tiny search and interruption

REPO = Path(__file__).resolve().parents[1]


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

def fake_checkpoint(path: Path, epoch: int) -> Path:
    torch.save({'state_dict': {'w': torch.zeros(2)}, 'loops': {}, 'optimizer_states': [], 'epoch': epoch}, path)
    return path


def test_resume_takes_the_newest_loadable_checkpoint(tmp_path, caplog):
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    assert choose_checkpoint(folder) is None  # nothing yet: start from the beginning
    fake_checkpoint(folder / 'previous.ckpt', 0)
    fake_checkpoint(folder / 'last.ckpt', 1)
    assert choose_checkpoint(folder) == folder / 'last.ckpt'
    data = (folder / 'last.ckpt').read_bytes()
    (folder / 'last.ckpt').write_bytes(data[:len(data) // 2])
    with caplog.at_level('WARNING', logger='nni_darts_variants'):
        assert choose_checkpoint(folder) == folder / 'previous.ckpt'
    assert len(caplog.records) == 1 and 'last.ckpt' in caplog.text and 'resuming from previous.ckpt' in caplog.text


def test_no_loadable_checkpoint_is_one_line_exit_2_quick(tmp_path, capsys):
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    write_config(run / 'config.yaml', tiny_config())
    (run / 'checkpoints' / 'last.ckpt').write_bytes(b'')
    (run / 'checkpoints' / 'previous.ckpt').write_bytes(b'not a checkpoint at all')
    assert main(['search', '--resume', str(run)]) == 2
    line = one_error_line(capsys)
    assert 'last.ckpt' in line and 'previous.ckpt' in line and 'can be loaded' in line, line


def test_a_resume_writes_into_the_resumed_folder(tmp_path, monkeypatch):
    """``--resume RUN_DIR`` continues in RUN_DIR (here one with no checkpoint yet), not in the config's default."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / 'mine'
    run.mkdir()
    write_config(run / 'config.yaml', tiny_config(epochs=1))
    assert main(['search', '--resume', str(run)]) == 0
    assert (run / 'result.json').is_file() and (run / 'checkpoints' / 'last.ckpt').is_file()
    assert not (tmp_path / 'runs').exists()  # not the config's default folder (runs/...)


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


@pytest.mark.slow
def test_checkpoints_are_last_and_previous(interrupted_and_full):
    part, _ = interrupted_and_full
    names = sorted(p.name for p in (part / 'checkpoints').iterdir())
    assert names == ['last.ckpt', 'previous.ckpt']
    epochs = [torch.load(part / 'checkpoints' / n, weights_only=True)['epoch'] for n in names]
    assert epochs == [1, 0]
    assert not (part / '.lock').exists()


@pytest.mark.slow
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


def _retrain_objects():
    """What a retrain checkpoints (``to_save``), for a tiny model, and its ignite trainer."""
    import functools

    from ignite.engine import Engine
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(pow, 0.5))
    trainer = Engine(lambda engine, batch: None)
    return {'model': model, 'optimizer': optimizer, 'lr_scheduler': scheduler, 'trainer': trainer}


def test_a_retrain_resume_refuses_code_and_falls_back_to_the_epoch_before(tmp_path, caplog):
    """The retrain's resume loads with ``weights_only=True``: a checkpoint that would run code is skipped with one
    warning naming it, the one before is loaded; when none loads, one error names them all."""
    from nni_darts_variants.retrain.handlers import RunRecord, resume_from_checkpoint
    saved = _retrain_objects()
    saved['trainer'].load_state_dict({'epoch': 1, 'max_epochs': 5, 'epoch_length': 4})
    (tmp_path / 'checkpoints').mkdir()
    torch.save({k: v.state_dict() for k, v in saved.items()}, tmp_path / 'checkpoints' / 'checkpoint_1.pt')

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "pwned"}',))
    torch.save({'model': Evil(), 'trainer': {}}, tmp_path / 'checkpoints' / 'checkpoint_2.pt')
    run = RunRecord(tmp_path, 'tiny', 8, 8, 'cpu')
    fresh = _retrain_objects()
    with caplog.at_level('WARNING', logger='nni_darts_variants'):
        assert resume_from_checkpoint(fresh, fresh['trainer'], run) == 1
    assert not (tmp_path / 'pwned').exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 1 and 'checkpoint_2.pt' in warnings[0] and 'resuming from checkpoint_1.pt' in warnings[0]
    assert torch.equal(fresh['model'].weight, saved['model'].weight)
    (tmp_path / 'checkpoints' / 'checkpoint_1.pt').write_bytes(b'truncated')
    with pytest.raises(ConfigError, match='no checkpoint in .* can be loaded: .*checkpoint_2.pt .*checkpoint_1.pt'):
        resume_from_checkpoint(fresh, fresh['trainer'], run)
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
    """A start that fails after the run folder was prepared (a truncated image, met at the first training steps)
    leaves the folder the user made with only what was there before."""
    run = tmp_path / 'mine'
    run.mkdir()
    (run / 'notes.txt').write_text('keep me')
    config = write_config(tmp_path / 'c.yml', truncated_image_config(tmp_path)[0])
    assert main(['search', str(config), '-o', str(run)]) == 2
    assert 'cannot read the image' in one_error_line(capsys)
    assert sorted(p.name for p in run.iterdir()) == ['notes.txt']


def test_pdarts_on_a_space_it_cannot_rebuild_fails_when_the_config_resolves(tmp_path, capsys):
    from nni_darts_variants.search import resolve_config
    from nni_darts_variants.strategies.pdarts import PDarts
    args = PDarts.smoke_kwargs()
    cfg = tiny_config('pdarts', epochs=len(args['stage_cells']) * args['epochs_per_stage'], **args)
    cfg['space'] = {'name': 'proxylessnas', 'args': {}}
    with pytest.raises(ConfigError, match="strategy 'pdarts' on space 'proxylessnas': P-DARTS rebuilds the model"):
        resolve_config(cfg)  # the config alone: no data, space or strategy built yet
    config = write_config(tmp_path / 'c.yml', cfg)
    assert main(['search', str(config), '-o', str(tmp_path / 'run')]) == 2
    line = one_error_line(capsys)
    assert 'ProxylessSpace takes no `num_cells` argument' in line and 'use DartsSpace' in line, line
    assert not (tmp_path / 'run').exists()


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


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C
# ---------------------------------------------------------------------------------------------------------------------

class _Signal(pl.Callback):
    """Sends ``signum`` to this process at the end of step ``step`` of epoch ``epoch``."""

    def __init__(self, signum, epoch=1, step=0):
        self.signum, self.epoch, self.step = signum, epoch, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.step):
            os.kill(os.getpid(), self.signum)


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes(tmp_path):
    cfg = tiny_config(epochs=3)
    cfg['data']['batch_size'] = 32  # 4 steps per epoch: the stop falls inside epoch 1
    with pytest.raises(SearchInterrupted) as stop:
        run_search(cfg, output=tmp_path / 'run', callbacks=[_Signal(signal.SIGINT)])
    assert stop.value.exit_code == 130 and f'--resume {tmp_path / "run"}' in str(stop.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoints' / 'last.ckpt', weights_only=True)
    # Saved from on_train_batch_end: Lightning counts the step in flight as processed (and completes it on resume).
    progress = checkpoint['loops']['fit_loop']['epoch_loop.batch_progress']['current']['processed']
    assert checkpoint['epoch'] == 1 and progress == 2, (checkpoint['epoch'], progress)  # the step in flight finished
    assert not (tmp_path / 'run' / '.lock').exists()
    run_search(None, resume=tmp_path / 'run')
    history = json.loads((tmp_path / 'run' / 'alpha_history.json').read_text())
    assert [h['epoch'] for h in history] == [0, 1, 2]


@pytest.mark.slow
def test_sigterm_on_the_command_line_exits_143_with_the_resume_line(tmp_path):
    cfg = tiny_config(epochs=40)
    config = write_config(tmp_path / 'c.yml', cfg)
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.Popen([sys.executable, '-m', 'nni_darts_variants.cli', 'search', str(config), '-o', 'run'],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / 'run' / 'checkpoints' / 'last.ckpt').exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    last = [line for line in err.splitlines() if line.startswith('nni-darts')]
    assert len(last) == 1 and 'stopped by SIGTERM' in last[0] and 'resume with: nni-darts search --resume run' \
        in last[0], err[-3000:]
    assert 'Traceback' not in err
    resumed = subprocess.run([sys.executable, '-m', 'nni_darts_variants.cli', 'search', '--resume', 'run', '--set',
                              'train.max_epochs=3'], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / 'run' / 'result.json').exists()


# ---------------------------------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent('''
    """The search of argv[1] with a file-size limit of argv[2] bytes from epoch 1 on (a disk that fills up)."""
    import resource, signal, sys
    import pytorch_lightning as pl
    from nni_darts_variants import cli
    from nni_darts_variants.search import runner

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead

    class FillUp(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))

    callbacks = runner._search_callbacks
    runner._search_callbacks = lambda cfg, data, run_dir, monitor, stop, extra: callbacks(cfg, data, run_dir,
                                                                                          monitor, stop, [FillUp()])
    sys.exit(cli.main(['search', sys.argv[1], '-o', 'run']))
''')


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_write(tmp_path):
    config = write_config(tmp_path / 'c.yml', tiny_config(epochs=3))
    (tmp_path / 'full_disk.py').write_text(FULL_DISK)
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    proc = subprocess.run([sys.executable, 'full_disk.py', str(config), str(1_000_000)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith('nni-darts')]
    assert len(lines) == 1 and 'could not write the checkpoint' in lines[0] and 'kept intact' in lines[0], lines
    assert 'Traceback' not in proc.stderr
    checkpoints = tmp_path / 'run' / 'checkpoints'
    assert sorted(p.name for p in checkpoints.iterdir()) == ['last.ckpt']  # no temporary left behind
    assert torch.load(checkpoints / 'last.ckpt', weights_only=True)['epoch'] == 0  # epoch 0's, whole
    assert main(['search', '--resume', str(tmp_path / 'run')]) == 0  # space freed: the resume finishes the run
    assert [h['epoch'] for h in json.loads((tmp_path / 'run' / 'alpha_history.json').read_text())] == [0, 1, 2]


@pytest.mark.slow
def test_a_full_disk_while_the_bundle_is_written_keeps_the_search(tmp_path, monkeypatch, caplog):
    """ENOSPC in the bundle's files: one warning, the search's own result files all written, no temporary left."""
    from nni_darts_variants import bundle
    original = bundle.write_bundle

    def on_a_full_disk(*args, **kwargs):
        def no_space(fd):
            raise OSError(errno.ENOSPC, 'No space left on device')
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, 'fsync', no_space)
            return original(*args, **kwargs)
    monkeypatch.setattr(bundle, 'write_bundle', on_a_full_disk)
    cfg = tiny_config(epochs=1)
    cfg['output']['bundle'] = True
    with caplog.at_level('WARNING', logger='nni_darts_variants'):
        run_search(cfg, output=tmp_path / 'run')
    warnings = [r.getMessage() for r in caplog.records if 'could not write the result bundle' in r.getMessage()]
    assert len(warnings) == 1 and 'No space left on device' in warnings[0], warnings
    for name in ('result.json', 'genotype.json', 'sample.json', 'alphas.json', 'alpha_history.json'):
        json.loads((tmp_path / 'run' / name).read_text())  # whole
    assert not list((tmp_path / 'run').rglob('.*.tmp'))


# ---------------------------------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------------------------------

def truncated_image_config(tmp_path: Path, workers: int = 0) -> tuple[dict, Path]:
    """A tiny search on an ImageFolder tree of 12 images, one of them truncated (what an interrupted copy leaves),
    and that image's path."""
    from PIL import Image
    for label in ('a', 'b'):
        (tmp_path / 'data' / 'train' / label).mkdir(parents=True)
        for i in range(6):
            Image.new('RGB', (8, 8), (40 * i, 100, 0 if label == 'a' else 200)).save(
                tmp_path / 'data' / 'train' / label / f'{i}.png')
    bad = tmp_path / 'data' / 'train' / 'b' / '3.png'
    bad.write_bytes(bad.read_bytes()[:40])
    cfg = tiny_config(epochs=1)
    cfg['data'].update(name='imagefolder', root=str(tmp_path / 'data'), batch_size=4, limit=None, image_size=8,
                       num_workers=workers)
    return cfg, bad


@pytest.mark.parametrize('workers', [0, 2])  # 2: raised in a DataLoader worker, re-raised by PyTorch
def test_a_truncated_image_is_named_in_a_one_line_error(tmp_path, capsys, workers):
    cfg, bad = truncated_image_config(tmp_path, workers)
    config = write_config(tmp_path / 'c.yml', cfg)
    assert main(['search', str(config), '-o', str(tmp_path / 'run')]) == 2
    line = one_error_line(capsys)
    assert f'cannot read the image {bad}' in line and 'replace or remove' in line, line
    assert not (tmp_path / 'run').exists()


# ---------------------------------------------------------------------------------------------------------------------
# kill -9 at random moments
# ---------------------------------------------------------------------------------------------------------------------

def _cli(args, cwd, env):
    return subprocess.Popen([sys.executable, '-m', 'nni_darts_variants.cli', 'search', *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _temporaries(run: Path) -> set[Path]:
    return set((run / 'checkpoints').glob('.last.ckpt.*.tmp')) if (run / 'checkpoints').is_dir() else set()


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing(tmp_path):
    """A seeded CPU search killed with SIGKILL at least 10 times (at least twice inside a checkpoint write, whose
    window the test widens with NNI_DARTS_TEST_WRITE_PAUSE), resumed each time, ends with the genotype and alphas
    of an uninterrupted run."""
    import random
    from nni_darts_variants.atomic import PAUSE_ENV
    epochs = 12
    config = write_config(tmp_path / 'c.yml', tiny_config(epochs=epochs))
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore',
           PAUSE_ENV: '0.3'}
    reference = _cli([str(config), '-o', 'reference'], tmp_path, env)
    assert reference.wait(timeout=900) == 0, reference.stderr.read()[-3000:]

    rng = random.Random(16)
    run = tmp_path / 'run'
    kills = inside_write = resumes = 0
    while kills < 10:
        resuming = (run / 'config.yaml').exists()
        proc = _cli(['--resume', 'run'] if resuming else [str(config), '-o', 'run'], tmp_path, env)
        resumes += resuming
        in_write = kills % 3 == 1  # every third kill waits for the second checkpoint write of this process
        stale = _temporaries(run)  # left by an earlier kill inside a write (the next writer removes them)
        deadline, seen, started = time.time() + rng.uniform(3.0, 15.0), 0, time.time()
        while proc.poll() is None:
            if in_write:
                if _temporaries(run) - stale:
                    seen += 1
                    if seen == 2:
                        break
                    while _temporaries(run) - stale and proc.poll() is None:
                        time.sleep(0.01)
            elif time.time() >= deadline:
                break
            if time.time() - started > 300:
                break
            time.sleep(0.01)
        if proc.poll() is not None:  # it finished before the kill: the run is complete
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
            break
        inside_write += bool(_temporaries(run) - stale)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    if not (run / 'result.json').exists():
        final = _cli(['--resume', 'run'], tmp_path, env)
        resumes += 1
        assert final.wait(timeout=900) == 0, final.stderr.read()[-3000:]
    mismatches = sum((run / name).read_text() != (tmp_path / 'reference' / name).read_text()
                     for name in ('alphas.json', 'genotype.json', 'sample.json'))
    print(f'\nkill -9 soak: {kills} kills ({inside_write} inside a checkpoint write), {resumes} resumes, '
          f'{mismatches} mismatching files of 3')
    assert kills >= 10 and inside_write >= 2 and mismatches == 0
    assert [h['epoch'] for h in json.loads((run / 'alpha_history.json').read_text())] == list(range(epochs))
    assert not _temporaries(run)  # the resumes removed what the kills left


# ---------------------------------------------------------------------------------------------------------------------
# nnictl stop on a trial
# ---------------------------------------------------------------------------------------------------------------------

#: ``nnictl create`` with more patience for NNI's web server: nnictl gives it about 3 s to answer, which a loaded
#: 2-core machine misses (``Create experiment failed: ... Connection refused``); this is NNI's own launcher with 60.
PATIENT_CREATE = textwrap.dedent('''
    import functools, sys
    from nni.experiment import launcher
    launcher._check_rest_server = functools.partial(launcher._check_rest_server, retry=60)
    from nni.tools.nnictl.nnictl import parse_args
    sys.argv = ['nnictl', 'create', *sys.argv[1:]]
    sys.exit(parse_args())
''')


def _run_until_a_checkpoint_then_stop(folder: Path, config: Path) -> tuple[list[Path], bool]:
    """``nnictl create`` the experiment in ``folder``, wait for its trial's first checkpoint, ``nnictl stop`` it; the
    checkpoints found, and whether the manager failed because its tuner connected too late (then nothing is found)."""
    import re

    from test_nnictl import NNICTL, TUNER_TIMEOUT, _end_manager, _env, _free_port, _get, _manager_pid
    (folder / 'home').mkdir(parents=True)
    port, env = _free_port(), _env(folder)
    created = subprocess.run([sys.executable, '-c', PATIENT_CREATE, '--config', str(config), '--port', str(port)],
                             env=env, cwd=str(folder), capture_output=True, text=True, timeout=180)
    output = re.sub(r'\x1b\[[0-9;]*m', '', created.stdout + created.stderr)
    found = re.search(r'Experiment ID:\s*(\w+)', output)
    assert created.returncode == 0 and found, output
    manager = _manager_pid(env['HOME'], found.group(1))
    # NNI 3.0's local trials run in <experiment>/environments/local-env/trials/<trial>/, the search in its search/.
    trials_dir = Path(env['HOME']) / 'nni-experiments' / found.group(1) / 'environments' / 'local-env' / 'trials'
    try:
        deadline, checkpoints, status = time.monotonic() + 300, [], {}
        while time.monotonic() < deadline and not checkpoints:
            checkpoints = list(trials_dir.glob('*/search/checkpoints/last.ckpt'))
            status = _get(port, 'check-status')
            if status['status'] == 'ERROR':
                assert any(TUNER_TIMEOUT in e for e in status.get('errors', [])), status
                return [], True
            time.sleep(0.5)
        assert checkpoints, _get(port, 'trial-jobs')
        stopped = subprocess.run([str(NNICTL), 'stop', found.group(1)], env=env, cwd=str(folder),
                                 capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        return checkpoints, False
    finally:
        if not checkpoints:
            subprocess.run([str(NNICTL), 'stop', found.group(1)], env=env, cwd=str(folder), capture_output=True,
                           timeout=120)
        _end_manager(manager)


@pytest.mark.slow
def test_nnictl_stop_leaves_a_resumable_folder(tmp_path):
    """``nnictl stop`` ends the manager, whose trial keeper sends each trial SIGINT and SIGKILL 5 s later (NNI 3.0,
    ``nni_node/common/trial_keeper/process.js``): the step finishes, a checkpoint is written, the trial exits before
    the SIGKILL, and the folder resumes to a finished run."""
    import yaml
    from test_nnictl import NNICTL, SMOKE
    if not NNICTL.is_file():
        pytest.skip('nnictl is not installed next to this Python')
    config = yaml.safe_load((SMOKE / 'darts-1st.yml').read_text())
    config['trialCommand'] += ' --set train.max_epochs=200'
    config['trialCodeDirectory'] = str(REPO)
    (tmp_path / 'long.yml').write_text(yaml.safe_dump(config))
    for attempt in range(6):  # NNI's manager gives its tuner a fixed 10 s to connect, too short on a loaded machine
        checkpoints, tuner_late = _run_until_a_checkpoint_then_stop(tmp_path / f'try{attempt}', tmp_path / 'long.yml')
        if not tuner_late:
            break
    assert checkpoints, 'no trial checkpoint'
    run = checkpoints[0].parents[1]
    log = (run.parent / 'trial.log').read_text()
    assert 'stopped by SIGINT' in log and f'--resume {run}' in log, log[-3000:]
    assert not (run / 'result.json').exists() and not (run / '.lock').exists(), log[-3000:]  # exited before SIGKILL
    epoch = torch.load(run / 'checkpoints' / 'last.ckpt', weights_only=True)['epoch']
    result = run_search(None, overrides=[f'train.max_epochs={epoch + 2}'], resume=run)
    assert result.genotype is not None and (run / 'result.json').exists()
