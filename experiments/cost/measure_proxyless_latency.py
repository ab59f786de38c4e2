"""End-to-end check of the latency cost on the CPU (issue #15): ProxylessNAS on the ProxylessNAS space, small input.

Two short searches from the same seed, without and with a latency target; each exported network is then timed
(median of repeats, fixed thread count, batch 1) next to its expected latency from the table. The target is
chosen inside the measured range: ``fraction`` of the way from the cheapest network's latency to the latency the
unconstrained search exported. Prints one JSON object.

    python experiments/cost/measure_proxyless_latency.py [--epochs 3] [--fraction 0.5]
"""
from __future__ import annotations

import argparse
import json
import logging
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

    def timed(sample: dict) -> float:
        return measure_latency(space().freeze(sample), x, **options)

    def search(cost: dict | None) -> dict:
        strategy = create_strategy('proxyless', arch_update_every=1, arc_learning_rate=args.arc_learning_rate,
                                   cost=cost and {**cost, 'cache_dir': cache, 'repeats': args.repeats,
                                                              'clock': args.clock, 'calibration': args.calibration})
        return run_tiny_search(strategy, space=space(), max_epochs=args.epochs, seed=args.seed,
                               loaders=loaders).sample

    cheapest_ms = timed(table.cheapest())
    free = search(None)
    free_ms = timed(free)
    target = cheapest_ms + args.fraction * (free_ms - cheapest_ms)
    constrained = search({'metric': 'latency', 'target_ms': max(target, 1.01), 'form': 'mul#log'})
    constrained_ms = timed(constrained)
    print(json.dumps({
        'input': list(x.shape), 'width_multiplier': args.width, 'epochs': args.epochs, 'repeats': args.repeats,
        'threads': 1, 'clock': args.clock, 'calibration': args.calibration, 'cheapest_ms': round(cheapest_ms, 3), 'target_ms': round(target, 3),
        'unconstrained': {'measured_ms': round(free_ms, 3), 'expected_ms': round(table.of_sample(free), 3),
                          'sample': free},
        'constrained': {'measured_ms': round(constrained_ms, 3),
                        'expected_ms': round(table.of_sample(constrained), 3), 'sample': constrained},
        'constrained_meets_target_within_10pct': constrained_ms <= 1.1 * target,
        'unconstrained_misses_target': free_ms > 1.1 * target,
    }, indent=1))


if __name__ == '__main__':
    main()
