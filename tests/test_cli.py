"""The command line: a quiet terminal by default."""
from __future__ import annotations

import logging
import subprocess
import sys

from nni_darts_variants.logs import configure_logging


def test_harmless_nni_warnings_are_dropped_at_their_logger_and_come_back_with_verbose():
    source = logging.getLogger('nni.nas.experiment.config.experiment')
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    source.addHandler(handler)
    try:
        configure_logging(frameworks=False)
        source.warning('`training_service` will be ignored for sequential execution engine.')
        source.warning('something else')
        assert seen == ['something else']
        configure_logging(verbose=True, frameworks=False)
        source.warning('`training_service` will be ignored for sequential execution engine.')
        assert len(seen) == 2
    finally:
        source.removeHandler(handler)
        configure_logging(frameworks=False)


def test_our_handler_is_added_once():
    configure_logging(frameworks=False)
    configure_logging(frameworks=False)
    ours = [h for h in logging.getLogger('nni_darts_variants').handlers if getattr(h, '_nni_darts', False)]
    assert len(ours) == 1


def test_list_does_not_import_nni():
    code = 'import sys; from nni_darts_variants.cli import main; main(["list"]); print("nni" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == 'False'
