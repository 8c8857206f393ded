"""Weights to and from Hugging Face's layouts, exactly, without transformers at run time.

GPT-2: minigpt names its modules as GPT-2 does (`wte`, `h.{i}.attn.c_attn`, ...) and stores
linear weights [in, out] as GPT-2's `Conv1D` does, so the mapping is only the `transformer.`
prefix. A model with rotary positions, RMSNorm and SwiGLU goes to and from LlamaForCausalLM
(interop_llama.py). Only safetensors are read; pickle-based `.bin` files are refused. An
imported model keeps the tokenizer minigpt's export recorded in config.json; a folder from
elsewhere brings its byte-level BPE tokenizer.json (tokenizer/hf.py), and a GPT-2 folder
without one gets tiktoken's `gpt2`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import tiktoken
import torch
import yaml

from minigpt_cli import files
from minigpt_cli import tokenizer as tok
from minigpt_cli.config import Config, ModelConfig, TokenizerConfig
from minigpt_cli.convert import chat_template
from minigpt_cli.convert.llama import from_llama, is_llama, llama_config, to_llama, valid_eps
from minigpt_cli.convert.llama import read_config as read_llama_config
from minigpt_cli.errors import UserError
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPTConfig
from minigpt_cli.tokenizer import hf as hf_tokenizer
from minigpt_cli.tokenizer import json_file as tokenizer_json
from minigpt_cli.tokenizer.chat import ChatTemplate
from minigpt_cli.training import run_state

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _read_hf_json(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory (expected a save_pretrained folder)")
    if not path.is_file():
        raise UserError(f"{hf_dir} has no config.json: is it a Hugging Face model directory?")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in ("gpt2", "llama"):
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise UserError(f"{hf_dir} holds a '{kind}' model; GPT-2 (model_type gpt2) and Llama "
                        "(model_type llama) map onto minigpt's architectures")
    return cfg


def _read_hf_config(hf_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    path = hf_dir / "config.json"
    lacking = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
               if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool) or cfg[k] < 1]
    if lacking:
        raise UserError(f"{path} has no valid {', '.join(lacking)}: is it a complete GPT-2 "
                        "config?")
    checks = [
        (cfg.get("activation_function", "gelu_new") in TANH_GELUS,
         f"activation_function '{cfg.get('activation_function')}' (minigpt uses tanh GELU)"),
        (cfg.get("n_inner") in (None, 4 * cfg["n_embd"]), f"n_inner {cfg.get('n_inner')}"),
        (valid_eps(cfg.get("layer_norm_epsilon", 1e-5)),
         f"layer_norm_epsilon {cfg.get('layer_norm_epsilon')}"),
        (cfg.get("tie_word_embeddings", True), "untied input and output embeddings"),
        (not cfg.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"),
        (not cfg.get("add_cross_attention", False), "cross-attention"),
    ]
    for ok, what in checks:
        if not ok:
            raise UserError(f"{hf_dir}: {what} is not supported by minigpt's GPT-2")
    return cfg


def _read_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    if single.is_file():
        tensors, _ = store.load_safetensors(single)
        return tensors
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(store.load_safetensors(hf_dir / shard)[0])
        return tensors
    if list(hf_dir.glob("*.bin")) or list(hf_dir.glob("*.pt")):
        raise UserError(f"{hf_dir} has only pickle-based weights (.bin), which minigpt never "
                        "loads: convert them to model.safetensors first (save_pretrained does)")
    raise UserError(f"{hf_dir} has no model.safetensors")


def hf_to_minigpt(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 state dict (with or without the `transformer.` prefix) to minigpt names."""
    out = {}
    for name, t in tensors.items():
        name = name.removeprefix("transformer.")
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied to wte / causal-mask buffers of older transformers versions
        out[name] = t
    return out


def minigpt_to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"transformer.{name}": t for name, t in tensors.items()}


def _hf_tokenizer(hf: dict[str, Any], hf_dir: Path) -> tuple[str, tiktoken.Encoding]:
    """The tokenizer a folder's model was trained with: the one minigpt's export recorded
    (its ranks file beside the weights), else the folder's byte-level BPE `tokenizer.json`
    (tokenizer/hf.py), else GPT-2's own for a GPT-2."""
    desc = hf.get("minigpt_tokenizer")
    if isinstance(desc, dict) and isinstance(desc.get("kind"), str):
        return desc["kind"], tok.load(desc, hf_dir)
    path = hf_dir / "tokenizer.json"
    if path.is_file():
        try:  # tiktoken when it reproduces the file exactly: fast, and no extra library
            return "bpe", hf_tokenizer.read(path)
        except UserError:  # SentencePiece-style and the rest: the tokenizers library runs it
            return "hf", tokenizer_json.import_file(path, hf)
    if hf["model_type"] == "gpt2":
        return "gpt2", tok.tiktoken_encoding("gpt2")
    raise UserError(f"{hf_dir}: a Llama folder with no tokenizer.json and no tokenizer "
                    "recorded by minigpt's export-hf")


def import_hf(hf_dir: Path, out_dir: Path) -> Path:
    """Write a minigpt run directory from a Hugging Face GPT-2 folder (tokenizer: gpt2)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    files.check_new_folder(out_dir)
    hf = _read_hf_json(hf_dir)
    source = hf_dir / "model.safetensors"
    if hf["model_type"] == "llama":
        fields = read_llama_config(hf, str(hf_dir / "config.json"))
        tensors = from_llama(_read_hf_tensors(hf_dir), fields)
        model_cfg = ModelConfig(**{k: v for k, v in fields.items() if k != "kv_heads"})
    else:
        hf = _read_hf_config(hf_dir, hf)
        model_cfg = ModelConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                                block_size=hf["n_positions"],
                                dropout=hf.get("resid_pdrop", 0.0), bias=True,
                                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
        tensors = hf_to_minigpt(_read_hf_tensors(hf_dir))
    gpt_cfg = GPTConfig(vocab_size=hf["vocab_size"], **asdict(model_cfg))
    model = store.build_model(tensors, asdict(gpt_cfg), source)
    kind, enc = _hf_tokenizer(hf, hf_dir)
    if enc.n_vocab > gpt_cfg.vocab_size:
        raise UserError(f"{hf_dir}: vocab_size {gpt_cfg.vocab_size} is smaller than the "
                        f"{kind} tokenizer's {enc.n_vocab}")
    template = chat_template.read(hf_dir)
    tok_desc = tok.describe(enc, kind, template.to_dict() if template else None)
    cfg = Config(out_dir=str(out_dir), tokenizer=TokenizerConfig(kind=kind), model=model_cfg)
    meta = {"model_config": asdict(gpt_cfg), "tokenizer": tok_desc, "step": 0, "val_loss": None,
            "config": cfg.to_dict(), "imported_from": str(hf_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(out_dir / store.CONFIG_FILE, yaml.safe_dump(cfg.to_dict(),
                                                                        sort_keys=False))
    store.save_model(out_dir / store.MODEL_FILE, model, meta)
    if kind == "bpe":  # minigpt's own ranks file, or the one made from tokenizer.json
        tok.save_ranks(enc, out_dir / tok.TOKENIZER_FILE)
    elif kind == "hf":  # the folder's own tokenizer.json, run by the tokenizers library
        files.atomic_write_text(out_dir / tok.JSON_FILE, enc.source)
    # A step-0 resume point with a fresh optimizer: `minigpt train CONFIG --resume` fine-tunes.
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4)
    run_state.save_train_state(out_dir, model, opt, {"step": 0, "best_val_loss": float("inf"),
                                                "seed": cfg.seed, "data": {"next_step": 0}})
    return out_dir / store.MODEL_FILE


def export_hf(run: str | Path, out_dir: Path) -> Path:
    """Write config.json + model.safetensors that GPT2LMHeadModel.from_pretrained loads."""
    from minigpt_cli.inference.loading import find_checkpoint

    path = find_checkpoint(str(run))
    files.check_new_folder(Path(out_dir))
    model, meta = store.load_model(path)
    cfg: GPTConfig = model.config
    eot = meta["tokenizer"].get("eot_id", cfg.vocab_size - 1)
    if export_architecture(cfg, path) == "llama":
        hf_config = {**llama_config(cfg, eot), "minigpt_tokenizer": meta["tokenizer"]}
        tensors = to_llama(store.model_tensors(model), cfg)
    else:
        hf_config = _gpt2_config(cfg, eot, meta)
        tensors = minigpt_to_hf(store.model_tensors(model))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(out_dir / "config.json", json.dumps(hf_config, indent=2))
    from safetensors.torch import save

    files.atomic_write_bytes(out_dir / "model.safetensors", save(tensors, {"format": "pt"}))
    tok.copy_tokenizer_file(meta["tokenizer"], path.parent, out_dir)
    try:
        enc = tok.load(meta["tokenizer"], path.parent)
    except UserError:  # a tokenizer minigpt cannot rebuild (e.g. a benchmark's stand-in)
        return out_dir
    write_hf_tokenizer(enc, out_dir, eot)
    template = ChatTemplate.from_dict(meta["tokenizer"].get("chat"))
    if template is not None:
        chat_template.write(out_dir, template)
    return out_dir


def export_architecture(cfg: GPTConfig, path: Path) -> str:
    """"llama" or "gpt2": the published architecture a run is exactly, or why it is neither
    (what export-hf and export-gguf can write)."""
    if is_llama(cfg):
        return "llama"
    if not cfg.is_gpt2:
        raise UserError(f"{path} has neither GPT-2's architecture nor Llama's ({cfg.norm}, "
                        f"{cfg.position} positions, {cfg.mlp}"
                        f"{', qk_norm' if cfg.qk_norm else ''}): Hugging Face's "
                        "GPT2LMHeadModel and LlamaForCausalLM cannot hold it, nor llama.cpp's "
                        "gpt2 and llama")
    if not cfg.bias:
        raise UserError(f"{path} was trained with model.bias=false; GPT-2 always has biases, so "
                        "it cannot be exported as GPT-2")
    return "gpt2"


def _gpt2_config(cfg: GPTConfig, eot: int, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json for GPT2LMHeadModel."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True,
        "minigpt_tokenizer": meta["tokenizer"],
    }


def write_hf_tokenizer(enc: tiktoken.Encoding, out_dir: Path, eot: int) -> bool:
    """tokenizer.json + tokenizer_config.json, so `AutoTokenizer.from_pretrained(out_dir)` loads
    the same tokenizer and the folder is a complete Hugging Face model (what `transformers
    serve` and llama.cpp's converter read). transformers converts tiktoken ranks; without it
    installed the weights are still exported, and this returns False. An imported
    tokenizer.json (kind hf) is written as it came."""
    name = enc.decode_single_token_bytes(eot).decode("utf-8", errors="replace")
    if isinstance(enc, tokenizer_json.JsonTokenizer):  # its post-processor decides on BOS
        files.atomic_write_text(out_dir / tok.JSON_FILE, enc.source)
        _tokenizer_config(out_dir, {"eos_token": name})
        return True
    try:
        from transformers.integrations.tiktoken import TikTokenConverter
    except ImportError:
        return False
    import base64
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ranks = Path(tmp) / "ranks.tiktoken"  # tiktoken's format: base64(token) rank
        ranks.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                 for t, r in enc._mergeable_ranks.items()))
        converted = TikTokenConverter(vocab_file=str(ranks), pattern=enc._pat_str,
                                      extra_special_tokens=enc._special_tokens).converted()
    # The converter numbers special tokens after the ranks; an imported tokenizer's keep their
    # own ids (SmolLM's <|endoftext|> is 0). `tokenizers` looks an added token up in the
    # model's vocabulary first, so the id goes there too.
    spec = json.loads(converted.to_str())
    for added in spec.get("added_tokens", []):
        if added.get("content") in enc._special_tokens:
            added["id"] = spec["model"]["vocab"][added["content"]] = \
                enc._special_tokens[added["content"]]
    files.atomic_write_text(out_dir / "tokenizer.json", json.dumps(spec, ensure_ascii=False))
    _tokenizer_config(out_dir, {"bos_token": name, "eos_token": name, "unk_token": name,
                                "add_bos_token": False})
    return True


def _tokenizer_config(out_dir: Path, tokens: dict[str, Any]) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    files.atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
