"""Experiment trackers (`train.loggers`): TensorBoard, MLflow and Weights & Biases get the
scalars metrics.jsonl gets, and the config as the run's parameters.

Every record the training loop writes to metrics.jsonl passes through `Trackers.log`, so the
series are the file's by construction: each number in a record becomes a point at its `step`
(losses, bits per byte, lr, tokens/s, grad norm, RL's reward). A tracker is a convenience,
metrics.jsonl the record: a tracker that is not installed or fails says so once and is
dropped, and training goes on. Only the process that writes metrics.jsonl (rank 0) opens them.

Where each writes, offline by default:
- tensorboard: RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`). A resume purges the
  points past the resumed step, as metrics.jsonl drops its lines past it.
- mlflow: MLFLOW_TRACKING_URI if set, else a local SQLite store, RUN/mlflow.db (`mlflow ui
  --backend-store-uri sqlite:///RUN/mlflow.db`; MLflow's plain-folder store is frozen, and it
  recommends SQLite for local use); experiment "minigpt", the run named after RUN. A resume
  goes on in the same MLflow run (its id is kept in RUN/trackers.json).
- wandb: project "minigpt" (WANDB_PROJECT overrides), files under RUN/; WANDB_MODE=offline
  needs no account. A resume goes on in the same W&B run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from minigpt_cli import files

KINDS = ("tensorboard", "mlflow", "wandb")
STATE_FILE = "trackers.json"  # the MLflow and W&B run ids a resume continues


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The points a metrics.jsonl record holds: its finite numbers, except the step itself."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(v)}


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """`train.lr` -> "0.01": the config as the flat string parameters trackers show."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int, _: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        if not start_step:
            text = "\n".join(f"    {k}: {v}" for k, v in flat_params(config).items())
            self.writer.add_text("config", text, 0)

    def log(self, step: int, points: dict[str, float]) -> None:
        for key, value in points.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int,
                 state: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        uri = (os.environ.get("MLFLOW_TRACKING_URI")
               or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = state.get("mlflow_run_id") if start_step else None
        if self.run_id is None:
            found = self.client.get_experiment_by_name("minigpt")
            experiment = (found.experiment_id if found is not None
                          else self.client.create_experiment("minigpt"))
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            params = flat_params(config)
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, v[:6000])
                                                       for k, v in params.items()])
        state["mlflow_run_id"] = self.run_id

    def log(self, step: int, points: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in points.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int,
                 state: dict[str, Any]) -> None:
        import wandb

        run_id = state.get("wandb_run_id") if start_step else None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minigpt"),
                              name=run_dir.name, dir=str(run_dir), config=config,
                              id=run_id, resume="allow" if run_id else None)
        state["wandb_run_id"] = self.run.id

    def log(self, step: int, points: dict[str, float]) -> None:
        self.run.log(points, step=step)

    def close(self) -> None:
        self.run.finish()


_MAKERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


class Trackers:
    """The trackers a run asked for that could start. Every call is guarded: the first failure
    of a tracker prints one warning and drops it."""

    def __init__(self, kinds: list[str], run_dir: Path, config: dict[str, Any],
                 start_step: int, console: Console) -> None:
        self.console, self.run_dir, self.live = console, run_dir, {}
        path = run_dir / STATE_FILE
        try:
            state = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            state = {}
        for kind in dict.fromkeys(kinds):
            self._guard(kind, lambda k=kind: self.live.__setitem__(
                k, _MAKERS[k](run_dir, config, start_step, state)))
        if any(k in state for k in ("mlflow_run_id", "wandb_run_id")):
            files.atomic_write_text(path, json.dumps(state, indent=2))

    def _guard(self, kind: str, call: Any) -> None:
        try:
            call()
        except ImportError:
            self._drop(kind, f"it is not installed (pip install 'minigpt[{kind}]')")
        except Exception as e:  # a tracker's own failure never stops training
            self._drop(kind, f"{type(e).__name__}: {e}")

    def _drop(self, kind: str, why: str) -> None:
        self.live.pop(kind, None)
        self.console.print(f"[yellow]warning:[/] train.loggers: {kind} is off for the rest of "
                           f"this run: {escape(why.splitlines()[0] if why else '')}; "
                           "metrics.jsonl has every figure")

    def log(self, record: dict[str, Any]) -> None:
        if not self.live:
            return
        points = scalars(record)
        if not points or "step" not in record:
            return
        for kind, tracker in list(self.live.items()):
            self._guard(kind, lambda t=tracker: t.log(int(record["step"]), points))

    def close(self) -> None:
        for kind, tracker in list(self.live.items()):
            self._guard(kind, tracker.close)
        self.live.clear()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
