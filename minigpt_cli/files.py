"""Writing files so that a crash, a full disk or Ctrl-C never leaves half of one: the one
atomic writer every module uses, strict JSON, and the check that an output's folder exists.

A file is written to a temp file in its own folder, fsynced, then renamed over the old one, so a
reader sees the old file or the new one, whole. A write the machine refuses is a one-line
`SaveError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from minigpt_cli.errors import SaveError, UserError
from minigpt_cli.faults import crash_point

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync it, then rename over `path`. A write
    the machine refuses is a one-line SaveError naming `path`, with the old file untouched."""
    path = Path(path)
    try:
        _write_then_rename(path, data)
    except OSError as e:
        raise SaveError(f"could not write {path}: {e.strerror or e}") from None


def _write_then_rename(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp's 0600 would hide files from others
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            crash_point(f"{path.name}:partial")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"{path.name}:synced")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    crash_point(f"{path.name}:renamed")


def commit_temp(tmp: Path, path: Path) -> None:
    """Make a finished temp file (written by a library in `path`'s folder) `path`: the same
    permissions, fsync and rename as atomic_write_bytes gives its own files."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj: Any, **kw: Any) -> str:
    """Strict JSON, which every parser reads: a float that is not finite (a val loss before the
    first evaluation, NaN; the best so far, infinity) is written as null. Python's json would
    write NaN and Infinity, which JavaScript's, Go's and jq's parsers reject."""
    return json.dumps(_finite(obj), allow_nan=False, **kw)


def check_new_folder(path: Path) -> None:
    """The one rule for a command's output folder (import-hf, export-hf, quantize): new, or
    empty. Nothing in a folder that already holds something is ever overwritten."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file, not a folder: name a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"{path} is not empty: name a new or empty folder")


def check_output_paths(**flags: Path | None) -> None:
    """Refuse `--json F` / `--plot F` into a missing folder before any work, not after it."""
    for flag, path in flags.items():
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise UserError(f"--{flag} {path}: the folder {Path(path).parent} does not exist")
