"""The first-order search step of the official DARTS code (quark0/darts ``cnn/``), timed as ``nni-darts bench``
times ours: CIFAR-10 search network (C=16, 8 cells), batch 16 for each half, median of 3 steps after 1 warm-up,
CPU. Optionally interleaved with our ``darts`` bench row in the same process (``--with-ours``).

Nothing of theirs is copied here: the script imports ``model_search.py`` and ``architect.py`` from the folder given
on the command line (a checkout's ``cnn/``), with ``.cuda()`` made a no-op. One step is theirs:
``architect.step(..., unrolled=False)`` (zero_grad, validation loss backward, Adam step on the alphas), then the
weight step of ``train_search.py`` (zero_grad, loss, backward, clip the gradient norm at 5, SGD step).

Usage: git clone https://github.com/quark0/darts && python benchmarks/official_darts_step.py darts/cnn [--with-ours]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn


def _stub_cuda() -> None:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self


def official_step_seconds(cnn_dir: str, batch_size: int, warmup: int, steps: int, seed: int = 0
                          ) -> tuple[list[float], list[float]]:
    """Wall and main-thread CPU seconds of each timed first-order step of the official code."""
    _stub_cuda()
    sys.path.insert(0, str(Path(cnn_dir).resolve()))
    from architect import Architect
    from model_search import Network
    torch.manual_seed(seed)
    criterion = nn.CrossEntropyLoss()
    model = Network(16, 10, 8, criterion)
    optimizer = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    args = types.SimpleNamespace(momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4, arch_weight_decay=1e-3)
    architect = Architect(model, args)
    g = torch.Generator().manual_seed(seed)
    x, xs = (torch.randn(batch_size, 3, 32, 32, generator=g) for _ in range(2))
    y, ys = (torch.randint(0, 10, (batch_size,), generator=g) for _ in range(2))
    model.train()
    seconds, cpu_seconds = [], []
    for step in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.thread_time()
        architect.step(x, y, xs, ys, 0.025, optimizer, unrolled=False)
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.thread_time() - cpu_start)
    return seconds, cpu_seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('cnn_dir', help="the official code's cnn/ folder (model_search.py, architect.py, ...)")
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=1, help='with --with-ours: interleaved repeats')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--with-ours', action='store_true', help="interleave our darts bench row (same batch)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    theirs, ours, theirs_cpu, ours_cpu = [], [], [], []
    for _ in range(args.repeats):
        wall, cpu = official_step_seconds(args.cnn_dir, args.batch_size, args.warmup, args.steps)
        theirs, theirs_cpu = theirs + wall, theirs_cpu + cpu
        print(f'official: {1e3 * statistics.median(theirs):.0f} ms', file=sys.stderr, flush=True)
        if args.with_ours:
            from nni_darts_variants import bench
            cfg = bench.BenchConfig(batch_size=args.batch_size, warmup=args.warmup, steps=args.steps, device='cpu',
                                    prime=False).check()
            row = bench.measure_row('darts', cfg)
            ours += row['step_seconds_all']
            ours_cpu.append(row['step_cpu_seconds'])
            print(f'ours: {1e3 * statistics.median(ours):.0f} ms', file=sys.stderr, flush=True)
    line = (f'official DARTS first-order step: {1e3 * statistics.median(theirs):.0f} ms wall, '
            f'{1e3 * statistics.median(theirs_cpu):.0f} ms CPU (median of {len(theirs)})')
    if ours:
        line += (f'; ours: {1e3 * statistics.median(ours):.0f} ms wall, {1e3 * statistics.median(ours_cpu):.0f} ms '
                 f'CPU; ours/official {statistics.median(ours) / statistics.median(theirs):.2f} wall, '
                 f'{statistics.median(ours_cpu) / statistics.median(theirs_cpu):.2f} CPU')
    print(line + f'; batch {args.batch_size}, CPU, {args.threads} thread(s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
