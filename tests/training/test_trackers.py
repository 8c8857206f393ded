"""`train.loggers`: TensorBoard's event files and MLflow's store, read back with their own
readers, hold metrics.jsonl's series point for point, the config as parameters, and go on in
the same series after a resume; a tracker that is missing or fails warns once and training
finishes."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from minigpt_cli.config import config_from_dict
from minigpt_cli.training import trackers
from minigpt_cli.training.loop import train
from tests.conftest import tiny_raw


def _series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {key: [(step, value), ...]}."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in trackers.scalars(record).items():
            out.setdefault(key, []).append((record["step"], value))
    return out


def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}


def _mlflow(run: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run / 'mlflow.db').resolve()}")
    run_id = json.loads((run / trackers.STATE_FILE).read_text())["mlflow_run_id"]
    data = client.get_run(run_id).data
    series = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
              for k in data.metrics}
    return series, data.params


def _train(raw: dict, resume: bool = False) -> str:
    out = io.StringIO()
    train(config_from_dict(raw), resume=resume, console=Console(file=out, width=200))
    return out.getvalue()


def test_tensorboard_and_mlflow_hold_metrics_jsonl(tmp_path: Path, corpus_file: Path,
                                                   data_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tiny_raw(corpus_file, tmp_path / "run", max_steps=10, loggers=["tensorboard",
                                                                         "mlflow"])
    said = _train(raw)
    assert "warning" not in said, said
    raw["train"]["max_steps"] = 20
    _train(raw, resume=True)
    run = tmp_path / "run"
    want = _series(run)
    assert {"loss", "lr", "tokens_per_s", "val_loss", "val_bpb", "grad_norm"} <= set(want)
    assert max(s for s, _ in want["loss"]) == 20
    board = _tensorboard(run)
    assert set(board) == set(want)
    for key, points in want.items():  # TensorBoard keeps float32
        assert [s for s, _ in board[key]] == [s for s, _ in points], key
        np.testing.assert_array_equal(np.float32([v for _, v in board[key]]),
                                      np.float32([v for _, v in points]))
    series, params = _mlflow(run)
    assert series == want  # one MLflow run across the resume, every point exact
    assert params["train.lr"] == "0.003" and params["model.n_embd"] == "32"
    assert json.loads(params["train.loggers"]) == ["tensorboard", "mlflow"]


def test_a_missing_or_failing_tracker_warns_once(tmp_path: Path, corpus_file: Path,
                                                 data_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails: not installed

    class Flaky:
        def __init__(self, *args: object) -> None:
            self.calls = 0

        def log(self, step: int, points: dict) -> None:
            self.calls += 1
            if self.calls == 2:
                raise ConnectionError("tracking server went away\nsecond line")

        def close(self) -> None:
            raise AssertionError("a dropped tracker is not closed")

    monkeypatch.setitem(trackers._MAKERS, "mlflow", Flaky)
    said = _train(tiny_raw(corpus_file, tmp_path / "run", max_steps=20,
                           loggers=["wandb", "mlflow"]))
    lines = [ln for ln in said.splitlines() if "warning" in ln]
    assert len(lines) == 2, said
    assert "wandb" in lines[0] and "pip install 'minigpt[wandb]'" in lines[0]
    assert "mlflow" in lines[1] and "ConnectionError: tracking server went away" in lines[1]
    assert max(r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                      .read_text().splitlines())) == 20


def test_loggers_config_is_checked() -> None:
    from minigpt_cli.errors import UserError

    with pytest.raises(UserError, match=r"train.loggers\[1\]: 'neptune' is not one of"):
        config_from_dict(tiny_raw(Path("x.txt"), Path("r"), loggers=["mlflow", "neptune"]))
    with pytest.raises(UserError, match=r"train\.loggers: expected a list"):
        config_from_dict(tiny_raw(Path("x.txt"), Path("r"), loggers="mlflow"))
