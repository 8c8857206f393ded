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
"""

from __future__ import annotations

import fnmatch
import os
import signal

ENV = "MINIGPT_CRASH_AT"
_seen: dict[str, int] = {}


def crash_point(point: str) -> None:
    """Die here if the environment asks for this point (`NAME:STAGE`) at this occurrence."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    pattern, _, nth = spec.partition("@")
    if not fnmatch.fnmatchcase(point, pattern):
        return
    _seen[pattern] = _seen.get(pattern, 0) + 1
    if _seen[pattern] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
