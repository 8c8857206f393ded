"""Crash safety, proven the way SQLite proves it: kill the process (SIGKILL) at every step of
the save protocol in turn, then check what a user would see and do next.

Each crash runs `minigpt train` in a child process with MINIGPT_CRASH_AT set (see
minigpt_cli/faults.py). After it dies: `generate`'s loader opens model.safetensors and
best.safetensors or names the problem in one line; `train --resume` (or, where nothing was
committed yet, a plain `train`) finishes the run; and the final weights, best weights and
metric log equal an uninterrupted run's, with no stale or temporary file left behind.

Exactness is claimed per precision, on one machine and one thread count: every point in
float32, and a few in bf16 autocast (whose products reduce in an order that depends on the
thread count, so the children run with the test process's threads).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from minigpt_cli.config import config_from_dict
from minigpt_cli.errors import UserError
from minigpt_cli.faults import ENV
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.model import store
from minigpt_cli.training import run_state
from minigpt_cli.training.loop import train
from tests.conftest import make_text, tiny_raw
from tests.forks import Forks, completed, pool

# tiny_raw: 20 steps, saves at 5, 10, 15 and 20, evaluations (and best.safetensors) at 10, 20.
POINTS = [
    "train_state-*.safetensors:partial",  # first save: nothing committed yet
    "train_state.json:renamed",  # first commit done, model.safetensors not yet written
    "train_state-*.safetensors:partial@2",
    "train_state-*.safetensors:synced@2",
    "train_state-*.safetensors:renamed@2",  # new weights in place, the JSON still the old one
    "train_state.json:partial@2",
    "train_state.json:renamed@2",
    "state:unlink-previous",  # committed; the previous weights file not yet removed
    "model.safetensors:partial@2",
    "model.safetensors:synced@2",
    "model.safetensors:renamed@2",
    "model.safetensors:partial@4",  # the last save: the state says "done", model is behind
    "best.safetensors:partial",
    "best.safetensors:synced",
    "best.safetensors:renamed",
]
# bf16 at a crash in the middle of each commit, and at the last save.
BF16_POINTS = ["train_state-*.safetensors:renamed@2", "train_state.json:partial@2",
               "model.safetensors:partial@4"]
CASES = [(p, "float32") for p in POINTS] + [(p, "bfloat16") for p in BF16_POINTS]


def _raw(root: Path, dtype: str) -> dict:
    return {**tiny_raw(root / "corpus.txt", root / "run"), "dtype": dtype}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return store.load_safetensors(path)[0]


def _crash(forks: queue.Queue[Forks], point: str, dtype: str, root: Path
           ) -> subprocess.CompletedProcess:
    """`minigpt train` in its own process (forked from a server, tests/forks.py), killed at
    `point`."""
    root.mkdir(parents=True)
    (root / "corpus.txt").write_text(make_text())
    (root / "cfg.yaml").write_text(yaml.safe_dump(_raw(root, dtype)))
    return completed(forks, ["train", "cfg.yaml"], root, {**os.environ, ENV: point}, 120)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, tuple[Path, Future]]]:
    """Every crash point's run directory and its child's exit, two children at a time, started
    at once so the tests below resume earlier cases while later ones still run. The children
    run with the test process's thread count (the servers start with it), so bf16's products
    reduce in the same order as the uninterrupted run's here."""
    base = tmp_path_factory.mktemp("crash")
    env = {**{k: v for k, v in os.environ.items() if k != ENV},
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with pool(base, env) as forks, ThreadPoolExecutor(2) as threads:
        cases = {}
        for i, (point, dtype) in enumerate(CASES):
            root = base / f"case{i}"
            cases[point, dtype] = (root, threads.submit(_crash, forks, point, dtype, root))
        yield cases


def _uninterrupted(base: Path, dtype: str) -> Path:
    root = base / dtype
    root.mkdir()
    (root / "corpus.txt").write_text(make_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_DATA_DIR", str(root / "data"))
        train(config_from_dict(_raw(root, dtype)))
    return root / "run"


@pytest.fixture(scope="module")
def straights(tmp_path_factory: pytest.TempPathFactory, crashed) -> dict[str, Path]:
    """The uninterrupted run in each precision."""
    base = tmp_path_factory.mktemp("straight")
    return {dtype: _uninterrupted(base, dtype) for dtype in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def straight(straights: dict[str, Path]) -> Path:
    return straights["float32"]


def _loads_or_names_the_problem(path: Path) -> None:
    """What `minigpt generate --checkpoint PATH` would do: load, or fail in one line."""
    try:
        model, *_ = load_for_inference(str(path), "cpu", "float32")
    except UserError as e:
        assert "\n" not in str(e) and str(e)
    else:
        assert not model.training


@pytest.mark.parametrize(("point", "dtype"), CASES)
def test_crash_then_resume_equals_uninterrupted(point: str, dtype: str, crashed,
                                                straights: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root, child = crashed[point, dtype]
    straight = straights[dtype]
    code = child.result().returncode
    assert code == -signal.SIGKILL, f"the crash point {point} was never reached (exit {code})"
    run = root / "run"
    _loads_or_names_the_problem(run)
    if (run / store.BEST_FILE).exists():
        _loads_or_names_the_problem(run / store.BEST_FILE)

    monkeypatch.setenv("MINIGPT_DATA_DIR", str(root / "data"))
    cfg = config_from_dict(_raw(root, dtype))
    try:
        train(cfg, resume=True)
    except UserError as e:  # nothing was committed: the user drops --resume, as told
        assert "drop --resume" in str(e)
        train(cfg)

    want, got = _tensors(straight / store.MODEL_FILE), _tensors(run / store.MODEL_FILE)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    want_best, got_best = _tensors(straight / store.BEST_FILE), _tensors(run / store.BEST_FILE)
    assert all(torch.equal(want_best[k], got_best[k]) for k in want_best)
    assert run_state.saved_step(run / store.MODEL_FILE) == 20
    assert run_state.read_state_json(run)["dtype"] == dtype
    assert [p.name for p in run.glob("train_state-*.safetensors")] == [
        run_state.read_state_json(run)["weights_file"]]
    assert not list(run.glob(".*.tmp"))
    steps = [json.loads(x)["step"] for x in (run / run_state.METRICS_FILE).read_text().splitlines()
             if "val_loss" in x]
    assert steps == [10, 20]  # the log reads like one unbroken run


def test_the_precisions_train_differently(straights: dict[str, Path]) -> None:
    """The bf16 cases above test bf16: its run is not the float32 one."""
    f32, bf16 = (_tensors(straights[d] / store.MODEL_FILE) for d in ("float32", "bfloat16"))
    assert not all(torch.equal(f32[k], bf16[k]) for k in f32)


# --- a resume state damaged from outside: one line naming the problem, or a clean recovery ---

@pytest.fixture
def finished(straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the uninterrupted run (trained to 20 steps) and its config, for damaging."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "data"))
    raw = tiny_raw(straight.parent / "corpus.txt", run, max_steps=25)
    return run, config_from_dict(raw)


def _state(run: Path) -> dict:
    return json.loads((run / run_state.STATE_JSON).read_text())


@pytest.mark.parametrize(("damage", "message"), [
    (lambda text: text[: len(text) // 2], "is damaged (not a JSON object)"),
    (lambda text: "{}", "no valid 'step'"),
    (lambda text: text.replace('"step": 20', '"step": "20"'), "no valid 'step'"),
    (lambda text: text.replace("train_state-0000020", "../../train_state-0000020"),
     "no valid 'weights_file'"),
    (lambda text: text.replace('"rng"', '"gnr"'), "no 'rng'"),
    (lambda text: text.replace('"step": 20', '"step": 15'), "inconsistent (json step 15"),
    (lambda text: text.replace("0000020", "0000015"), "which is missing"),
])
def test_damaged_state_json_is_one_line(finished, damage, message: str) -> None:
    run, cfg = finished
    path = run / run_state.STATE_JSON
    path.write_text(damage(path.read_text()))
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(UserError) as info:
        train(cfg, resume=True)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert sorted(p.name for p in run.iterdir()) == before  # nothing removed or rewritten


def test_state_naming_weights_of_another_model(finished, tmp_path: Path) -> None:
    run, cfg = finished
    state = _state(run)
    other = torch.nn.Linear(3, 3)
    store.save_safetensors(run / state["weights_file"],
                          {f"model.{k}": v for k, v in other.state_dict().items()},
                          {"step": state["step"]})
    with pytest.raises(UserError, match="does not match its model config"):
        train(cfg, resume=True)


def test_stale_state_files_are_cleared_by_a_resume(finished, straight: Path) -> None:
    """A weights file no state names (a crash between write and commit), under a later step's
    name, and a temp file: the resume ignores both and removes them."""
    run, _ = finished
    name = _state(run)["weights_file"]
    shutil.copy(run / name, run / "train_state-0000035.safetensors")
    (run / ".model.safetensors.abc123.tmp").write_bytes(b"half a file")
    cfg = config_from_dict(tiny_raw(straight.parent / "corpus.txt", run, max_steps=20))
    train(cfg, resume=True)
    assert sorted(p.name for p in run.glob("train_state-*")) == [name]
    assert not list(run.glob(".*.tmp"))
    want, got = _tensors(straight / store.MODEL_FILE), _tensors(run / store.MODEL_FILE)
    assert all(torch.equal(want[k], got[k]) for k in want)
