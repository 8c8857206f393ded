"""CLI processes without importing torch for each: a fork server.

A test that runs `minigpt` many times in child processes spends most of its time importing
torch afresh in each (~1.4 s). A fork server imports torch and minigpt once, then forks a child
per command: the child takes the command's argv, cwd and environment, runs the CLI's entry
point (minigpt_cli.cli.main, what the `minigpt` script calls), and its exit code (negative: the
signal that ended it), stdout and stderr are what a test checks. The server runs no torch
operation before forking, so no thread pool is copied half-alive; its thread count is the
environment's it started with (OMP_NUM_THREADS), as a fresh process's would be.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORK_SERVER = r"""
import json, os, signal, sys
import torch  # noqa: F401
import minigpt_cli.cli as cli
for module in ("inference.generate_cli", "training.loop", "evaluation.eval_cli", "bench.run",
               "convert.hf", "inference.serve.server"):
    __import__(f"minigpt_cli.{module}")
for line in sys.stdin:
    spec = json.loads(line)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.chdir(spec["cwd"])
        os.environ.clear()
        os.environ.update(spec["env"])
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY),
                               (1, spec["stdout"], os.O_WRONLY | os.O_CREAT),
                               (2, spec["stderr"], os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(path, mode, 0o600), fd)
        sys.argv = ["minigpt", *spec["args"]]
        signal.alarm(spec["timeout"])  # a command still running then (a server) ends here
        code = 1
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


class Forks:
    """One fork server: run(args, cwd, env) -> (exit code or None if killed, stdout, stderr)."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp  # where each command's stdout and stderr go
        tmp.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.n = 0

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: int = 60
            ) -> tuple[int | None, str, str]:
        self.n += 1
        out, err = self.tmp / f"{self.n}.out", self.tmp / f"{self.n}.err"
        spec = {"args": args, "cwd": str(cwd), "env": env, "stdout": str(out),
                "stderr": str(err), "timeout": timeout}
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())
        text = (out.read_text(errors="replace"), err.read_text(errors="replace"))
        return (None if code == -signal.SIGALRM else code), *text

    def completed(self, args: list[str], cwd: Path, env: dict[str, str], timeout: int = 180
                  ) -> subprocess.CompletedProcess:
        """run() as subprocess.run(..., capture_output=True, text=True) reports it (a child
        still running at `timeout` is killed and reported as exit code None)."""
        code, out, err = self.run(args, cwd, env, timeout)
        return subprocess.CompletedProcess(["minigpt", *args], code, out, err)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@contextmanager
def pool(base: Path, env: dict[str, str], n: int = 2) -> Iterator[queue.Queue[Forks]]:
    """n fork servers started with `env`, handed out by `completed` to whichever is free (n
    commands at a time, from as many threads), closed at the end."""
    servers = [Forks(base / f"io{k}", env) for k in range(n)]
    free: queue.Queue[Forks] = queue.Queue()
    for server in servers:
        free.put(server)
    try:
        yield free
    finally:
        for server in servers:
            server.close()


def completed(free: queue.Queue[Forks], args: list[str], cwd: Path, env: dict[str, str],
              timeout: int = 180) -> subprocess.CompletedProcess:
    """Forks.completed on the first free server of a pool."""
    server = free.get()
    try:
        return server.completed(args, cwd, env, timeout)
    finally:
        free.put(server)
