"""Checks that an output location is writable, run before any model loads.

A read-only folder, a path that is a file or a full disk should stop a run at once, naming the flag,
not after hours of training or a long model load.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from musubi_tuner.errors import UserError


class OutputLocationError(UserError):
    """An output folder or file that cannot be written (names the flag)."""


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only folder?)"
    return exc.strerror or str(exc)


def describe_os_error(exc: OSError) -> str:
    """A short reason for a failed write, e.g. "no space left on device"."""
    return _reason(exc)


def check_output_dir(folder: str | os.PathLike, flag: str) -> Path:
    """Create `folder` if needed and prove it is writable (a probe file is written and removed)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputLocationError(f"{flag} {folder}: this is a file, not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".musubi-write-probe.", dir=folder)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputLocationError(f"{flag} {folder}: cannot write there ({_reason(exc)}); "
                                  "choose a writable folder") from None
    return folder


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """`path` will be written as a file: it must not be a folder, and its folder must be writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputLocationError(f"{flag} {path}: this is a folder; give a file path")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag)
    return path
