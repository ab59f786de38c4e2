"""The trial entry point, and real ``nnictl create`` experiments on 127.0.0.1 watched through NNI's REST API.

The nnictl tests start NNI's manager (the bundled node server) with ``HOME`` in the test's tmp folder and the
project's Python first on ``PATH`` (``trialCommand: python3 ...`` must find the interpreter that has the project),
poll ``/api/v1/nni/check-status``, ``/trial-jobs`` and ``/metric-data`` until every trial has ended, and always stop
the experiment in a ``finally``. No traffic leaves 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / 'experiments' / 'smoke'
BIN = Path(sys.executable).parent
NNICTL = BIN / 'nnictl'
ENDED = {'SUCCEEDED', 'FAILED', 'USER_CANCELED', 'SYS_CANCELED', 'EARLY_STOPPED'}


# ---------------------------------------------------------------------------------------------------------------------
# The trial, in this process
# ---------------------------------------------------------------------------------------------------------------------

class RecordingChannel:
    """A trial command channel that records what NNI would send to the manager."""

    def __init__(self, parameters: dict | None):
        self.parameters = parameters
        self.metrics: list[dict] = []

    def receive_parameter(self):
        if self.parameters is None:
            return None
        return {'parameter_id': 7, 'parameter_source': 'algorithm', 'parameters': self.parameters,
                'parameter_index': 0}

    def send_metric(self, type, parameter_id, trial_job_id, sequence, value):  # noqa: A002 - NNI's signature
        self.metrics.append({'type': type, 'parameter_id': parameter_id, 'sequence': sequence, 'value': value})


@pytest.fixture
def channel(monkeypatch):
    """Install a recording channel as NNI's default trial command channel (restored afterwards)."""
    from nni.runtime import trial_command_channel as tcc
    import nni.trial
    previous = tcc.get_default_trial_command_channel()
    monkeypatch.setattr(nni.trial, '_params', None)

    def install(parameters):
        recorder = RecordingChannel(parameters)
        tcc.set_default_trial_command_channel(recorder)
        return recorder
    yield install
    tcc.set_default_trial_command_channel(previous)


def test_apply_parameters_sets_dotted_keys_and_keeps_values():
    from nni_darts_variants.trial import apply_parameters
    base = {'strategy': {'name': 'pcdarts', 'args': {'warmup_epochs': 0}}, 'seed': 2}
    out = apply_parameters(base, {'strategy.args.partial_channels_k': 4, 'seed': 3, 'data.limit': None,
                                  'strategy.args.skip_dropout': [0.1, 0.2]})
    assert out == {'strategy': {'name': 'pcdarts', 'args': {'warmup_epochs': 0, 'partial_channels_k': 4,
                                                              'skip_dropout': [0.1, 0.2]}},
                   'seed': 3, 'data': {'limit': None}}
    assert base == {'strategy': {'name': 'pcdarts', 'args': {'warmup_epochs': 0}}, 'seed': 2}
    assert apply_parameters(base, None) == base


def test_apply_parameters_rejects_a_key_below_a_value():
    from nni_darts_variants.config import ConfigError
    from nni_darts_variants.trial import apply_parameters
    with pytest.raises(ConfigError, match='seed'):
        apply_parameters({'seed': 2}, {'seed.value': 3})


def test_trial_reports_every_epoch_and_the_final_result(channel, tmp_path):
    """The metrics reach the trial's channel although NNI's NasExperiment swaps the channel while it trains."""
    from nni_darts_variants.trial import main
    recorder = channel({'strategy.args.partial_channels_k': 2, 'train.max_epochs': 2})
    assert main(['--config', str(SMOKE / 'search' / 'pcdarts.yml'), '--set', 'data.limit=64']) == 0
    kinds = [m['type'] for m in recorder.metrics]
    assert kinds == ['PERIODICAL', 'PERIODICAL', 'FINAL']
    assert [m['sequence'] for m in recorder.metrics[:2]] == [0, 1]
    assert all(m['parameter_id'] == 7 for m in recorder.metrics)
    epochs = [m['value'] for m in recorder.metrics[:2]]
    assert [e['epoch'] for e in epochs] == [0, 1]
    assert all(0 <= e['default'] <= 1 and e['epoch_seconds'] > 0 for e in epochs)
    final = recorder.metrics[-1]['value']
    assert final['default'] == epochs[-1]['default'] == final['supernet_val_acc']  # no retraining in this recipe
    assert final['genotype'].startswith('normal:') and 'reduce:' in final['genotype']
    run_dir = Path(final['run_dir'])
    assert run_dir == tmp_path / 'nni-output' / 'search'  # conftest points NNI_OUTPUT_DIR there
    saved = yaml.safe_load((run_dir / 'config.yaml').read_text())
    assert saved['strategy']['args']['partial_channels_k'] == 2 and saved['data']['limit'] == 64
    json.dumps(recorder.metrics)  # NNI serializes every metric


def test_interrupted_trial_resumes_where_it_stopped(channel, tmp_path):
    """A trial restarted on the folder of an interrupted search continues it and reports only the new epochs."""
    import pytorch_lightning as pl
    from nni_darts_variants.search import run_search
    from nni_darts_variants.trial import main

    class Kill(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    run_dir = tmp_path / 'nni-output' / 'search'
    from nni_darts_variants.config import load_yaml
    cfg = load_yaml(SMOKE / 'search' / 'darts-1st.yml')  # a delta: its base: resolved
    cfg['data']['limit'] = 64
    cfg['train']['max_epochs'] = 2
    with pytest.raises(BaseException):
        run_search(cfg, output=run_dir, callbacks=[Kill()])
    assert (run_dir / 'checkpoints' / 'last.ckpt').exists() and not (run_dir / 'result.json').exists()
    recorder = channel({})
    assert main(['--config', str(SMOKE / 'search' / 'darts-1st.yml'), '--set', 'data.limit=64',
                 '--set', 'train.max_epochs=2']) == 0
    assert [m['type'] for m in recorder.metrics] == ['PERIODICAL', 'FINAL']
    assert recorder.metrics[0]['value']['epoch'] == 1
    assert [h['epoch'] for h in json.loads((run_dir / 'alpha_history.json').read_text())] == [0, 1]


def test_final_default_metric_is_the_retrained_accuracy_then_the_table_then_the_supernet():
    from types import SimpleNamespace
    from nni_darts_variants.trial import final_metrics

    def final(**metrics):
        return final_metrics(SimpleNamespace(metrics={'supernet_val_acc': 0.25, 'search_seconds': 3.0, **metrics},
                                             genotype=None, sample={'a': 1}, run_dir='run'))
    plain = final()
    assert plain['default'] == 0.25 and plain['supernet_val_acc'] == 0.25 and 'test_acc' not in plain
    retrained = final(evaluate={'test_acc': 0.875, 'test_loss': 0.4, 'params': 1234})
    assert (retrained['default'], retrained['supernet_val_acc'], retrained['test_acc'], retrained['params']) == \
        (0.875, 0.25, 0.875, 1234)
    table = final(evaluate={'test_acc': 0.875}, nb201={'cifar10_test': 93.5, 'arch': '|nor_conv_3x3~0|'})
    assert (table['default'], table['test_acc'], table['supernet_val_acc']) == (93.5, 0.875, 0.25)


def test_trial_terminal_is_quiet_and_verbose_brings_nni_back(capsys):
    import logging
    from nni_darts_variants.trial import _configure_logging
    _configure_logging(verbose=False)  # our handler writes to the current stderr (capsys'), whoever made it first
    assert logging.getLogger('nni').level == logging.WARNING
    logging.getLogger('nni.nas.experiment.config.experiment').warning(
        '`training_service` will be ignored for sequential execution engine')
    logging.getLogger('nni_darts_variants.trial').info('our line')
    err = capsys.readouterr().err
    assert 'our line' in err and 'training_service' not in err
    _configure_logging(verbose=True)
    assert logging.getLogger('nni').level == logging.INFO
    _configure_logging(verbose=False)


def test_trial_fails_on_a_bad_parameter(channel):
    from nni_darts_variants.trial import main
    recorder = channel({'strategy.args.no_such_argument': 1})
    assert main(['--config', str(SMOKE / 'search' / 'darts-1st.yml')]) == 1
    assert recorder.metrics == []


# ---------------------------------------------------------------------------------------------------------------------
# Real nnictl experiments
# ---------------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env['HOME'] = str(tmp_path / 'home')
    env['PATH'] = f'{BIN}{os.pathsep}{env.get("PATH", "")}'  # trialCommand's python3 is this venv's
    env['OMP_NUM_THREADS'] = '1'
    env.pop('NNI_OUTPUT_DIR', None)
    for key in [k for k in env if k.startswith('NNI_') or k.startswith('PYTEST_')]:
        env.pop(key)
    return env


def _get(port: int, endpoint: str):
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/v1/nni/{endpoint}', timeout=10) as response:
        return json.loads(response.read().decode())


def _metric(entry: dict) -> dict:
    value = json.loads(entry['data'])
    return json.loads(value) if isinstance(value, str) else value


#: NNI's manager gives its tuner process a fixed 10 s to connect; on a heavily loaded machine the import can be slower.
TUNER_TIMEOUT = 'Tuner did not connect'


#: ``nnictl create`` polls NNI's web server three times, a second apart; on a heavily loaded machine it can miss it.
SERVER_TIMEOUT = 'Timeout, retry'


def run_experiment(config: Path, tmp_path: Path, timeout: float = 240.0, attempts: int = 3) -> dict:
    """``nnictl create`` the config and wait for its trials; again (up to ``attempts`` in all) when NNI's own start-up
    timed out: its tuner did not connect, or its web server did not answer ``nnictl create`` in time."""
    for attempt in range(attempts):
        last = attempt == attempts - 1
        try:
            result = _run_experiment_once(config, tmp_path / f'attempt{attempt}', timeout)
        except AssertionError as failed:
            if last or SERVER_TIMEOUT not in str(failed):
                raise
            continue
        if last or not any(TUNER_TIMEOUT in e for e in result['status'].get('errors', [])):
            return result
    raise AssertionError('unreachable')


def _run_experiment_once(config: Path, tmp_path: Path, timeout: float) -> dict:
    """``nnictl create`` the config, wait until every trial has ended, return the trials and metrics; always stop."""
    (tmp_path / 'home').mkdir(parents=True)
    port, env = _free_port(), _env(tmp_path)
    assert shutil.which('python3', path=env['PATH']) == str(BIN / 'python3')
    created = subprocess.run([str(NNICTL), 'create', '--config', str(config), '--port', str(port)], env=env,
                             cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    output = re.sub(r'\x1b\[[0-9;]*m', '', created.stdout + created.stderr)  # nnictl colours its output
    found = re.search(r'Experiment ID:\s*(\w+)', output)
    manager_pid = _manager_pid(env['HOME'], found.group(1) if found else None)
    try:
        assert created.returncode == 0 and found, f'nnictl create failed:\n{output}'
        assert manager_pid is not None, f'experiment {found.group(1)} is not in the registry'
        expected = yaml.safe_load(config.read_text())['maxTrialNumber']
        deadline, trials, status = time.monotonic() + timeout, [], {}
        while time.monotonic() < deadline:
            status = _get(port, 'check-status')
            trials = _get(port, 'trial-jobs')
            if status['status'] == 'ERROR':
                break
            if len(trials) == expected and all(t['status'] in ENDED for t in trials):
                break
            time.sleep(2)
        else:
            pytest.fail(f'experiment did not finish in {timeout} s: {status}, {[t["status"] for t in trials]}')
        return {'status': status, 'trials': trials, 'metrics': _get(port, 'metric-data'), 'port': port}
    finally:
        target = [found.group(1)] if found else ['--all']
        subprocess.run([str(NNICTL), 'stop', *target], env=env, cwd=str(tmp_path), capture_output=True,
                       timeout=120)
        _end_manager(manager_pid)


def _manager_pid(home: str, experiment_id: str | None) -> int | None:
    """The pid of the experiment's manager (node) from ``~/nni-experiments/.experiment``, read right after create."""
    try:
        registry = json.loads((Path(home) / 'nni-experiments' / '.experiment').read_text())
        return int(registry[experiment_id]['pid'])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _end_manager(pid: int | None) -> None:
    """Make sure the manager this test started is gone, even if ``nnictl stop`` could not find it (e.g. when a
    concurrent pytest session pruned this session's tmp folder, and with it the experiment registry)."""
    if pid is None:
        return
    for sig, wait in ((None, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _trial_log(trial: dict) -> str:
    log = Path(trial.get('logPath', '')) / 'trial.log'
    return log.read_text()[-3000:] if log.is_file() else '(no trial.log)'


@pytest.mark.skipif(not NNICTL.is_file(), reason='nnictl is not installed next to this Python')
def test_nnictl_runs_a_search_and_reports_metrics(tmp_path):
    result = run_experiment(SMOKE / 'darts-1st.yml', tmp_path)
    assert result['status']['status'] != 'ERROR', result['status']
    (trial,) = result['trials']
    assert trial['status'] == 'SUCCEEDED', _trial_log(trial)
    metrics = [m for m in result['metrics'] if m['trialJobId'] == trial['trialJobId']]
    intermediate = [_metric(m) for m in metrics if m['type'] == 'PERIODICAL']
    final = [_metric(m) for m in metrics if m['type'] == 'FINAL']
    assert [m['epoch'] for m in intermediate] == [0, 1]
    assert all(0 <= m['default'] <= 1 for m in intermediate)
    # The smoke experiments retrain the cell (--set evaluate.epochs=2): the web UI ranks by its test accuracy.
    assert len(final) == 1 and final[0]['supernet_val_acc'] == intermediate[-1]['default']
    assert 0 <= final[0]['test_acc'] <= 1 and final[0]['default'] == final[0]['test_acc']
    assert final[0]['genotype'].startswith('normal:')
    run_dir = Path(final[0]['run_dir'])
    assert '/home/nni-experiments/' in str(run_dir) and run_dir.is_relative_to(tmp_path)
    assert (run_dir / 'genotype.json').is_file() and (run_dir / 'result.json').is_file()


@pytest.mark.skipif(not NNICTL.is_file(), reason='nnictl is not installed next to this Python')
def test_nnictl_failing_trial_is_detected(tmp_path):
    config = yaml.safe_load((SMOKE / 'darts-1st.yml').read_text())
    config['trialCommand'] += ' --set train.no_such_key=1'
    config['trialCodeDirectory'] = str(REPO)
    bad = tmp_path / 'bad.yml'
    bad.write_text(yaml.safe_dump(config))
    result = run_experiment(bad, tmp_path)
    (trial,) = result['trials']
    assert trial['status'] == 'FAILED'
    assert 'no_such_key' in _trial_log(trial)
    assert not [m for m in result['metrics'] if m['type'] == 'FINAL']
