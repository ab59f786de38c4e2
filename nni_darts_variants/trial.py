"""The ``nnictl`` trial: one complete one-shot search, reported to NNI's manager and web UI.

An experiment config (``experiments/cifar10/*.yml``) runs, for every trial::

    python3 -m nni_darts_variants.trial --config experiments/cifar10/search/pcdarts.yml [--set key=value ...]

The trial reads its hyper-parameters with ``nni.get_next_parameter()``: a mapping of dotted config keys to values,
drawn by the tuner from the experiment's ``searchSpace`` (e.g. ``{"strategy.args.partial_channels_k": 4}``). They
are applied after the recipe and the ``--set`` overrides, the search runs (:func:`~nni_darts_variants.search.
run_search`), and

* after every epoch, ``nni.report_intermediate_result`` gets ``{'default': supernet accuracy on the architecture
  half, 'epoch', 'epoch_seconds', 'train_loss', 'train_acc', 'arch_loss'}`` (the losses when logged);
* at the end, ``nni.report_final_result`` gets ``{'default': ..., 'supernet_val_acc': the last epoch's supernet
  accuracy, 'genotype': the found cell as text, 'search_seconds', ...}``. ``default``, what NNI's web UI ranks the
  trials by, is the retrained test accuracy ``test_acc`` when the recipe retrains the cell (``evaluate.epochs >
  0``), the table's CIFAR-10 test accuracy on NAS-Bench-201, and otherwise the supernet accuracy.

The terminal (``trial.log``) shows this package's lines; NNI's and Lightning's known-harmless warnings are dropped
unless ``--verbose`` (:func:`~nni_darts_variants.logs.configure_logging`). With ``train.logger: tensorboard`` the
search writes its TensorBoard events to ``$NNI_OUTPUT_DIR/tensorboard``, which the web UI's TensorBoard button
opens.

The run folder (genotype.json, sample.json, alphas, metrics) is ``$NNI_OUTPUT_DIR/search`` inside an NNI trial,
or ``--output`` / the recipe's ``output.dir`` / ``runs/...`` outside one. A search that fails raises, so the trial
exits non-zero and NNI marks it FAILED. ``nnictl stop`` sends the trial SIGTERM: the step in progress finishes, a
checkpoint is written, the trial exits with 143, and a trial started again on that folder resumes it. Outside NNI (no tuner), ``get_next_parameter()`` gives nothing and the
trial is a plain search, which makes this module easy to try by hand.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ['main', 'build_parser', 'apply_parameters', 'NniReporter', 'final_metrics', 'trial_output_dir']

_logger = logging.getLogger('nni_darts_variants.trial')  # also when run as __main__

#: Per-epoch metrics forwarded to NNI besides the ``default`` one.
INTERMEDIATE_KEYS = ('epoch', 'epoch_seconds', 'train_loss', 'train_acc', 'arch_loss')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m nni_darts_variants.trial',
                                     description='One NNI trial: a one-shot search whose config keys come from the '
                                                 'tuner (dotted keys such as strategy.args.partial_channels_k).')
    parser.add_argument('--config', required=True, help='search recipe YAML (e.g. experiments/cifar10/search/*.yml)')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a recipe value before the tuner parameters are applied')
    parser.add_argument('--output', '-o', help='run folder (default: $NNI_OUTPUT_DIR/search inside an NNI trial)')
    parser.add_argument('--verbose', '-v', action='store_true', help="keep NNI's and Lightning's log lines")
    return parser


def apply_parameters(config: Mapping[str, Any], parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Set each dotted key of the tuner's ``parameters`` in a copy of ``config`` (values are kept as given).

    A key that does not name a config value is left for :func:`~nni_darts_variants.search.resolve_config` to
    reject with the valid keys listed.
    """
    from .config import merge, set_dotted
    result = merge(config, {})
    for key, value in (parameters or {}).items():
        set_dotted(result, key, value, where='search space key')
    return result


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class NniReporter:
    """Sends this trial's metrics to NNI through the trial's own command channel, captured at construction.

    NNI 3.0's ``NasExperiment`` (its sequential engine, used by one-shot strategies) swaps the default trial command
    channel while the supernet trains and calls ``nni.get_next_parameter()`` itself, so ``nni.report_*`` called from
    inside the search would reach that inner engine, not the manager (no intermediate results in the web UI), and
    the module-level parameter record is overwritten. Build the reporter after ``nni.get_next_parameter()`` and
    before the search: it keeps the outer channel, parameter id and trial id, and sends what ``nni.report_*``
    would. As a search listener it reports each epoch's supernet accuracy as an intermediate result.
    """

    def __init__(self) -> None:
        import nni.trial
        from nni.runtime.env_vars import trial_env_vars
        from nni.runtime.trial_command_channel import get_default_trial_command_channel
        self.channel = get_default_trial_command_channel()
        self.record = nni.trial._params  # noqa: SLF001 - restored after the search (see the class docstring)
        self.parameter_id = self.record['parameter_id'] if self.record else None
        self.trial_job_id = trial_env_vars.NNI_TRIAL_JOB_ID
        self.reports: list[dict[str, Any]] = []

    def __call__(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        accuracy = _number(metrics.get('supernet_val_acc'))
        report: dict[str, Any] = {'default': accuracy if accuracy is not None else 0.0}
        for key in INTERMEDIATE_KEYS:
            value = _number(metrics.get(key))
            if value is not None:
                report[key] = int(value) if key == 'epoch' else value
        self._send('PERIODICAL', len(self.reports), report)
        self.reports.append(report)

    def final(self, metric: Mapping[str, Any]) -> None:
        """Report the final result (and put back NNI's record of this trial's parameters)."""
        import nni.trial
        nni.trial._params = self.record  # noqa: SLF001
        self._send('FINAL', 0, dict(metric))

    def _send(self, kind: str, sequence: int, value: dict[str, Any]) -> None:
        try:
            self.channel.send_metric(type=kind, parameter_id=self.parameter_id, trial_job_id=self.trial_job_id,
                                     sequence=sequence, value=value)
        except OSError as err:  # the manager is gone (``nnictl stop`` closes it before it signals the trial)
            _logger.warning('could not report the %s metric to the NNI manager (%s); the search goes on, its '
                            'results are in its run folder', kind, type(err).__name__)


def final_metrics(result: Any) -> dict[str, Any]:
    """The final NNI metric of a finished search: ``default`` (what the web UI ranks by), the last supernet accuracy
    as ``supernet_val_acc``, the genotype (or sample) as text.

    ``default`` is the retrained test accuracy when the search retrained the cell (``metrics['evaluate']``,
    ``evaluate.epochs > 0``); on NAS-Bench-201 (``metrics['nb201']`` holds a table accuracy) it is that accuracy;
    otherwise the supernet accuracy.
    """
    metrics = result.metrics
    accuracy = _number(metrics.get('supernet_val_acc'))
    architecture = str(result.genotype) if result.genotype is not None else json.dumps(result.sample, sort_keys=True)
    final: dict[str, Any] = {'default': accuracy if accuracy is not None else 0.0, 'supernet_val_acc': accuracy,
                             'genotype': architecture, 'search_seconds': metrics.get('search_seconds'),
                             'run_dir': str(result.run_dir)}
    evaluation = metrics.get('evaluate') or {}
    for key in ('test_acc', 'params'):
        if key in evaluation:
            final[key] = evaluation[key]
    if _number(evaluation.get('test_acc')) is not None:  # the cell trained from scratch: what the user wants ranked
        final['default'] = _number(evaluation['test_acc'])
    nb201 = metrics.get('nb201') or {}
    if nb201.get('cifar10_test') is not None:  # NAS-Bench-201: the web UI ranks the trials by the table accuracy
        final.update(default=nb201['cifar10_test'], nb201_arch=nb201['arch'])
    return final


def trial_output_dir(output: str | None) -> Path | None:
    """``--output`` if given, else ``$NNI_OUTPUT_DIR/search`` inside an NNI trial, else ``None`` (recipe/default)."""
    if output:
        return Path(output)
    nni_dir = os.environ.get('NNI_OUTPUT_DIR')
    return Path(nni_dir) / 'search' if nni_dir else None


def run_trial(config_path: str, overrides: Sequence[str] = (), output: str | None = None) -> dict[str, Any]:
    """Run one trial and return the final metric it reported."""
    import nni

    from .config import apply_overrides, load_yaml
    from .search import run_search

    parameters = nni.get_next_parameter() or {}
    _logger.info('trial parameters from the tuner: %s', parameters)
    config = apply_parameters(apply_overrides(load_yaml(config_path), overrides), parameters)
    reporter = NniReporter()
    run_dir = trial_output_dir(output)
    # A trial restarted on the folder of an interrupted search (stopped by nnictl stop, i.e. SIGTERM, or killed)
    # continues it from its newest loadable checkpoint.
    interrupted = run_dir is not None and (run_dir / 'config.yaml').exists() \
        and not (run_dir / 'result.json').exists()
    if interrupted:
        _logger.info('resuming the interrupted search in %s', run_dir)
    result = run_search(config, output=run_dir, listeners=[reporter], resume=run_dir if interrupted else None)
    final = final_metrics(result)
    reporter.final(final)
    _logger.info('final result: %s', final)
    return final


def _configure_logging(verbose: bool) -> None:
    """:func:`~nni_darts_variants.logs.configure_logging`: quiet NNI and Lightning unless ``verbose``. Inside an
    NNI trial, NNI's own root handler writes this package's lines into ``trial.log`` (once; the package's stderr
    handler goes to the trial's ``stderr`` file); run by hand, they appear on stderr."""
    from .logs import configure_logging
    configure_logging(verbose=verbose)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from .search.interrupt import SearchInterrupted
    try:
        run_trial(args.config, args.overrides, args.output)
    except SearchInterrupted as stop:  # nnictl stop sends SIGTERM: the checkpoint is written, the folder resumable
        _logger.warning('%s', stop)
        return stop.exit_code
    except Exception:  # noqa: BLE001 - any failure must fail the trial, with its traceback in trial.log
        _logger.exception('the search failed; the trial exits with status 1 so that NNI marks it FAILED')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
