"""Checkpoints without pickle: weights in safetensors, everything else in JSON.

Every file is written atomically (temp file, fsync, rename). The resume state is a step-named
safetensors file (weights + optimizer moments) that is never overwritten, and a JSON file
(step, RNG, data position) that points at it and is replaced last. A crash or Ctrl-C at any
moment therefore leaves a JSON that names a complete, matching weights file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from minigpt_cli.errors import UserError
from minigpt_cli.files import atomic_write_bytes, to_json

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
CONFIG_FILE = "config.yaml"


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


def save_model(path: Path, model: torch.nn.Module | dict[str, torch.Tensor],
               meta: dict[str, Any]) -> None:
    """Inference weights: the safetensors metadata makes the file describe itself."""
    save_safetensors(path, model_tensors(model), {"format": "minigpt", **meta})


def build_model(tensors: dict[str, torch.Tensor], model_config: dict[str, Any], source: Path):
    """A GPT from saved tensors, refusing files whose shapes or keys don't match the config."""
    from minigpt_cli.model.gpt import GPT, GPTConfig

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
        from minigpt_cli.model.int8 import unpack

        try:
            tensors, pairs = unpack(tensors, int(meta["quantize"].get("group", 32)))
        except (ValueError, AttributeError, TypeError, RuntimeError) as e:
            raise UserError(f"{path} has damaged int8 weights ({e})") from None
    model = build_model(tensors, meta["model_config"], path).eval()
    if pairs:
        from minigpt_cli.model.int8 import attach

        attach(model, pairs)
    return model, meta
