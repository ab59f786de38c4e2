"""One GPU check (a lent H200, under 10 minutes): step time and ``max_memory_allocated`` of every bench row at batch
64 and 256 in fp32, bf16 and fp32 channels_last; our DARTS against NNI's DARTS; the largest batch in 40 GB per row.

Usage (on the GPU machine):  python benchmarks/gpu_check.py --out $OUT/gpu.json [--budget-s 480] [--pytest]
Test it here on CPU:          python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu.json

Sections run in that order and each row is written to the JSON as soon as it is measured; a section that would
start after ``--budget-s`` seconds is skipped (and listed as skipped), so the script never overruns its slot. The
largest batch reuses the fp32 measurements at the two batches as the probes of the affine memory model
(:func:`nni_darts_variants.max_batch.find_max_batch`), then verifies the solved batch once. ``--pytest`` then runs
the ``gpu``-marked tests.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace

import torch

SECTIONS = (('fp32', {'dtype': 'float32'}), ('bf16', {'dtype': 'bfloat16'}),
            ('channels_last', {'dtype': 'float32', 'channels_last': True}))


def main(argv=None) -> int:
    from nni_darts_variants import bench, bench_cli
    from nni_darts_variants.max_batch import find_max_batch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--out', required=True)
    parser.add_argument('--budget-s', type=float, default=480.0, help='no section starts after this (480)')
    parser.add_argument('--memory-gb', type=float, default=40.0, help='budget of the largest-batch search (40)')
    parser.add_argument('--strategies', nargs='+', help='rows (default: all)')
    parser.add_argument('--tiny', action='store_true', help='tiny network and batches (to test the script on CPU)')
    parser.add_argument('--pytest', action='store_true', help='then run the gpu-marked tests')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    batches = (2, 4) if args.tiny else (64, 256)
    size = dict(width=4, num_cells=3, image_size=8) if args.tiny else {}
    base = bench.BenchConfig(strategies=args.strategies, device=args.device, steps=2, warmup=1, prime=False,
                             **size).check()
    rows = bench._select(base.strategies)
    report = {'device': torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu', 'torch': torch.__version__,
              'batches': batches, 'sections': {}, 'max_batch': {}, 'skipped': []}

    def save() -> None:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=1)

    fp32: dict[tuple[str, int], dict] = {}
    plan = [(name, overrides, b) for name, overrides in SECTIONS[:1] for b in batches] + ['max_batch'] + \
           [(name, overrides, b) for name, overrides in SECTIONS[1:] for b in batches]
    for item in plan:
        if time.perf_counter() - start > args.budget_s:
            report['skipped'].append(item if isinstance(item, str) else f'{item[0]} batch {item[2]}')
            continue
        if item == 'max_batch':
            budget = int(args.memory_gb * 2 ** 30) if not args.tiny else 3 * fp32[(rows[0], batches[1])].get(
                'activation_bytes', 1)
            cfg = replace(base, probe_batches=batches)
            for row in rows:
                report['max_batch'][row] = find_max_batch(
                    row, cfg, budget, measure=lambda r, c, b: fp32[(r, b)] if (r, b) in fp32 else
                    bench.measure_row(r, c, b))
                print(f'max batch {row}: {report["max_batch"][row].get("max_batch")}', flush=True)
                save()
            continue
        name, overrides, batch = item
        cfg = replace(base, batch_size=batch, **overrides)
        measured = []
        for row in rows:
            measured.append(bench.measure_row(row, cfg))
            if name == 'fp32':
                fp32[(row, batch)] = measured[-1]
            print(f'{name} b{batch} ' + bench_cli.progress_line(len(measured), len(rows), measured[-1]), flush=True)
        report['sections'][f'{name} batch {batch}'] = bench.add_ratios(measured)
        print(bench_cli.format_table(measured, cfg), flush=True)
        save()
    report['seconds'] = round(time.perf_counter() - start, 1)
    save()
    if args.pytest:
        code = subprocess.call([sys.executable, '-m', 'pytest', '-q', '-m', 'gpu', 'tests/'])
        report['pytest_gpu_exit'] = code
        save()
    print(f'gpu check done in {report["seconds"]} s; skipped: {report["skipped"] or "nothing"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
