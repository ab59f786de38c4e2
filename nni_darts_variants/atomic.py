"""Whole-or-absent files: write to a temporary file in the same folder, flush and fsync it, then rename it over the
target (``os.replace`` is atomic on POSIX and Windows), and fsync the folder so that the rename survives a crash.

A reader therefore sees the old file or the new one, never a half-written one, whatever kills the writer
(``kill -9``, a full disk, a power cut). A failed write removes its temporary file and leaves the target as it was.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ['atomic_write_bytes', 'atomic_write_text', 'atomic_write_json', 'fsync_dir']

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Seconds to pause half-way through every write: only the fault tests set it, to widen the window in which a
#: ``kill -9`` lands inside a write.
PAUSE_ENV = 'NNI_DARTS_TEST_WRITE_PAUSE'


def _write_all(f: Any, data: bytes) -> None:
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    if pause > 0:
        f.write(data[:len(data) // 2])
        f.flush()
        time.sleep(pause)
        data = data[len(data) // 2:]
    f.write(data)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, keep_previous: str | os.PathLike | None = None) -> None:
    """Replace ``path`` by ``data`` atomically (see the module docstring); an ``OSError`` leaves ``path`` untouched.

    With ``keep_previous``, the old ``path`` (if any) is first renamed to ``keep_previous``, once the new data is
    safely on disk: at every moment ``path`` or ``keep_previous`` holds a whole file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; a plain open() would not
        with os.fdopen(fd, 'wb') as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    """:func:`atomic_write_bytes` of ``data`` as JSON (with a final newline)."""
    atomic_write_text(path, json.dumps(data, indent=indent) + '\n')
