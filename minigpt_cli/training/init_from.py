"""`train.init_from`: a run that starts from another run's weights.

The other run (a minigpt run, or a Hugging Face model brought in by `import-hf`) gives the
architecture, the weights and the tokenizer; the new run gets a fresh optimizer, schedule and
data position. Fine-tuning a base model on chat data is the use: its tokenizer may gain the
chat tokens, and the model as many embedding rows (`GPT.grow_vocab`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from minigpt_cli.config import Config
from minigpt_cli.errors import UserError
from minigpt_cli.model import store

# What a fine-tuning run may set differently from the run it starts from.
_FREE_MODEL_KEYS = {"dropout"}


@dataclass
class Start:
    """The run a new run starts from: its weights file, architecture and tokenizer."""

    path: Path
    model_config: dict[str, Any]
    tokenizer: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def tensors(self) -> dict[str, torch.Tensor]:
        return store.load_safetensors(self.path)[0]


def weights_file(path: Path) -> Path:
    """A run folder's weights file (or the file itself), or a one-line error."""
    if path.is_dir():
        path = path / store.MODEL_FILE
    if not path.is_file():
        raise UserError(f"train.init_from: no {store.MODEL_FILE} in {path.parent} (give a run "
                        "folder that `minigpt train` or `minigpt import-hf` wrote)")
    return path


def load(cfg: Config) -> Start | None:
    """The run `train.init_from` names (None when it names none), adopted into `cfg`: its
    architecture and tokenizer kind replace the config's, and a model key the config names
    that disagrees with them is a one-line error. A resume adopts them too, so its config
    reads as the run's own; only a fresh start loads the weights (`Start.tensors`)."""
    if not cfg.train.init_from:
        return None
    path = weights_file(Path(cfg.train.init_from).expanduser())
    meta = store.read_meta(path)
    model_config, desc = meta.get("model_config"), meta.get("tokenizer")
    if not isinstance(model_config, dict) or not isinstance(desc, dict):
        raise UserError(f"train.init_from: {path} is not a minigpt checkpoint")
    if meta.get("quantize"):
        raise UserError(f"train.init_from: {path} holds int8 weights; start from the float run "
                        "it was quantized from")
    _adopt(cfg, model_config, desc)
    return Start(path, model_config, desc)


def _adopt(cfg: Config, model_config: dict[str, Any], desc: dict[str, Any]) -> None:
    for f in fields(cfg.model):
        if f.name not in model_config or f.name in _FREE_MODEL_KEYS:
            continue
        theirs, ours = model_config[f.name], getattr(cfg.model, f.name)
        if f.name in cfg.given_model_keys and theirs != ours:
            raise UserError(f"model.{f.name} is {ours} in the config but {theirs} in the run "
                            f"train.init_from names: drop it from the config (the run's "
                            "architecture is used)")
        setattr(cfg.model, f.name, theirs)
    if "dropout" not in cfg.given_model_keys and "dropout" in model_config:
        cfg.model.dropout = model_config["dropout"]
    kind = desc.get("kind")
    if not isinstance(kind, str):
        raise UserError("train.init_from: the run's tokenizer description names no kind")
    cfg.tokenizer.kind = kind  # type: ignore[assignment]
