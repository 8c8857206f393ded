"""A full disk (or a read-only folder, or no permission) at every kind of save point: one
line that names the file, says what is intact and how to go on, exit code 1, and nothing lost
or half-written. The write fails through the fault seam (minigpt_cli/faults.py,
MINIGPT_FAIL_AT), at the same points the crash tests kill the process."""

from __future__ import annotations

import errno
import json
import os
import queue
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from minigpt_cli.faults import ERRNO_ENV, FAIL_ENV
from minigpt_cli.model import store
from minigpt_cli.training import run_state
from tests.conftest import make_text, tiny_raw
from tests.forks import Forks, completed, pool

# (where the write fails, the errno, what the line must say is intact)
TRAIN_POINTS = [
    ("train_state-*.safetensors:partial", "ENOSPC", "nothing of this run was saved yet"),
    ("train_state.json:partial@2", "ENOSPC", "(step 5)"),
    ("model.safetensors:partial@2", "EROFS", "(step 10)"),
    ("best.safetensors:synced", "EACCES", "(step 5)"),  # written before step 10's save
    ("metrics.jsonl:append@2", "ENOSPC", "(step 5)"),
]


@pytest.fixture(scope="module")
def forks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[queue.Queue[Forks]]:
    """Two fork servers (tests/forks.py), each command taking whichever is free."""
    env = {k: v for k, v in os.environ.items() if k not in (FAIL_ENV, ERRNO_ENV)}
    with pool(tmp_path_factory.mktemp("forks"), env) as free:
        yield free


def _minigpt(forks: queue.Queue[Forks], args: list[str], cwd: Path, point: str | None = None,
             code: str = "ENOSPC") -> subprocess.CompletedProcess:
    """`minigpt ARGS` in cwd, its writes failing at `point` with `code`, as its own process."""
    env = {**os.environ, "MINIGPT_DATA_DIR": str(cwd / "data")}
    env.pop(FAIL_ENV, None)
    if point:
        env.update({FAIL_ENV: point, ERRNO_ENV: code})
    return completed(forks, args, cwd, env)


def _one_line(p: subprocess.CompletedProcess, *says: str) -> str:
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr
    assert all(s in errors[0] for s in says), errors[0]
    return errors[0]


def _fail_training(forks: queue.Queue[Forks], point: str, code: str, root: Path
                   ) -> subprocess.CompletedProcess:
    root.mkdir(parents=True)
    (root / "corpus.txt").write_text(make_text())
    (root / "cfg.yaml").write_text(yaml.safe_dump(tiny_raw(root / "corpus.txt", root / "run")))
    return _minigpt(forks, ["train", "cfg.yaml"], root, point, code)


@pytest.fixture(scope="module")
def failed(tmp_path_factory: pytest.TempPathFactory, forks: queue.Queue[Forks]
           ) -> dict[str, tuple[Path, object]]:
    base = tmp_path_factory.mktemp("full")
    with ThreadPoolExecutor(2) as pool:
        futures = {p: (base / f"case{i}",
                       pool.submit(_fail_training, forks, p, code, base / f"case{i}"))
                   for i, (p, code, _) in enumerate(TRAIN_POINTS)}
        return {p: (root, f.result()) for p, (root, f) in futures.items()}


@pytest.mark.parametrize(("point", "code", "intact"), TRAIN_POINTS)
def test_a_failed_save_is_one_line_and_loses_nothing(point: str, code: str, intact: str,
                                                     failed, forks) -> None:
    root, p = failed[point]
    run = root / "run"
    name = point.split(":")[0].replace("train_state-*", "train_state-")
    line = _one_line(p, "could not write", os.strerror(getattr(errno, code)),
                     intact)
    assert name.split("-")[0] in line
    assert not list(run.glob(".*.tmp")), "a temporary file was left behind"
    state = run_state.read_state_json(run)
    if state is None:
        assert "start again" in line
        assert not list(run.glob("train_state-*")), "an uncommitted weights file was left"
    else:
        assert "--resume" in line
        assert sorted(p.name for p in run.glob("train_state-*")) == [state["weights_file"]]
        store.load_safetensors(run / state["weights_file"])  # whole, and loads
    # And the user's next command, as the line says, finishes the run.
    again = _minigpt(forks, ["train", "cfg.yaml"] + (["--resume"] if state else []), root)
    assert again.returncode == 0, again.stderr
    assert run_state.saved_step(run / store.MODEL_FILE) == 20
    assert [json.loads(x)["step"] for x in (run / run_state.METRICS_FILE).read_text().splitlines()
            if "val_loss" in x] == [10, 20]


def test_other_commands_say_which_file(failed, forks) -> None:
    """export-hf, quantize, eval --json and the data cache: the same one line, exit 1."""
    root = failed["train_state-*.safetensors:partial"][0]  # finished by the test above, or now
    if run_state.saved_step(root / "run" / store.MODEL_FILE) != 20:
        assert _minigpt(forks, ["train", "cfg.yaml"], root).returncode == 0
    _one_line(_minigpt(forks, ["export-hf", "run", "hf"], root, "config.json:partial"),
              "config.json")
    _one_line(_minigpt(forks, ["quantize", "run", "q"], root, "model.safetensors:synced"),
              "model.safetensors")
    _one_line(_minigpt(forks, ["eval", "--checkpoint", "run", "--data", "corpus.txt", "--json",
                               "e.json"], root, "e.json:partial", "EROFS"), "e.json",
              "Read-only file system")
    assert not (root / "e.json").exists()
    cfg = yaml.safe_load((root / "cfg.yaml").read_text())
    cfg["out_dir"] = str(root / "run2")
    (root / "cfg2.yaml").write_text(yaml.safe_dump(cfg))
    (root / "corpus.txt").write_text(make_text(seed=1))  # new text: a new data cache entry
    _one_line(_minigpt(forks, ["train", "cfg2.yaml"], root, "train.bin:partial"), "train.bin",
              "nothing of this run was saved yet")
