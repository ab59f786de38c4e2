"""Forward and backward of the DARTS search network's dilated depthwise convolutions and max pools on CPU, torch's
own kernels against the rewrites of ``search_spaces.ops`` (``DepthwiseConv2d``, ``MaxPool2d``), per shape.

Usage: python benchmarks/depthwise_backward.py [--batch-size 16] [--threads 1] [--repeats 20] [--channels-last]

Shapes are those of the CIFAR-10 search network (C=16: 16x32x32, 32x16x16, 64x8x8). Each figure is the mean wall
time of ``--repeats`` forward+backward calls after one warm-up, in ms; "input only" is the architecture step's case
(the weight frozen), "both" the weight step's.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def _ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e3 * (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    from search_spaces.ops import DepthwiseConv2d, MaxPool2d
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--channels-last', action='store_true')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for channels, size in [(16, 32), (32, 16), (64, 8)]:
        x = torch.randn(args.batch_size, channels, size, size).contiguous(memory_format=fmt).requires_grad_()
        for kernel, stride in [(3, 1), (5, 1), (3, 2), (5, 2)]:
            conv = DepthwiseConv2d(channels, kernel, stride, padding=kernel - 1, dilation=2).to(memory_format=fmt)
            upstream = torch.randn_like(conv(x))
            row = []
            for frozen in (True, False):
                conv.weight.requires_grad_(not frozen)
                inputs = [x] if frozen else [x, conv.weight]
                for fast in (False, True):
                    DepthwiseConv2d.fast_backward = fast
                    row.append(_ms(lambda: torch.autograd.grad(conv(x), inputs, upstream), args.repeats))
            DepthwiseConv2d.fast_backward = True
            print(f'dil_conv {kernel}x{kernel} stride {stride} at {channels}x{size}x{size}: input only native '
                  f'{row[0]:.2f} rewrite {row[1]:.2f} ms; both native {row[2]:.2f} rewrite {row[3]:.2f} ms', flush=True)
        for stride in (1, 2):
            pool = MaxPool2d(3, stride, 1)
            upstream = torch.randn_like(F.max_pool2d(x, 3, stride, 1))
            native = _ms(lambda: torch.autograd.grad(F.max_pool2d(x, 3, stride, 1), [x], upstream), args.repeats)
            rewrite = _ms(lambda: torch.autograd.grad(pool(x), [x], upstream), args.repeats)
            print(f'max_pool 3x3 stride {stride} at {channels}x{size}x{size}: native {native:.2f} rewrite '
                  f'{rewrite:.2f} ms', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
