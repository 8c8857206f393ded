"""A run's resume state, without pickle: a step-named safetensors file (weights and optimizer
moments) that is never overwritten, and a JSON file (step, RNG, data position) that names it
and is replaced last, so a crash or Ctrl-C at any moment leaves a JSON that names a complete,
matching weights file. Also the run's metric log.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from minigpt_cli.errors import SaveError, UserError
from minigpt_cli.faults import crash_point
from minigpt_cli.files import atomic_write_text, to_json
from minigpt_cli.model.store import (
    MODEL_FILE,
    load_safetensors,
    model_tensors,
    read_meta,
    save_safetensors,
)

STATE_JSON = "train_state.json"
METRICS_FILE = "metrics.jsonl"


def rng_state() -> dict[str, Any]:
    """Torch RNG streams as base64 JSON: dropout masks after resume match an unbroken run."""
    cpu = torch.get_rng_state().numpy().tobytes()
    state: dict[str, Any] = {"cpu": base64.b64encode(cpu).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode()
                         for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    def decode(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Split an optimizer state dict into tensors (safetensors) and param groups (JSON)."""
    sd = opt.state_dict()
    tensors = {
        f"optim.{pid}.{name}": (t if t.dim() else t.reshape(1)).detach().to("cpu").contiguous()
        for pid, st in sd["state"].items()
        for name, t in st.items()
    }
    return tensors, sd["param_groups"]


def save_train_state(run_dir: Path, model: torch.nn.Module | dict[str, torch.Tensor],
                     opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write the resume point: new weights file first, then the JSON that names it."""
    step = state["step"]
    name = f"train_state-{step:07d}.safetensors"
    opt_tensors, groups = optimizer_tensors(opt)
    tensors = {f"model.{k}": v for k, v in model_tensors(model).items()} | opt_tensors
    save_safetensors(run_dir / name, tensors, {"step": step})
    try:
        commit_train_state(run_dir, name, groups, state)
    except SaveError:  # if not committed, the new weights file is nobody's and takes space
        if (read_state_json(run_dir) or {}).get("weights_file") != name:
            _remove(Path(run_dir) / name)
        raise


def commit_train_state(run_dir: Path, name: str, groups: list[Any], state: dict[str, Any]
                       ) -> None:
    """Replace the JSON with one that names `name` (complete on disk), then drop the previous
    weights file or DCP directory."""
    previous = read_state_json(run_dir)
    payload = {**state, "weights_file": name, "param_groups": groups, "rng": rng_state()}
    atomic_write_text(run_dir / STATE_JSON, to_json(payload, indent=1))
    if previous and previous.get("weights_file") not in (None, name):
        crash_point("state:unlink-previous")
        _remove(Path(run_dir) / previous["weights_file"])


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


_STATE_NAME = re.compile(r"train_state-\d{7}\.(safetensors|dcp)")


def read_state_json(run_dir: Path) -> dict[str, Any] | None:
    """The resume state, checked field by field: a damaged file is a one-line error, never a
    resume from guessed values (the RNG streams and optimizer groups cannot be rebuilt)."""
    path = Path(run_dir) / STATE_JSON
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        state = None
    problem = _state_problem(state)
    if problem:
        raise UserError(f"{path} is damaged ({problem}), so the run cannot resume exactly; its "
                        f"{MODEL_FILE} still loads: train again in a new out_dir")
    return state


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return "not a JSON object"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return "no valid 'step'"
    name = state.get("weights_file")
    # A bare file name of our own pattern: the state may not point anywhere else on disk.
    if not isinstance(name, str) or not _STATE_NAME.fullmatch(name):
        return "no valid 'weights_file'"
    if not isinstance(state.get("param_groups"), list):
        return "no 'param_groups'"
    rng = state.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), str):
        return "no 'rng'"
    return None


def load_train_state(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON state and the weights + optimizer tensors it points at, checked to match."""
    state = read_state_json(run_dir)
    if state is None:
        raise UserError(f"nothing to resume in {run_dir}: no {STATE_JSON} (drop --resume to start)")
    weights = Path(run_dir) / state["weights_file"]
    if not weights.exists():
        raise UserError(f"{STATE_JSON} in {run_dir} names {weights.name}, which is missing: the "
                        "run cannot resume; train again in a new out_dir")
    if weights.is_dir():  # an FSDP2 run's DCP directory: read later, into the sharded model
        tensors, saved = {}, saved_step(weights)
    else:
        tensors, meta = load_safetensors(weights)
        saved = meta.get("step")
    if saved != state["step"]:
        raise UserError(f"resume state in {run_dir} is inconsistent (json step {state['step']}, "
                        f"weights step {saved})")
    return state, tensors


def saved_step(path: Path) -> int | None:
    """The step a weights file says it holds, from its header alone, or an FSDP2 run's DCP
    directory from its marker; None if unreadable (or, for a directory, incomplete)."""
    if Path(path).is_dir():
        from minigpt_cli.training.sharding import MARKER

        with contextlib.suppress(OSError, ValueError, AttributeError):
            return json.loads((Path(path) / MARKER).read_text(encoding="utf-8")).get("step")
        return None
    return read_meta(path).get("step")


def clean_stale_state_files(run_dir: Path) -> None:
    """Remove weights files and DCP directories no JSON points at (left by a crash between
    write and switch), and temp files."""
    state = read_state_json(run_dir) or {}
    keep = state.get("weights_file")
    for p in Path(run_dir).glob("train_state-*"):
        if p.name != keep and _STATE_NAME.fullmatch(p.name):
            _remove(p)
    for p in Path(run_dir).glob(".*.tmp"):
        _remove(p)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; a line cut short by a crash mid-append is skipped."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
