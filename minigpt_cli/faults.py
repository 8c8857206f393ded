"""Crash injection for the crash-safety tests; a no-op unless MINIGPT_CRASH_AT is set.

`MINIGPT_CRASH_AT="PATTERN:STAGE@N"` kills the process with SIGKILL the N-th time (default 1)
a save reaches STAGE for a file whose name matches the glob PATTERN, e.g.
`train_state.json:renamed@2` or `train_state-*.safetensors:partial`. SIGKILL, not an
exception: no `finally`, no atexit, no buffered write gets a chance to tidy up, which is what a
power cut or the OOM killer leaves behind. Stages, in the order a save passes them:

- `partial`: half the bytes are in the temp file (flushed, not fsynced);
- `synced`: the temp file is complete and fsynced, not yet renamed;
- `renamed`: the file is in place under its final name;
- `state:unlink-previous` (a whole point, no pattern): the new resume state is committed and
  the previous weights file is about to be removed.

`MINIGPT_FAIL_AT`, with the same syntax, makes the write fail there instead, as a full disk
does (`OSError` ENOSPC; `MINIGPT_FAIL_ERRNO=EROFS`, `EACCES`, ... picks another error): what
the user then sees, and what is left on disk, is what the disk-full tests check.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import signal

ENV = "MINIGPT_CRASH_AT"
FAIL_ENV = "MINIGPT_FAIL_AT"
ERRNO_ENV = "MINIGPT_FAIL_ERRNO"
_seen: dict[tuple[str, str], int] = {}


def _due(env: str, point: str) -> bool:
    """Whether the spec in `env` names this point (`NAME:STAGE`) at this occurrence."""
    spec = os.environ.get(env)
    if not spec:
        return False
    pattern, _, nth = spec.partition("@")
    if not fnmatch.fnmatchcase(point, pattern):
        return False
    _seen[env, pattern] = _seen.get((env, pattern), 0) + 1
    return _seen[env, pattern] == int(nth or 1)


def crash_point(point: str) -> None:
    """Die (MINIGPT_CRASH_AT) or fail the write (MINIGPT_FAIL_AT) here, if asked to."""
    if _due(ENV, point):
        os.kill(os.getpid(), signal.SIGKILL)
    if _due(FAIL_ENV, point):
        code = getattr(errno, os.environ.get(ERRNO_ENV, "ENOSPC"))
        raise OSError(code, os.strerror(code))
