"""Loading a run for inference: find its weights, build the model, and the draft model
for speculative decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tiktoken

from minigpt_cli.errors import UserError
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPT
from minigpt_cli.tokenizer.chat import ChatTemplate


def find_checkpoint(checkpoint: str | None, runs_dir: Path = Path("runs")) -> Path:
    """A weights file from a run dir, a file path, or (None) the newest run under runs/."""
    if checkpoint is None:
        found = sorted(runs_dir.glob(f"*/{store.MODEL_FILE}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"no trained run found under {runs_dir}/: train one first with "
                            "`minigpt train configs/tiny.yaml`, or pass --checkpoint")
        return found[-1]
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / store.MODEL_FILE).is_file():
            raise UserError(f"{path} holds no {store.MODEL_FILE}: is it a minigpt run directory?")
        return path / store.MODEL_FILE
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    return path


def load_for_inference(checkpoint: str | None, device: str = "auto", dtype: str = "auto",
                       quantize: str = "none") -> tuple[GPT, tiktoken.Encoding, dict, Path]:
    """Model in eval mode on its device and dtype, with the tokenizer it was trained with;
    `quantize="int8"` (or "int4") rounds its product weights (model/int8.py), and
    meta["quantize"] then describes what was done."""
    from minigpt_cli import tokenizer as tok
    from minigpt_cli.device import resolve_device, resolve_dtype
    from minigpt_cli.model.int8 import check_mode, quantize_model

    check_mode(quantize)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = find_checkpoint(checkpoint)
    model, meta = store.load_model(path)
    enc = tok.load(meta["tokenizer"], path.parent)
    if meta.get("quantize"):  # a rounded file: --quantize has nothing to add
        kind = meta["quantize"].get("kind", "int8") if isinstance(meta["quantize"], dict) \
            else "int8"
        meta["quantize"] = f"{kind} weights, from {path.name} (minigpt quantize)"
    elif quantize != "none":
        meta["quantize"] = quantize_model(model, kind=quantize).describe()
    model.to(device=dev, dtype=dt).eval()  # eval: dropout off, so equal inputs give equal outputs
    return model, enc, meta, path


def chat_template(meta: dict[str, Any]) -> ChatTemplate | None:
    """The run's chat template and its tokens, where it has one (a chat fine-tuned run, or an
    import whose tokenizer_config.json has a template)."""
    desc = meta.get("tokenizer")
    return ChatTemplate.from_dict(desc.get("chat")) if isinstance(desc, dict) else None


def load_draft(checkpoint: str, model: GPT, enc: tiktoken.Encoding, device: str = "auto",
               dtype: str = "auto", quantize: str = "none") -> GPT:
    """The draft model for speculative decoding (--draft): any run whose tokens are the
    model's own, loaded the way the model was (device, dtype, --quantize)."""
    from minigpt_cli.tokenizer import fingerprint

    try:
        draft, draft_enc, _, _ = load_for_inference(checkpoint, device, dtype, quantize)
    except UserError as exc:
        raise UserError(f"--draft: {exc}") from None
    if (fingerprint(draft_enc, "") != fingerprint(enc, "")
            or draft.config.vocab_size != model.config.vocab_size):
        raise UserError(f"--draft {checkpoint} uses other tokens than the model "
                        f"({draft_enc.n_vocab} against {enc.n_vocab}, or other merges): a "
                        "draft must share the model's tokenizer")
    return draft
