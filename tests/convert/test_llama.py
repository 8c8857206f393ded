"""Llama parity with Hugging Face transformers: a rotary + RMSNorm + SwiGLU run exports as a
LlamaForCausalLM folder that transformers loads and agrees with (logits, greedy text), round
trips bit for bit, and a SmolLM-shaped folder (grouped-query attention, its own MLP width)
imports with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minigpt_cli import tokenizer as tok
from minigpt_cli.convert.hf import export_hf, import_hf
from minigpt_cli.errors import UserError
from minigpt_cli.inference.generate import Decoder, generate
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPT, GPTConfig

LLAMA = {"norm": "rmsnorm", "position": "rotary", "mlp": "swiglu"}


def _run(tmp_path: Path, bias: bool = False, **arch: object) -> Path:
    """A random Llama-shaped minigpt run (byte tokenizer), every tensor made to matter."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=257, block_size=64, n_layer=2, n_head=4, n_embd=32, bias=bias,
                    rope_theta=500.0, **{**LLAMA, **arch})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm gains (ones) and biases (zeros) made non-trivial
                p.add_(torch.randn_like(p) * 0.2)
    run = tmp_path / "run"
    run.mkdir()
    store.save_model(run / store.MODEL_FILE, model, {
        "model_config": vars(cfg), "tokenizer": tok.describe(tok.byte_encoding(), "byte")})
    return run


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("bias", "eps"), [(False, 1e-5), (True, 1e-5), (False, 1e-3)])
def test_export_loads_in_transformers_and_matches(tmp_path: Path, bias: bool, eps: float
                                                  ) -> None:
    run = _run(tmp_path, bias=bias, norm_eps=eps)
    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 96
    assert config["rms_norm_eps"] == eps
    hf, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    hf.eval()
    ours, _ = store.load_model(run / store.MODEL_FILE)
    ids = _ids(3, 40, 1)
    with torch.no_grad():
        ref = hf(ids).logits
        got, _ = ours(ids)
    assert (ref - got).abs().max().item() < 1e-4
    prompt = ids[0, :8]
    with torch.no_grad():
        hf_text = hf.generate(prompt[None], max_new_tokens=30, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    mine, _ = generate(ours, tok.byte_encoding(), [prompt.tolist()],
                       SamplerSettings(temperature=0.0), 30)
    assert mine[0].tokens == hf_text


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    run = _run(tmp_path, bias=True)
    import_hf(export_hf(run, tmp_path / "hf"), tmp_path / "back")
    a, _ = store.load_safetensors(run / store.MODEL_FILE)
    b, _ = store.load_safetensors(tmp_path / "back" / store.MODEL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, meta = store.load_model(tmp_path / "back" / store.MODEL_FILE)
    assert meta["tokenizer"]["kind"] == "byte" and meta["model_config"]["mlp"] == "swiglu"


def _smollm_folder(path: Path, eps: float = 1e-5) -> LlamaForCausalLM:
    """SmolLM's shape in small: 6 query heads sharing 2 key/value heads, an MLP width of its
    own, tied embeddings; minigpt's byte tokenizer recorded as minigpt's export does."""
    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=257, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=eps, rope_theta=10000.0, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["minigpt_tokenizer"] = tok.describe(tok.byte_encoding(), "byte")
    (path / "config.json").write_text(json.dumps(config))
    return hf


# 1e-6 is Llama 2's and Qwen's; 1e-3 against activations of variance ~4e-4 moves every logit,
# so a model that ignored the folder's epsilon fails.
@pytest.mark.parametrize("eps", [1e-5, 1e-6, 1e-3])
def test_smollm_shaped_folder_imports_with_the_same_logits(tmp_path: Path, eps: float) -> None:
    hf = _smollm_folder(tmp_path / "hf", eps)
    import_hf(tmp_path / "hf", tmp_path / "run")
    ours, _ = store.load_model(tmp_path / "run" / store.MODEL_FILE)
    assert ours.config.mlp_hidden == 80 and ours.config.n_head == 6
    assert ours.config.norm_eps == eps
    ids = _ids(2, 30, 4)
    with torch.no_grad():
        ref = hf(ids).logits
        got, _ = ours(ids)
    assert (ref - got).abs().max().item() < 1e-4
    decoder = Decoder(ours, [ids[0, :10].tolist()])  # cached steps, keys stored rotated
    worst = (decoder.logits()[0] - ref[0, 9]).abs().max().item()
    for t in range(10, 30):
        decoder.append([int(ids[0, t])])
        worst = max(worst, (decoder.logits()[0] - ref[0, t]).abs().max().item())
    assert worst < 1e-4


def test_llama_refusals(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="neither GPT-2's architecture nor Llama's"):
        export_hf(_run(tmp_path, qk_norm=True), tmp_path / "hf")
    _smollm_folder(tmp_path / "foreign")
    config = json.loads((tmp_path / "foreign" / "config.json").read_text())
    del config["minigpt_tokenizer"]
    (tmp_path / "foreign" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="tokenizer"):
        import_hf(tmp_path / "foreign", tmp_path / "out1")
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    config["minigpt_tokenizer"] = tok.describe(tok.byte_encoding(), "byte")
    (tmp_path / "foreign" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="rope_scaling"):
        import_hf(tmp_path / "foreign", tmp_path / "out2")
