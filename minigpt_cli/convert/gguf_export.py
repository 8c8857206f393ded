"""`minigpt export-gguf`: a run as one GGUF file, the format llama.cpp, ollama and LM Studio run.

Written with `gguf`, ggml's own Python writer, in the layout llama.cpp's converter gives the same
model through Hugging Face: GPT-2 runs as llama.cpp's `gpt2` architecture, Llama runs as `llama`.
Two differences of layout are carried over here:

- matrices are stored [out, in] (nn.Linear's order; minigpt keeps GPT-2's [in, out]);
- llama.cpp's `llama` applies rotary positions to adjacent pairs of a head's channels, where
  minigpt (and Hugging Face) rotate the first half against the second, so the query and key rows
  are permuted into pairs. Same function, other order.

Types follow llama.cpp's converter: norms, biases and GPT-2's position table stay float32;
every other matrix takes the chosen type. Q4_0 keeps the token embedding (the tied output head)
at Q8_0: llama.cpp's own quantizer keeps that matrix at higher precision too (Q6_K, which the
`gguf` package cannot write). A matrix whose rows do not split into blocks of 32 stays float16.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt_cli import files
from minigpt_cli import tokenizer as tok
from minigpt_cli.convert import gguf_vocab
from minigpt_cli.convert.hf import export_architecture
from minigpt_cli.convert.llama import to_llama
from minigpt_cli.errors import SaveError, UserError
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPTConfig
from minigpt_cli.model.layers import mlp_hidden

TYPES = ("f32", "f16", "q8_0", "q4_0")
_LLAMA_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GPT2_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("export-gguf needs the gguf package: pip install 'minigpt[gguf]'"
                        ) from None
    return gguf


def gpt2_tensors(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """minigpt's GPT-2 names and [in, out] matrices to llama.cpp's `gpt2` names, [out, in]."""
    out = {"token_embd.weight": tensors["wte.weight"], "position_embd.weight":
           tensors["wpe.weight"], "output_norm.weight": tensors["ln_f.weight"],
           "output_norm.bias": tensors["ln_f.bias"]}
    for i in range(cfg.n_layer):
        for mine, theirs in _GPT2_NAMES.items():
            w = tensors[f"h.{i}.{mine}.weight"]
            out[f"blk.{i}.{theirs}.weight"] = w if w.dim() == 1 else w.T.contiguous()
            out[f"blk.{i}.{theirs}.bias"] = tensors[f"h.{i}.{mine}.bias"]
    return out


def _pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (first half, second half) to adjacent pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def llama_tensors(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """minigpt's Llama to llama.cpp's `llama` names, queries and keys in rotary pairs."""
    out = {}
    for name, t in to_llama(tensors, cfg).items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = t
        elif name == "model.norm.weight":
            out["output_norm.weight"] = t
        else:
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                t = _pairs(t, cfg.n_head)
            out[f"blk.{i}.{_LLAMA_NAMES[module]}.{kind}"] = t
    return out


def _qtype(gguf: Any, name: str, data: np.ndarray, kind: str) -> Any:
    T = gguf.GGMLQuantizationType
    if data.ndim == 1 or name == "position_embd.weight" or kind == "f32":
        return T.F32
    if kind == "f16" or data.shape[-1] % 32:
        return T.F16
    if kind == "q4_0" and name != "token_embd.weight":
        return T.Q4_0
    return T.Q8_0


def _add_tensors(writer: Any, gguf: Any, tensors: dict[str, torch.Tensor], kind: str) -> None:
    for name, t in tensors.items():
        data = t.detach().to(torch.float32).numpy()
        qtype = _qtype(gguf, name, data, kind)
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _add_hparams(writer: Any, cfg: GPTConfig, arch: str) -> None:
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(mlp_hidden(cfg.mlp, cfg.n_embd, cfg.mlp_hidden))
    writer.add_head_count(cfg.n_head)
    if arch == "llama":
        writer.add_head_count_kv(cfg.n_head)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
    else:
        writer.add_layer_norm_eps(cfg.norm_eps)


def _add_tokenizer(writer: Any, meta: dict[str, Any], run_dir: Path, n_vocab: int) -> None:
    desc = meta["tokenizer"]
    enc = tok.load(desc, run_dir)
    vocab = gguf_vocab.build(enc, desc.get("kind", ""), n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    ids = gguf_vocab.special_ids(enc, desc.get("chat"))
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    if "eot" in ids:
        writer.add_eot_token_id(ids["eot"])
    writer.add_add_bos_token(False)  # minigpt's prompts are the text's tokens, nothing added
    if desc.get("chat"):
        writer.add_chat_template(desc["chat"]["template"])


def export_gguf(run: str | Path, out: Path, kind: str = "f32") -> Path:
    """Write `out` (atomically: a failed export leaves no partial file)."""
    from minigpt_cli.inference.loading import find_checkpoint

    if kind not in TYPES:
        raise UserError(f"--type must be one of {', '.join(TYPES)}, not '{kind}'")
    gguf = _gguf()
    path = find_checkpoint(str(run))
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a directory")
    if out.is_dir():
        raise UserError(f"{out} is a folder, not a file")
    model, meta = store.load_model(path)
    cfg: GPTConfig = model.config
    arch = export_architecture(cfg, path)
    tensors = store.model_tensors(model)
    mapped = llama_tensors(tensors, cfg) if arch == "llama" else gpt2_tensors(tensors, cfg)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(Path(path).parent.name or "minigpt")
        writer.add_file_type(_file_type(gguf, kind))
        _add_hparams(writer, cfg, arch)
        _add_tokenizer(writer, meta, path.parent, cfg.vocab_size)
        _add_tensors(writer, gguf, mapped, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        files.commit_temp(Path(tmp), out)
    except OSError as e:
        raise SaveError(f"could not write {out}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _file_type(gguf: Any, kind: str) -> Any:
    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[kind]
