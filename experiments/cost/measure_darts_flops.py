"""End-to-end check of the FLOPs cost (issue #15): a search recipe of ``experiments/cost`` with and without its cost.

Runs the recipe twice through ``run_search`` (the library behind ``nni-darts search``), once as written and once
with ``strategy.args.cost`` removed, and counts the FLOPs of each exported network with NNI's ``FlopsProfiler`` on
the frozen network (the count the cost table uses: multiply-accumulates with batch norm and activations, batch 1).
Prints one JSON object.

    python experiments/cost/measure_darts_flops.py [experiments/cost/darts-flops.yml] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('recipe', nargs='?', default=str(HERE / 'darts-flops.yml'))
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE')
    args = parser.parse_args()
    logging.getLogger('nni').setLevel(logging.ERROR)
    logging.getLogger('pytorch_lightning').setLevel(logging.ERROR)

    from nni.nas.profiler.pytorch.flops import FlopsProfiler

    from nni_darts_variants.cost import build_cost_table
    from nni_darts_variants.data import build_search_data
    from nni_darts_variants.registry import build_space
    from nni_darts_variants.search import resolve_config, run_search

    cfg = resolve_config(args.recipe, args.overrides)
    cost = cfg['strategy']['args'].get('cost')
    if not cost or cost.get('metric') != 'flops':
        raise SystemExit(f'{args.recipe}: strategy.args.cost must be a FLOPs cost ({{metric: flops, ...}})')
    d = cfg['data']
    data = build_search_data(d['name'], root=d['root'], batch_size=d['batch_size'], limit=d['limit'],
                             image_size=d['image_size'], seed=cfg['seed'])
    x = next(iter(data.train))[0][:1]

    def space():
        return build_space(cfg['space']['name'], in_channels=data.in_channels, num_classes=data.num_classes,
                           dataset_hint=d['name'], **cfg['space']['args'])

    def flops_of(sample: dict) -> float:  # NNI's count on the frozen network, two images (batch norm in training)
        return float(FlopsProfiler(space().freeze(sample), torch.cat([x, x])).expression)

    table = build_cost_table(space(), x, 'flops')
    free_cfg = copy.deepcopy(cfg)
    del free_cfg['strategy']['args']['cost']
    out = tempfile.mkdtemp(prefix='darts-flops-')
    free = run_search(free_cfg, output=f'{out}/free').sample
    constrained = run_search(cfg, output=f'{out}/cost').sample
    target = cost['target_mflops'] * 1e6
    report = {'recipe': args.recipe, 'overrides': args.overrides, 'strategy': cfg['strategy']['name'],
              'cost': cost, 'input': list(x.shape), 'epochs': cfg['train']['max_epochs'],
              'target_flops': target}
    for name, sample in (('unconstrained', free), ('constrained', constrained)):
        report[name] = {'flops': flops_of(sample), 'table_flops': table.of_sample(sample), 'sample': sample}
    report['constrained_below_target'] = report['constrained']['flops'] <= target
    report['unconstrained_below_target'] = report['unconstrained']['flops'] <= target
    print(json.dumps(report, indent=1))


if __name__ == '__main__':
    main()
