"""Searching on several devices: a 2-process CPU (gloo) DDP search keeps one architecture on every rank.

NNI issue 5013: under DDP each rank exported a different architecture. Here every registered strategy searches
with ``train.strategy=ddp``, ``train.devices=2`` on the CPU, and each rank records its architecture parameters after
every step, every sample it drew, its final export and the files it wrote. The ranks must agree bit for bit, only
rank 0 may write the run folder, and a control run without the architecture-gradient averaging of
:class:`~nni_darts_variants.distributed.DistributedArchSync` (second-order DARTS, whose ``torch.autograd.grad``
gradients DDP does not reduce) must disagree, so that the comparison can fail.

All searches run in ONE launch (Lightning's ``ddp`` launcher re-runs the script once as rank 1; later searches reuse
the process group), so the start-up cost is paid once. Network traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nni_darts_variants import list_strategies
from nni_darts_variants.distributed import lightning_strategy
from nni_darts_variants.genotype import Genotype
from nni_darts_variants.registry import get_strategy
from nni_darts_variants.search import resolve_config

SCRIPT = textwrap.dedent('''
    """Runs on every rank: one tiny DDP search per case, each rank dumps what it saw to OUT/<case>-rank<r>.json."""
    import json, os, sys
    from pathlib import Path

    import pytorch_lightning as pl
    import torch

    from nni_darts_variants.distributed import DistributedArchSync
    from nni_darts_variants.search import arch_state, run_search

    out, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    writes = []
    _replace, _write_text = os.replace, Path.write_text

    def replace(src, dst, *args, **kwargs):
        writes.append(str(Path(dst).resolve()))
        return _replace(src, dst, *args, **kwargs)

    def write_text(self, *args, **kwargs):
        writes.append(str(self.resolve()))
        return _write_text(self, *args, **kwargs)

    os.replace, Path.write_text = replace, write_text

    def plain(x):
        if isinstance(x, torch.Tensor):
            return x.tolist()
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    class Record(pl.Callback):
        def __init__(self):
            self.steps, self.samples = [], []

        def on_train_start(self, trainer, pl_module):
            self.rank, self.world = trainer.global_rank, trainer.world_size
            self.initial = arch_state(pl_module)
            resample = pl_module.resample

            def recorded():
                sample = resample()
                self.samples.append(plain(sample))
                return sample
            pl_module.resample = recorded

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append(arch_state(pl_module))

        def on_train_end(self, trainer, pl_module):
            self.final = arch_state(pl_module)

    for case, cfg in cases.items():
        if case.endswith('-nosync'):  # the control: no averaging of architecture gradients, no check
            DistributedArchSync.on_before_optimizer_step = lambda *args: None
            DistributedArchSync.on_train_epoch_end = lambda *args: None
        record, run_dir = Record(), out / case
        del writes[:]
        result = run_search(cfg, output=run_dir, callbacks=[record])
        dump = {'rank': record.rank, 'world': record.world, 'initial': record.initial, 'steps': record.steps,
                'samples': record.samples, 'final': record.final, 'sample': result.sample,
                'genotype': result.genotype.to_dict() if result.genotype is not None else None,
                'writes': [w for w in writes if w.startswith(str(run_dir.resolve()))]}
        _write_text(out / f'{case}-rank{record.rank}.json', json.dumps(dump))
''')


def tiny_ddp_config(name: str, **extra_args) -> dict:
    args = {**get_strategy(name).smoke_kwargs(), **extra_args}
    if 'epochs_per_stage' in args:  # P-DARTS: one stage over the two epochs
        args['epochs_per_stage'] = 2
    return {'seed': 3, 'strategy': {'name': name, 'args': args},
            'space': {'name': 'darts', 'args': {'width': 8, 'num_cells': 3}},
            'data': {'name': 'digits', 'batch_size': 32, 'limit': 256},
            'train': {'max_epochs': 2, 'progress_bar': False, 'eval_batches': 1, 'accelerator': 'cpu',
                      'devices': 2, 'strategy': 'ddp'},
            'output': {'bundle': False}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def ddp_env(root: Path) -> dict[str, str]:
    """The environment of a launch: HOME under ``root``, one thread, rendezvous on a free port of 127.0.0.1."""
    (root / 'home').mkdir(exist_ok=True)
    env = {**os.environ, 'HOME': str(root / 'home'), 'NNI_OUTPUT_DIR': str(root / 'nni-output'),
           'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(_free_port()), 'OMP_NUM_THREADS': '1',
           'PYTHONWARNINGS': 'ignore'}
    for key in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'NODE_RANK', 'GROUP_RANK'):
        env.pop(key, None)
    if Path('/sys/class/net/lo').exists():
        env['GLOO_SOCKET_IFNAME'] = 'lo'  # gloo's own connections on the loopback device too
    return env


def test_cli_ddp_search_exports_one_architecture(tmp_path):
    """The user's path: ``nni-darts search`` with ``--set train.devices=2 --set train.strategy=ddp`` on the CPU.

    GDAS draws a Gumbel sample every step. Each rank prints the architecture it exported; the run stops with an
    error if the architecture parameters of the ranks differ at an epoch end.
    """
    import yaml
    cfg = tiny_ddp_config('gdas')
    del cfg['train']['devices'], cfg['train']['strategy']
    (tmp_path / 'cfg.yml').write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, '-m', 'nni_darts_variants.cli', 'search', 'cfg.yml', '-o', 'run',
           '--set', 'train.devices=2', '--set', 'train.strategy=ddp', '--set', 'train.accelerator=cpu']
    proc = subprocess.run(cmd, cwd=tmp_path, env=ddp_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert 'GLOBAL_RANK: 1, MEMBER: 2/2' in proc.stderr  # really two processes
    assert 'differ' not in proc.stderr
    # The two ranks print to one stream, so their lines may interleave with log lines: match the genotypes.
    exported = re.findall(r'architecture: (normal: \[[^\]]*\]  reduce: \[[^\]]*\])', proc.stdout)
    assert len(exported) == 2 and exported[0] == exported[1], exported
    result = json.loads((tmp_path / 'run' / 'result.json').read_text())
    assert exported[0] == str(Genotype.from_dict(result['genotype']))
    assert json.loads((tmp_path / 'run' / 'config.json').read_text())['config']['train']['strategy'] == 'ddp'
    assert len(list((tmp_path / 'run' / 'metrics').glob('version_*'))) == 1


@pytest.fixture(scope='module')
def ddp_runs(tmp_path_factory):
    """Launch every case once (rank 0 here, rank 1 re-launched by Lightning); ``{case: (rank0, rank1, run_dir)}``."""
    root = tmp_path_factory.mktemp('ddp')
    cases = {name: tiny_ddp_config(name) for name in sorted(list_strategies())}
    cases['darts-2nd'] = tiny_ddp_config('darts', order=2)
    cases['darts-2nd-nosync'] = tiny_ddp_config('darts', order=2)  # last: it disables the sync for good
    (root / 'cases.json').write_text(json.dumps(cases))
    (root / 'search_ddp.py').write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(root / 'search_ddp.py'), str(root / 'out'), str(root / 'cases.json')],
                          cwd=root, env=ddp_env(root), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert 'differ' not in proc.stderr, proc.stderr[-3000:]  # no random-state or architecture mismatch reported
    runs = {}
    for case in cases:
        ranks = [json.loads((root / 'out' / f'{case}-rank{r}.json').read_text()) for r in (0, 1)]
        runs[case] = (*ranks, root / 'out' / case)
    return runs


SYNCED = sorted(list_strategies()) + ['darts-2nd']


@pytest.mark.slow
@pytest.mark.parametrize('case', SYNCED)
def test_ranks_keep_one_architecture(ddp_runs, case):
    rank0, rank1, _ = ddp_runs[case]
    assert (rank0['rank'], rank1['rank'], rank0['world'], rank1['world']) == (0, 1, 2, 2)
    assert rank0['initial'] == rank1['initial']
    assert len(rank0['steps']) == len(rank1['steps']) > 0
    for step, (a, b) in enumerate(zip(rank0['steps'], rank1['steps'])):
        assert a == b, f'{case}: the architecture parameters differ between ranks after step {step}'
    assert rank0['final'] == rank1['final']
    assert rank0['final'] != rank0['initial'], f'{case}: the architecture parameters never moved'
    assert rank0['samples'] == rank1['samples'], f'{case}: the ranks drew different samples'
    assert rank0['sample'] == rank1['sample']
    assert rank0['genotype'] is not None and rank0['genotype'] == rank1['genotype']


@pytest.mark.slow
@pytest.mark.parametrize('case', ['gdas', 'proxyless', 'parsec', 'dropnas'])
def test_sampling_variants_draw_random_samples(ddp_runs, case):
    """The sample comparison above is not vacuous: these variants draw something different at different steps."""
    if case not in ddp_runs:
        pytest.skip(f'{case} is not registered')
    samples = ddp_runs[case][0]['samples']
    assert len(samples) > 2 and any(s != samples[0] for s in samples[1:]), samples[:3]


@pytest.mark.slow
@pytest.mark.parametrize('case', SYNCED)
def test_only_rank_zero_writes_the_run_folder(ddp_runs, case):
    rank0, rank1, run_dir = ddp_runs[case]
    assert rank1['writes'] == []
    written = {Path(w).name for w in rank0['writes']}
    assert {'config.json', 'config.yaml', 'alpha_history.json', 'alphas.json', 'sample.json', 'result.json'} <= written
    result = json.loads((run_dir / 'result.json').read_text())
    assert result['sample'] == rank0['sample'] and result['genotype'] == rank0['genotype']
    assert json.loads((run_dir / 'alphas.json').read_text()) == rank0['final']
    assert not list(run_dir.glob('*.tmp'))


@pytest.mark.slow
def test_without_gradient_averaging_second_order_darts_diverges(ddp_runs):
    """Control: DDP does not reduce ``torch.autograd.grad`` gradients, so without the averaging the ranks part."""
    rank0, rank1, _ = ddp_runs['darts-2nd-nosync']
    assert rank0['initial'] == rank1['initial']
    assert rank0['final'] != rank1['final']


def test_strategy_key():
    assert resolve_config({'train': {'strategy': 'ddp'}})['train']['strategy'] == 'ddp'
    assert resolve_config({})['train']['strategy'] == 'auto'
    with pytest.raises(ValueError, match='train.strategy'):
        resolve_config({'train': {'strategy': 'fsdp'}})
    assert lightning_strategy('auto', 1, 'cpu') == 'auto'
    assert lightning_strategy('auto', 2, 'cpu') == 'ddp_find_unused_parameters_true'
    assert lightning_strategy('ddp', 2, 'cpu') == 'ddp_find_unused_parameters_true'
    for refused in ('ddp_spawn', 'ddp_fork', 'deepspeed'):
        with pytest.raises(ValueError, match='use auto or ddp'):
            lightning_strategy(refused, 2, 'cpu')
    assert lightning_strategy('ddp_find_unused_parameters_true') == 'ddp_find_unused_parameters_true'


FAULT_SCRIPT = textwrap.dedent('''
    """Runs on every process: the search of argv[2]; a NaN is put into rank 1's architecture parameters at step 1
    when argv[3] == 'nan'. Each process dumps its outcome to OUT/<global rank>.json."""
    import json, math, sys, time
    from pathlib import Path

    import pytorch_lightning as pl
    import torch

    from nni_darts_variants.search import DivergenceError, arch_state, run_search

    out, cfg, fault = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]

    from nni_darts_variants.search.callbacks import DivergenceGuard
    check = DivergenceGuard.on_train_batch_end

    def nan_on_rank_1(self, trainer, pl_module, outputs, batch, batch_idx):
        """Rank 1's alphas become NaN right before its guard looks (after the step, so no gradient spreads it)."""
        if fault == 'nan' and trainer.global_rank == 1 and batch_idx == 1:
            with torch.no_grad():
                pl_module.arch_parameters()[0].fill_(math.nan)
        return check(self, trainer, pl_module, outputs, batch, batch_idx)
    DivergenceGuard.on_train_batch_end = nan_on_rank_1

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.rank = trainer.global_rank

        def on_train_end(self, trainer, pl_module):
            self.final = arch_state(pl_module)

    probe, start = Probe(), time.time()
    try:
        result = run_search(cfg, output=out / 'run', callbacks=[probe])
        dump = {'final': probe.final, 'genotype': result.genotype.to_dict()}
    except DivergenceError as err:
        dump = {'error': str(err)}
    dump['seconds'] = time.time() - start
    (out / f'{probe.rank}.json').write_text(json.dumps(dump))
''')


def _fault_run(tmp_path: Path, cfg: dict, fault: str, nodes: int) -> list[dict]:
    """Run FAULT_SCRIPT on 2 processes: one launch of 2 devices (Lightning starts rank 1), or 2 "nodes" of 1 process
    each started here with NODE_RANK on 127.0.0.1."""
    (tmp_path / 'cfg.json').write_text(json.dumps(cfg))
    (tmp_path / 'fault.py').write_text(FAULT_SCRIPT)
    env = ddp_env(tmp_path)
    cmd = [sys.executable, str(tmp_path / 'fault.py'), str(tmp_path / 'out'), str(tmp_path / 'cfg.json'), fault]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env={**env, 'NODE_RANK': str(node)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in range(nodes)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    outs = [tmp_path / 'out' / f'{rank}.json' for rank in (0, 1)]
    assert all(o.exists() for o in outs), '\n'.join(log[-3000:] for log in logs)
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_promptly(tmp_path):
    cfg = tiny_ddp_config('darts')
    cfg['train']['max_epochs'] = 3
    rank0, rank1 = _fault_run(tmp_path, cfg, 'nan', nodes=1)
    assert 'non-finite' in rank1.get('error', ''), rank1
    assert 'another rank diverged' in rank0.get('error', ''), rank0
    assert max(rank0['seconds'], rank1['seconds']) < 300  # gloo's collective timeout is 30 minutes
    assert not (tmp_path / 'out' / 'run' / 'result.json').exists()


@pytest.mark.slow
def test_two_nodes_of_one_process_keep_one_architecture(tmp_path):
    cfg = tiny_ddp_config('gdas')
    cfg['train'].update(devices=1, num_nodes=2)
    rank0, rank1 = _fault_run(tmp_path, cfg, 'none', nodes=2)
    assert 'error' not in rank0 and 'error' not in rank1
    assert rank0['final'] == rank1['final'] and rank0['genotype'] == rank1['genotype']
    assert json.loads((tmp_path / 'out' / 'run' / 'alphas.json').read_text()) == rank0['final']
