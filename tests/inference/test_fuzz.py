"""schemathesis, an OpenAPI fuzzer no one here wrote, against a real `minigpt serve`.

It reads the published schema (/openapi.json) and sends what the schema allows and what it
does not, then runs every check it has (`--checks all`): no 5xx, every status and content
type documented, every response body as the schema says, requests the schema allows accepted
(but for a prompt over the token limit: schemathesis.toml and tests/inference/fuzz_hooks.py),
requests it forbids refused. Seeded and bounded, so the run is the same each time and takes
~15 s; the server's --max-tokens is small so each request is quick, and the schema says so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.inference.serving import ROOT, serving

EXAMPLES = 80  # per operation (300 on three seeds, by hand, found nothing either)


def test_schemathesis_finds_nothing(served_run: Path) -> None:
    tool = Path(sys.executable).parent / "schemathesis"
    with serving(served_run, "--max-tokens", "8") as server:
        out = subprocess.run(
            [str(tool), "run", f"{server.base}/openapi.json", "--checks", "all",
             "--max-examples", str(EXAMPLES), "--seed", "1", "--no-color"],
            cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert server.proc.poll() is None, "the server died under the fuzzer"
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "No issues found" in out.stdout
