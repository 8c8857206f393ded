"""Llama-architecture weights to and from Hugging Face's `LlamaForCausalLM` layout, exactly.

A minigpt model with `norm: rmsnorm`, `position: rotary` and `mlp: swiglu` is a Llama: the
same RMSNorm (its epsilon carried over), the same rotary layout ("rotate half", so no
permutation of the query and key weights), SiLU-gated MLP, tied embeddings. The mapping
splits minigpt's fused products (c_attn into q/k/v, c_fc into gate/up) and transposes its
[in, out] matrices into nn.Linear's [out, in].

Grouped-query attention (fewer key/value heads than query heads, as SmolLM has) imports by
giving every query head its own copy of its group's key/value weights: the same function,
exactly, at the cost of full-size key/value products.
"""

from __future__ import annotations

from typing import Any

import torch

from minigpt_cli.errors import UserError
from minigpt_cli.model.gpt import GPTConfig
from minigpt_cli.model.layers import mlp_hidden


def valid_eps(value: Any) -> bool:
    """A norm epsilon minigpt can hold: a number in (0, 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1


def is_llama(cfg: GPTConfig) -> bool:
    return (cfg.norm, cfg.position, cfg.mlp, cfg.qk_norm) == ("rmsnorm", "rotary", "swiglu",
                                                              False)


def llama_config(cfg: GPTConfig, eot: int) -> dict[str, Any]:
    """config.json for LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd,
        "intermediate_size": mlp_hidden(cfg.mlp, cfg.n_embd, cfg.mlp_hidden),
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout, "tie_word_embeddings": True,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": eot, "eos_token_id": eot,
    }


def to_llama(tensors: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """minigpt names and layouts to LlamaForCausalLM's."""
    C, H = cfg.n_embd, mlp_hidden(cfg.mlp, cfg.n_embd, cfg.mlp_hidden)
    out = {"model.embed_tokens.weight": tensors["wte.weight"],
           "model.norm.weight": tensors["ln_f.weight"]}
    for i in range(cfg.n_layer):
        src, dst = f"h.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = tensors[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = tensors[src + "ln_2.weight"]
        pieces = {"self_attn.q_proj": ("attn.c_attn", 0, C), "self_attn.k_proj":
                  ("attn.c_attn", C, 2 * C), "self_attn.v_proj": ("attn.c_attn", 2 * C, 3 * C),
                  "self_attn.o_proj": ("attn.c_proj", 0, C), "mlp.gate_proj": ("mlp.c_fc", 0, H),
                  "mlp.up_proj": ("mlp.c_fc", H, 2 * H), "mlp.down_proj": ("mlp.c_proj", 0, C)}
        for name, (mine, lo, hi) in pieces.items():
            out[f"{dst}{name}.weight"] = tensors[f"{src}{mine}.weight"][:, lo:hi].T.contiguous()
            if cfg.bias:
                out[f"{dst}{name}.bias"] = tensors[f"{src}{mine}.bias"][lo:hi].contiguous()
    return out


def read_config(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """minigpt ModelConfig fields for a LlamaForCausalLM config.json, or a clear refusal."""
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "max_position_embeddings")
    lacking = [k for k in need if not isinstance(hf.get(k), int) or isinstance(hf.get(k), bool)
               or hf[k] < 1]
    if lacking:
        raise UserError(f"{where} has no valid {', '.join(lacking)}: is it a complete Llama "
                        "config?")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    kv = hf.get("num_key_value_heads") or heads
    checks = [
        (hf.get("hidden_act", "silu") == "silu", f"hidden_act '{hf.get('hidden_act')}'"),
        (valid_eps(hf.get("rms_norm_eps", 1e-5)), f"rms_norm_eps {hf.get('rms_norm_eps')}"),
        (not hf.get("rope_scaling"), "rope_scaling"),
        (hf.get("tie_word_embeddings", False), "an untied output head"),
        (width % heads == 0 and hf.get("head_dim", width // heads) == width // heads,
         f"head_dim {hf.get('head_dim')} (not hidden_size / heads)"),
        (isinstance(kv, int) and heads % kv == 0, f"num_key_value_heads {kv}"),
        (bool(hf.get("attention_bias", False)) == bool(hf.get("mlp_bias", False)),
         "biases on attention but not the MLP (or the reverse)"),
    ]
    for ok, what in checks:
        if not ok:
            raise UserError(f"{where}: {what} is not supported by minigpt's Llama")
    return {"n_layer": hf["num_hidden_layers"], "n_head": heads, "n_embd": width,
            "block_size": hf["max_position_embeddings"], "dropout": 0.0,
            "bias": bool(hf.get("attention_bias", False)), "norm": "rmsnorm",
            "position": "rotary", "mlp": "swiglu", "qk_norm": False,
            "rope_theta": float(hf.get("rope_theta", 10000.0)),
            "mlp_hidden": hf["intermediate_size"], "norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
            "kv_heads": kv}


def from_llama(tensors: dict[str, torch.Tensor], fields: dict[str, Any]
               ) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's names and layouts to minigpt's (key/value heads repeated for GQA)."""
    heads, kv, width = fields["n_head"], fields["kv_heads"], fields["n_embd"]
    dim, group = width // heads, heads // kv

    def repeat(w: torch.Tensor) -> torch.Tensor:  # [kv * dim, ...] -> [heads * dim, ...]
        return w.reshape(kv, dim, *w.shape[1:]).repeat_interleave(group, 0).reshape(
            heads * dim, *w.shape[1:])

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"the Llama weights have no {name}")
        return tensors[name]

    out = {"wte.weight": get("model.embed_tokens.weight"), "ln_f.weight": get("model.norm.weight")}
    for i in range(fields["n_layer"]):
        src, dst = f"model.layers.{i}.", f"h.{i}."
        out[dst + "ln_1.weight"] = get(src + "input_layernorm.weight")
        out[dst + "ln_2.weight"] = get(src + "post_attention_layernorm.weight")
        for kind in ("weight", "bias") if fields["bias"] else ("weight",):
            q, k, v = (get(f"{src}self_attn.{n}_proj.{kind}") for n in "qkv")
            fused = {"attn.c_attn": torch.cat([q, repeat(k), repeat(v)]),
                     "attn.c_proj": get(f"{src}self_attn.o_proj.{kind}"),
                     "mlp.c_fc": torch.cat([get(f"{src}mlp.gate_proj.{kind}"),
                                            get(f"{src}mlp.up_proj.{kind}")]),
                     "mlp.c_proj": get(f"{src}mlp.down_proj.{kind}")}
            for mine, t in fused.items():  # nn.Linear's [out, in] -> minigpt's [in, out]
                out[f"{dst}{mine}.{kind}"] = t.T.contiguous() if kind == "weight" else t
    return out
