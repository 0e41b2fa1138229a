"""The leaf every layer of arqc may import: the version, the one user-facing error type, the message sink of
the driver (:class:`Log`), atomic file writes and the check that a resumed run is the run it continues.
It imports nothing of arqc (tests/test_layers.py enforces it).

Anything raised as ``ArqcError`` is printed by the CLI as a single line on stderr (``arqc: error: <message>``)
and the process exits with status 2. The message says what was wrong and what to do about it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Protocol

__version__ = "0.1.0"


class ArqcError(Exception):
    """A user-facing error with a one-line message that names the problem and the remedy."""


class Log(Protocol):
    """Where the driver's messages go: ``click.echo`` in the CLI (``err=True``: notes for stderr), nothing in
    the Python API unless the caller passes ``print`` or a logger's method."""

    def __call__(self, message: str, err: bool = False) -> None: ...


def quiet(message: str, err: bool = False) -> None:
    """A :class:`Log` that drops every message."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def first_difference(saved: dict, now: dict, keys: Iterable[str] | None = None) -> str | None:
    """The first key (of ``keys``, default: all keys of both) whose value differs between the arguments a run
    saved and this run's, or None when they agree: the one test behind every "refuse to resume with other
    arguments" (certify state files, training resume files, search work directories)."""
    for key in keys if keys is not None else {**saved, **now}:
        if saved.get(key) != now.get(key):
            return key
    return None
