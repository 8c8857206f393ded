"""Checkpoints without pickle: weights in safetensors, everything else in JSON.

Every file is written atomically (temp file, fsync, rename). The resume state is a step-named
safetensors file (weights + optimizer moments) that is never overwritten, and a JSON file
(step, RNG, data position) that points at it and is replaced last. A crash or Ctrl-C at any
moment therefore leaves a JSON that names a complete, matching weights file.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from minigpt_cli.errors import SaveError, UserError
from minigpt_cli.faults import crash_point
from minigpt_cli.files import atomic_write_bytes, atomic_write_text, to_json

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
STATE_JSON = "train_state.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


def model_tensors(model: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict to save, from the uncompiled module (no `_orig_mod.` prefix); a dict is
    already one (an FSDP2 model's full state, gathered onto rank 0)."""
    if isinstance(model, dict):
        return model
    raw = getattr(model, "_orig_mod", model)
    return {name: t.detach().to("cpu").contiguous() for name, t in raw.state_dict().items()}


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomic safetensors write; metadata values are JSON so they keep their types."""
    header = {k: to_json(v) for k, v in meta.items()}
    atomic_write_bytes(path, save(tensors, metadata=header))


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read tensors and JSON metadata; a damaged file becomes a one-line UserError."""
    path = Path(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise UserError(f"{path} is a pickle-based file, which minigpt never loads: "
                        "convert it to safetensors first")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0]}); "
                        "use another checkpoint or retrain") from None
    return tensors, _decode_meta(raw_meta)


def _decode_meta(raw_meta: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return meta


def read_meta(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON metadata alone, without reading its tensors; {} when the
    file is missing or unreadable (callers fall back to what they knew before)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return _decode_meta(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return {}


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
        from minigpt_cli.sharding import saved_step as dcp_step

        tensors, saved = {}, dcp_step(weights)
    else:
        tensors, meta = load_safetensors(weights)
        saved = meta.get("step")
    if saved != state["step"]:
        raise UserError(f"resume state in {run_dir} is inconsistent (json step {state['step']}, "
                        f"weights step {saved})")
    return state, tensors


def saved_step(path: Path) -> int | None:
    """The step a weights file says it holds, from its header alone; None if unreadable."""
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


def save_model(path: Path, model: torch.nn.Module | dict[str, torch.Tensor],
               meta: dict[str, Any]) -> None:
    """Inference weights: the safetensors metadata makes the file describe itself."""
    save_safetensors(path, model_tensors(model), {"format": "minigpt", **meta})


def build_model(tensors: dict[str, torch.Tensor], model_config: dict[str, Any], source: Path):
    """A GPT from saved tensors, refusing files whose shapes or keys don't match the config."""
    from minigpt_cli.model import GPT, GPTConfig

    try:
        cfg = GPTConfig(**model_config)
    except TypeError:
        raise UserError(f"{source} has an unreadable model config: {model_config}") from None
    model = GPT(cfg)
    tensors = {k.removeprefix("_orig_mod."): v for k, v in tensors.items()}
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"{source} does not match its model config (missing: "
                        f"{', '.join(missing[:3]) or '-'}; "
                        f"unexpected: {', '.join(extra[:3]) or '-'})")
    for k, t in expected.items():
        if tensors[k].shape != t.shape:
            raise UserError(f"{source}: tensor {k} has shape {tuple(tensors[k].shape)}, the model "
                            f"config needs {tuple(t.shape)}")
    model.load_state_dict(tensors)
    return model


def load_model(path: Path):
    """(model, metadata) from a minigpt safetensors file: on CPU, float32, in eval mode (a loaded
    checkpoint is for inference; training rebuilds its model from the resume state)."""
    tensors, meta = load_safetensors(path)
    if "model_config" not in meta or "tokenizer" not in meta:
        raise UserError(f"{path} is not a minigpt checkpoint (no model_config/tokenizer metadata)")
    pairs = {}
    if meta.get("quantize"):  # written by `minigpt quantize`: int8 matrices and their scales
        from minigpt_cli.quantize import unpack

        try:
            tensors, pairs = unpack(tensors, int(meta["quantize"].get("group", 32)))
        except (ValueError, AttributeError, TypeError, RuntimeError) as e:
            raise UserError(f"{path} has damaged int8 weights ({e})") from None
    model = build_model(tensors, meta["model_config"], path).eval()
    if pairs:
        from minigpt_cli.quantize import attach

        attach(model, pairs)
    return model, meta
