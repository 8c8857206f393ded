"""Helpers for tests that run `minigpt serve` as a real process on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_text, tiny_raw

ROOT = Path(__file__).resolve().parents[2]


def train_run(root: Path, block_size: int = 64) -> Path:
    """A small byte-level run, trained through the CLI for a few steps (~3 s)."""
    (root / "corpus.txt").write_text(make_text())
    raw = tiny_raw(root / "corpus.txt", root / "runs" / "tiny", max_steps=20)
    raw["model"]["block_size"] = block_size
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "MINIGPT_DATA_DIR": str(root / "data")}
    p = subprocess.run([sys.executable, "-m", "minigpt_cli", "train", "cfg.yaml"], cwd=root,
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    return root / "runs" / "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: object = None,
                headers: dict[str, str] | None = None, raw: bytes | None = None,
                timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        h = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        conn.close()
        return out

    def post(self, path: str, body: object, **kw: object) -> tuple[int, dict]:
        status, _, data = self.request("POST", path, body, **kw)  # type: ignore[arg-type]
        return status, json.loads(data)

    def stream(self, body: dict, path: str = "/v1/completions") -> Iterator[dict | str]:
        """Parsed SSE `data:` payloads, as they arrive."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        try:
            for line in r:
                line = line.decode().rstrip("\n")
                if line.startswith("data: "):
                    data = line[6:]
                    yield data if data == "[DONE]" else json.loads(data)
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        _, _, data = self.request("GET", "/metrics")
        for line in data.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@contextmanager
def serving(run_dir: Path, *flags: str, ready: bool = True) -> Iterator[Server]:
    """`minigpt serve` in a child process; stopped (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "serve", "--checkpoint",
                             str(run_dir), "--port", str(port), *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = Server(proc, port)
    try:
        if ready:
            wait_healthy(server)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_healthy(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"server exited: {server.proc.stdout.read()}")  # type: ignore[union-attr]
        try:
            if server.request("GET", "/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail("server did not become healthy")
