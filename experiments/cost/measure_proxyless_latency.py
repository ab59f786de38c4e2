"""End-to-end check of the latency cost on the CPU (issue #15): ProxylessNAS on the ProxylessNAS space, small input.

Two short searches from the same seed, without and with a latency target; the exported networks and the cheapest
one are then timed in interleaved rounds (median of the rounds' medians, one thread, batch 1), next to their
expected latency from the table. The target is chosen inside the measured range before the constrained search:
``fraction`` of the way from the cheapest network's latency to the latency the unconstrained search exported (both
timed together). Prints one JSON object, with the load average at the start and the end (a shared machine).

    python experiments/cost/measure_proxyless_latency.py [--epochs 6] [--fraction 0.5] [--form add#linear --lambda 50]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--fraction', type=float, default=0.5)
    parser.add_argument('--width', type=float, default=0.35)
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--arc-learning-rate', type=float, default=0.01)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--calibration', type=int, default=10, help='whole networks that calibrate the table')
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help="'cpu': the thread's CPU time, for a machine shared with other jobs")
    parser.add_argument('--form', choices=('mul#log', 'add#linear'), default='mul#log')
    parser.add_argument('--lambda', dest='lambda_', type=float, default=0.1, help='of add#linear (official 0.1)')
    parser.add_argument('--beta', type=float, default=0.3, help='of mul#log (official 0.3)')
    args = parser.parse_args()
    logging.getLogger('nni').setLevel(logging.ERROR)
    logging.getLogger('pytorch_lightning').setLevel(logging.ERROR)
    torch.set_num_threads(1)

    from nni_darts_variants.cost import build_cost_table, measure_latency
    from nni_darts_variants.registry import create_strategy
    from nni_darts_variants.testing import run_tiny_search, tiny_loaders
    from search_spaces import ProxylessSpace

    def space() -> ProxylessSpace:
        return ProxylessSpace(dataset='cifar10', width_multiplier=args.width)

    x = torch.randn(1, 3, args.size, args.size)
    loaders = tiny_loaders(n=64, batch_size=16, channels=3, size=args.size)
    cache = tempfile.mkdtemp(prefix='latency-')
    options = dict(warmup=10, repeats=args.repeats, threads=1, clock=args.clock)
    table = build_cost_table(space(), x, 'latency', cache_dir=cache, calibration=args.calibration, **options)

    def timed_together(samples: dict[str, dict], rounds: int = 6) -> dict[str, float]:
        """Median latency of each network over ``rounds`` interleaved rounds (the load changes for all alike)."""
        nets = {name: space().freeze(sample) for name, sample in samples.items()}
        times: dict[str, list[float]] = {name: [] for name in nets}
        for _ in range(rounds):
            for name, net in nets.items():
                times[name].append(measure_latency(net, x, warmup=2, repeats=max(args.repeats // rounds, 1),
                                                   threads=1, clock=args.clock))
        return {name: statistics.median(v) for name, v in times.items()}

    def search(cost: dict | None) -> dict:
        strategy = create_strategy('proxyless', arch_update_every=1, arc_learning_rate=args.arc_learning_rate,
                                   cost=cost and {**cost, 'cache_dir': cache, 'repeats': args.repeats,
                                                  'clock': args.clock, 'calibration': args.calibration})
        return run_tiny_search(strategy, space=space(), max_epochs=args.epochs, seed=args.seed,
                               loaders=loaders).sample

    load = [os.getloadavg()[0]]
    samples = {'cheapest': table.cheapest(), 'unconstrained': search(None)}
    before = timed_together(samples)
    target = before['cheapest'] + args.fraction * (before['unconstrained'] - before['cheapest'])
    weight = {'lambda': args.lambda_} if args.form == 'add#linear' else {'beta': args.beta}
    samples['constrained'] = search({'metric': 'latency', 'target_ms': max(target, 1.01), 'form': args.form,
                                     **weight})
    measured = timed_together(samples)
    load.append(os.getloadavg()[0])
    report = {
        'input': list(x.shape), 'width_multiplier': args.width, 'epochs': args.epochs, 'repeats': args.repeats,
        'threads': 1, 'clock': args.clock, 'calibration': args.calibration, 'arc_learning_rate': args.arc_learning_rate,
        'form': args.form, **weight, 'load_average_start_end': load, 'target_ms': round(target, 3),
        'target_from': {name: round(v, 3) for name, v in before.items()}}
    for name, sample in samples.items():
        report[name] = {'measured_ms': round(measured[name], 3), 'expected_ms': round(table.of_sample(sample), 3),
                        'sample': sample}
    report['constrained_meets_target_within_10pct'] = measured['constrained'] <= 1.1 * target
    report['unconstrained_misses_target'] = measured['unconstrained'] > 1.1 * target
    print(json.dumps(report, indent=1))


if __name__ == '__main__':
    main()
