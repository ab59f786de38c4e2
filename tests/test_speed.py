"""The exact speed-ups give the same search: same alphas and weights after a few steps as the unoptimised path.

The unoptimised path is the same module with the shortcuts switched off (``skip_unread_gradients = False``: full
backward in both steps, as NNI's and the official code; ``zero_names`` emptied: ``none`` candidates computed, weighted
and summed). In float64 the results must be bitwise equal: leaving out a term ``w * 0`` or a gradient nobody reads
changes no floating-point operation that reaches a parameter.
"""
from __future__ import annotations

import json

import pytest
import torch
from nni.mutable import frozen_context

from nni_darts_variants import bench
from nni_darts_variants.bench import BenchConfig
from nni_darts_variants.strategies.base import MixedEdge, VariantLightningModule

CFG = dict(width=4, num_cells=3, batch_size=3, image_size=8, steps=2, warmup=1, device='cpu', prime=False)


def _search(row: str, optimised: bool, monkeypatch, precision: str = '64-true', share_relu: bool = True,
            rewrites: bool = True, **cfg_overrides):
    import pytorch_lightning as pl

    from search_spaces import ops
    monkeypatch.setattr(VariantLightningModule, 'skip_unread_gradients', optimised)
    monkeypatch.setattr(MixedEdge, 'share_relu', share_relu)
    monkeypatch.setattr(ops.DepthwiseConv2d, 'fast_backward', rewrites)
    monkeypatch.setattr(MixedEdge, 'channels_last_inside', rewrites)
    monkeypatch.setattr(ops.MaxPool2d, 'via_channels_last', rewrites)
    cfg = BenchConfig(**{**CFG, **cfg_overrides}).check()
    pl.seed_everything(0, verbose=False)
    _, module, epochs, _ = bench.build_row_module(row, cfg)
    edges = [m for m in module.modules() if isinstance(m, MixedEdge)]
    if not optimised:
        for edge in edges:
            edge.zero_names = set()
    trainer = pl.Trainer(accelerator='cpu', devices=1, precision=precision, max_epochs=epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0,
                         callbacks=[bench.step_meter(cfg.warmup, cfg.steps, 'cpu', cfg.channels_last, 0)])  # stops
    trainer.fit(module, train_dataloaders=bench.bench_loaders(cfg, cfg.batch_size))
    alphas = [p.detach().clone() for p in module.arch_parameters()]
    arch = {id(p) for p in module.arch_parameters()}
    weights = [p.detach().clone() for p in module.parameters() if id(p) not in arch]
    return alphas, weights, edges


QUICK = ['darts', 'pcdarts', 'gdas']
SLOW = ['darts-2nd', 'proxyless', 'pdarts', 'mergenas', 'dropnas', 'parsec']


@pytest.mark.parametrize('row', QUICK + [pytest.param(r, marks=pytest.mark.slow) for r in SLOW])
def test_shortcuts_give_bitwise_the_same_search_in_float64(row, monkeypatch):
    if row not in bench.available_rows():
        pytest.skip(f'{row} not registered')
    alphas, weights, edges = _search(row, True, monkeypatch)
    ref_alphas, ref_weights, ref_edges = _search(row, False, monkeypatch)
    if row in ('darts', 'pcdarts', 'darts-2nd'):  # their edges run the base sum: the shortcut is really taken
        assert any(e.zero_names for e in edges) and not any(e.zero_names for e in ref_edges)
    assert any(not torch.equal(a, torch.zeros_like(a)) for a in alphas)  # the alphas moved from ~1e-3 noise
    assert len(alphas) == len(ref_alphas) and len(weights) == len(ref_weights)
    assert all(torch.equal(a, b) for a, b in zip(alphas, ref_alphas))
    assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights))


def test_shortcuts_agree_within_float32_rounding(monkeypatch):
    alphas, weights, _ = _search('darts', True, monkeypatch, precision='32-true')
    ref_alphas, ref_weights, _ = _search('darts', False, monkeypatch, precision='32-true')
    for a, b in zip(alphas + weights, ref_alphas + ref_weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _assert_same_within(result, reference, rtol, atol):
    (alphas, weights, _), (ref_alphas, ref_weights, _) = result, reference
    assert len(alphas) == len(ref_alphas) and len(weights) == len(ref_weights)
    assert any(not torch.equal(a, torch.zeros_like(a)) for a in alphas)
    for a, b in zip(alphas + weights, ref_alphas + ref_weights):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize('row', ['darts', 'pcdarts', pytest.param('darts-2nd', marks=pytest.mark.slow),
                                 pytest.param('gdas', marks=pytest.mark.slow)])
@pytest.mark.parametrize('channels_last', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_convolution_rewrites_give_the_same_search_within_float64_rounding(row, channels_last, monkeypatch):
    """The CPU rewrites (dilated depthwise convolutions: ``DepthwiseConv2d.fast_backward``; max pools in
    channels-last: ``MaxPool2d``; mixed edges computed in channels-last: ``MixedEdge.channels_last_inside``) against
    torch's own NCHW kernels: after 3 steps in float64 the alphas and weights agree to float64 rounding. In an NHWC
    search (``channels_last``) only the dilated convolutions' rewrite is left to act."""
    from search_spaces.ops import DepthwiseConv2d
    taken = []
    rewrite = DepthwiseConv2d._rewrite
    monkeypatch.setattr(DepthwiseConv2d, '_rewrite', lambda self, x: taken.append(rewrite(self, x)) or taken[-1])
    result = _search(row, True, monkeypatch, channels_last=channels_last)
    assert {'phases', 'subsample'} <= set(taken)  # both rewrites ran (stride 1 in cells, stride 2 on reductions)
    _assert_same_within(result, _search(row, True, monkeypatch, channels_last=channels_last, rewrites=False),
                        rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('row', ['darts', 'gdas', pytest.param('proxyless', marks=pytest.mark.slow)])
def test_channels_last_gives_the_same_search_within_float64_rounding(row, monkeypatch):
    """The layout changes the kernels' summation order, not the arithmetic: after 3 steps in float64 the alphas and
    weights of an NHWC search equal the NCHW ones to ~1e-13 relative (float32 rounding is ~1e-7)."""
    _assert_same_within(_search(row, True, monkeypatch, channels_last=True), _search(row, True, monkeypatch),
                        rtol=1e-10, atol=1e-12)


def _edge(x_shape=(2, 4, 6, 6)):
    from search_spaces.ops import PRIMITIVES, build_op
    torch.manual_seed(0)
    ops = {name: build_op(name, 4, 1, affine=False, pool_bn=True) for name in PRIMITIVES}
    alpha = torch.nn.Parameter(torch.randn(len(PRIMITIVES), dtype=torch.float64))
    with frozen_context():  # supermodules are built inside NNI's frozen context (as mutate_model does)
        edge = MixedEdge(ops, alpha, 'e').double()
    return edge, torch.randn(*x_shape, dtype=torch.float64)


def test_skipping_none_keeps_the_softmax_gradient_of_its_alpha():
    """Paper formula, computed here by hand: d/d alpha_k of sum_o p_o y_o with p = softmax(alpha) is
    p_k (g_k - sum_o p_o g_o), g_o = <dL/dy, y_o>. For ``none`` g = 0, so its alpha gets -p_none sum_o p_o g_o:
    not zero (it normalizes the others), while the gradient to its own weight p_none is exactly 0."""
    edge, x = _edge()
    assert edge.zero_names == {'none'}
    out = edge(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    with torch.no_grad():
        p = torch.softmax(edge.alpha, -1)
        g = torch.stack([(upstream * edge[name](x)).sum() for name in edge.names])
        expected = p * (g - (p * g).sum())
    assert g[edge.names.index('none')] == 0
    torch.testing.assert_close(edge.alpha.grad, expected, rtol=1e-12, atol=1e-15)
    assert edge.alpha.grad[edge.names.index('none')] != 0


def test_skipping_none_gives_the_same_edge_output_and_gradients_bitwise():
    edge, x = _edge()
    out = edge(x)
    out.sum().backward()
    grad = edge.alpha.grad.clone()
    edge.alpha.grad = None
    edge.zero_names = set()
    full = edge(x)
    full.sum().backward()
    assert torch.equal(out, full) and torch.equal(grad, edge.alpha.grad)


@pytest.mark.parametrize('stride', [1, 2])
def test_edge_sharing_its_relu_gives_bitwise_the_same_output(stride):
    from search_spaces.ops import PRIMITIVES, build_op, outputs_sharing_relu
    torch.manual_seed(0)
    ops = [build_op(name, 4, stride, affine=True) for name in PRIMITIVES + ('nor_conv_1x1', 'nor_conv_3x3')]
    ops = [op.double() for op in ops]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    shared = outputs_sharing_relu(ops, x)
    separate = [op(x) for op in ops]
    assert sum(getattr(op, 'starts_with_relu', False) for op in ops) == 7 - (stride == 1)  # skip is a ReLU only at 2
    assert all(torch.equal(a, b) for a, b in zip(shared, separate))
    g_shared, = torch.autograd.grad(sum(o.square().sum() for o in shared), x)
    g_separate, = torch.autograd.grad(sum(o.square().sum() for o in separate), x)
    torch.testing.assert_close(g_shared, g_separate, rtol=1e-13, atol=1e-14)


def test_a_replaced_relu_is_not_shared():
    """A candidate whose leading ReLU was swapped for another module (here a Tanh, as a smooth test network does)
    runs that module: the shared ``relu(x)`` applies only to candidates that still start with a plain ReLU."""
    from torch import nn

    from search_spaces.ops import build_op, outputs_sharing_relu
    torch.manual_seed(0)
    ops = [build_op(name, 4, 2, affine=True).double() for name in ('sep_conv_3x3', 'dil_conv_3x3', 'skip_connect')]
    for op in ops:
        for parent in list(op.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(parent, name, nn.Tanh())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    first = ops[0][0]  # the sep conv's first DilConv: (Tanh), conv, conv, BN; then its second DilConv
    y = torch.tanh(x)
    for layer in list(first)[1:]:
        y = layer(y)
    expected = ops[0][1](y)
    shared = outputs_sharing_relu(ops, x)
    assert not any(getattr(op, 'starts_with_relu', False) for op in ops)
    assert torch.equal(shared[0], expected)  # recomputed layer by layer: tanh first, not relu
    assert all(torch.equal(a, op(x)) for a, op in zip(shared, ops))


def test_architecture_step_leaves_weight_gradients_unset(monkeypatch):
    """The shortcut is taken: after a first-order DARTS step only the weight step wrote weight gradients, and the
    architecture step's backward reached only the alphas (their grads are from the architecture loss)."""
    calls = []
    original = VariantLightningModule.arch_backward_inputs

    def spy(self):
        kwargs = original(self)
        calls.append(len(kwargs.get('inputs', ())))
        return kwargs
    monkeypatch.setattr(VariantLightningModule, 'arch_backward_inputs', spy)
    _search('darts', True, monkeypatch, steps=1)
    assert calls and calls[0] > 0


def test_architecture_step_builds_its_graph_without_the_weights(monkeypatch):
    """Inside the architecture step's forward every network weight is frozen (so no layer saves anything for, or
    computes, a weight gradient) and the alphas are not; afterwards the weights train again."""
    seen = []
    original = VariantLightningModule.architecture_loss

    def spy(self, *args, **kwargs):
        arch = {id(p) for p in self.arch_parameters()}
        seen.append((any(p.requires_grad for p in self.training_module.parameters() if id(p) not in arch),
                     all(p.requires_grad for p in self.arch_parameters())))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(VariantLightningModule, 'architecture_loss', spy)
    _, _, edges = _search('darts', True, monkeypatch, steps=1)
    assert seen and all(s == (False, True) for s in seen)
    weights = [p for e in edges for p in e.parameters() if p.dim() > 1]
    assert weights and all(p.requires_grad for p in weights)


def _image_folder(root, n=12, size=32):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / 'train' / f'class{i % 3}'
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


@pytest.mark.parametrize('image_size', [None, 8])  # 8: a Resize before the random crop and flip
def test_images_decoded_once_give_bitwise_the_same_batches_over_epochs(tmp_path, image_size):
    from nni_darts_variants.data import DecodedImages, build_search_data
    root = _image_folder(tmp_path / 'images')
    batches = {}
    for in_memory in (False, True):
        data = build_search_data('imagefolder', root=str(root), batch_size=4, image_size=image_size,
                                 in_memory=in_memory, seed=3)
        assert isinstance(data.train.dataset.dataset, DecodedImages) == in_memory
        torch.manual_seed(5)  # the augmentation's random state
        batches[in_memory] = [torch.cat([x for x, _ in loader]) for _ in range(3)
                              for loader in (data.train, data.val)]
    assert all(torch.equal(a, b) for a, b in zip(batches[False], batches[True]))
    assert not torch.equal(batches[True][0], batches[True][2])  # a fresh augmentation each epoch


def test_transforms_that_cannot_be_replayed_exactly_stay_as_they_are(tmp_path):
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from nni_darts_variants.data import DecodedImages, decoded_in_memory
    root = _image_folder(tmp_path / 'images')
    resized = ImageFolder(str(root / 'train'), transform=T.Compose([T.RandomResizedCrop(8), T.ToTensor()]))
    assert decoded_in_memory(resized) is resized
    plain = ImageFolder(str(root / 'train'), transform=T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]))
    assert isinstance(decoded_in_memory(plain), DecodedImages)
    assert decoded_in_memory(plain, max_bytes=10_000) is plain  # 12 images of 3,072 bytes do not fit


@pytest.mark.parametrize('bad', [0, -2, 1.5, True, 'two', 'Auto'])
def test_bad_thread_count_is_a_config_error_naming_the_key(bad):
    from nni_darts_variants.config import ConfigError
    from nni_darts_variants.search.config import resolve_config
    with pytest.raises(ConfigError, match='train.threads'):
        resolve_config({'train': {'threads': bad}})


def test_threads_are_applied_and_none_leaves_them():
    from nni_darts_variants.speed import apply_threads
    before = torch.get_num_threads()
    try:
        apply_threads(None)
        assert torch.get_num_threads() == before
        apply_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class _Manager:
    """A stand-in for NNI's manager on 127.0.0.1: ``GET <prefix>/api/v1/nni/experiment`` gives a profile whose
    ``params.trialConcurrency`` is ``concurrency`` (the shape of NNI 3.0's ``/experiment`` answer); it records the
    paths asked for."""

    def __init__(self, concurrency: int, prefix: str = ''):
        import http.server
        import threading
        manager = self
        self.paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                manager.paths.append(self.path)
                if self.path != f'{prefix}/api/v1/nni/experiment':
                    self.send_error(404)
                    return
                body = json.dumps({'id': 'abc', 'params': {'trialConcurrency': concurrency}}).encode()
                self.send_response(200)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
        self.port = self.server.server_address[1]
        self.channel = f'http://127.0.0.1:{self.port}{prefix}/env/envid/trialid'
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def trial_env(monkeypatch):
    """Start a stand-in manager and make this process look like one of its local trials on 4 cores."""
    from nni_darts_variants import speed
    managers = []

    def start(concurrency, prefix='', platform='local'):
        manager = _Manager(concurrency, prefix)
        managers.append(manager)
        monkeypatch.setenv('NNI_PLATFORM', platform)
        monkeypatch.setenv('NNI_TRIAL_COMMAND_CHANNEL', manager.channel)
        return manager
    monkeypatch.setattr(speed, 'cpu_cores', lambda: 4)
    yield start
    for manager in managers:
        manager.close()


@pytest.mark.parametrize('concurrency, prefix, expected', [(2, '', 2), (3, '', 1), (8, '', 1), (2, '/nni', 2),
                                                           (1, '', None)])
def test_auto_threads_divide_the_cores_among_the_concurrent_trials(trial_env, concurrency, prefix, expected):
    from nni_darts_variants.speed import resolve_threads
    manager = trial_env(concurrency, prefix)
    for threads in (None, 'auto'):
        assert resolve_threads(threads, 'cpu') == expected
    assert manager.paths == [f'{prefix}/api/v1/nni/experiment'] * 2
    assert resolve_threads(3, 'cpu') == 3  # a number is kept


def test_auto_threads_leave_torch_alone_off_cpu_outside_trials_and_off_local(trial_env, monkeypatch):
    from nni_darts_variants.speed import resolve_threads
    manager = trial_env(2)
    assert resolve_threads(None, 'gpu') is None
    monkeypatch.setenv('NNI_PLATFORM', 'remote')  # the other trials run on other machines
    assert resolve_threads(None, 'cpu') is None
    monkeypatch.delenv('NNI_PLATFORM')
    monkeypatch.delenv('NNI_TRIAL_COMMAND_CHANNEL')
    assert resolve_threads(None, 'cpu') is None
    assert manager.paths == []


def test_auto_threads_warn_and_leave_torch_alone_when_the_manager_does_not_answer(trial_env, monkeypatch, caplog):
    from nni_darts_variants.speed import resolve_threads
    manager = trial_env(2)
    manager.close()
    with caplog.at_level('WARNING', logger='nni_darts_variants.speed'):
        assert resolve_threads('auto', 'cpu') is None
    assert 'trialConcurrency' in caplog.text and 'train.threads' in caplog.text


def test_apply_threads_sets_the_divided_count(trial_env):
    from nni_darts_variants.speed import apply_threads
    trial_env(4)
    before = torch.get_num_threads()
    try:
        assert apply_threads(None, 'cpu') == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_compile_keeps_the_module_names_and_the_forward():
    from nni_darts_variants.speed import compile_supernet
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.randn(4, 3)
    expected = net(x)
    compiled = compile_supernet(net)
    assert compiled is net and list(net.state_dict()) == ['0.weight', '0.bias']
    torch.testing.assert_close(net(x), expected)


TRIAL = '''import os, sys
sys.path.insert(0, {repo!r})
import nni
from nni_darts_variants.speed import apply_threads
nni.get_next_parameter()
nni.report_final_result({{'default': 0.0, 'threads': apply_threads(None, 'cpu') or 0,
                         'platform': os.environ.get('NNI_PLATFORM')}})
'''


@pytest.mark.slow
def test_real_nnictl_trials_read_the_concurrency_from_their_manager(tmp_path):
    """Two trials of a real local experiment with trialConcurrency 2: each sets cores // 2 threads (at least 1)."""
    import os
    from pathlib import Path

    import yaml
    from test_nnictl import NNICTL, REPO, _metric, run_experiment
    if not NNICTL.is_file():
        pytest.skip('nnictl is not installed next to this Python')
    trial = tmp_path / 'trial.py'
    trial.write_text(TRIAL.format(repo=str(REPO)))
    config = tmp_path / 'exp.yml'
    config.write_text(yaml.safe_dump({
        'experimentName': 'threads', 'searchSpace': {'x': {'_type': 'choice', '_value': [1, 2]}},
        'trialCommand': f'python3 {trial}', 'trialCodeDirectory': str(REPO), 'trialConcurrency': 2,
        'trialGpuNumber': 0, 'maxTrialNumber': 2, 'tuner': {'name': 'GridSearch'},
        'trainingService': {'platform': 'local'}}))
    result = run_experiment(Path(config), tmp_path)
    finals = [_metric(m) for m in result['metrics'] if m['type'] == 'FINAL']
    assert [t['status'] for t in result['trials']] == ['SUCCEEDED'] * 2, result
    expected = max(1, len(os.sched_getaffinity(0)) // 2)
    assert [(f['threads'], f['platform']) for f in finals] == [(expected, 'local')] * 2
