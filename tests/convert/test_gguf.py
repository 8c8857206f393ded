"""GGUF export, checked by ggml's own reader: the file `gguf.GGUFReader` reads back runs, in a
NumPy forward pass written from llama.cpp's conventions (its tensor names, [out, in] matrices,
rotary on adjacent pairs), to minigpt's logits; its vocabulary's merges tokenize as tiktoken
does; a tokenizer llama.cpp cannot reproduce is refused. llama.cpp itself runs the files in
benchmarks/gguf_llama.py (it takes minutes to build)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from minigpt_cli import tokenizer as tok
from minigpt_cli.convert.gguf_export import export_gguf
from minigpt_cli.convert.gguf_vocab import CONTROL, NORMAL, UNUSED
from minigpt_cli.errors import UserError
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPT, GPTConfig
from minigpt_cli.tokenizer.chat import CHAT_TOKENS, default_template

LLAMA = {"norm": "rmsnorm", "position": "rotary", "mlp": "swiglu"}


def _run(tmp_path: Path, enc=None, chat: bool = False, **arch: object) -> Path:
    """A random minigpt run, every tensor made to matter (norm gains and biases not 1 and 0);
    its vocabulary padded past the tokenizer's, as trained runs' often is. `enc`: a BPE
    (saved beside the weights) or, by default, the byte tokenizer."""
    kind = "bpe" if enc is not None and enc.name == "bpe" else "byte"
    enc = enc or tok.byte_encoding()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=enc.n_vocab + 7, block_size=64, n_layer=2, n_head=4, n_embd=64,
                    rope_theta=500.0, norm_eps=1e-4, **arch)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.dim() == 1 else 0.02))
    run = tmp_path / "run"
    run.mkdir(parents=True)
    desc = tok.describe(enc, kind, default_template(tok.EOT).to_dict() if chat else None)
    if kind == "bpe":
        tok.save_ranks(enc, run / tok.TOKENIZER_FILE)
    store.save_model(run / store.MODEL_FILE, model, {"model_config": vars(cfg),
                                                     "tokenizer": desc})
    return run


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _weights(reader: GGUFReader) -> dict[str, np.ndarray]:
    out = {}
    for t in reader.tensors:
        data = dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, np.float64).reshape(tuple(reversed(t.shape.tolist())))
    return out


def _norm(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float) -> np.ndarray:
    if b is None:  # RMSNorm
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal attention over [heads, T, dim]."""
    T = q.shape[1]
    s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return ((p / p.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, -1)


def _rope_pairs(x: np.ndarray, theta: float) -> np.ndarray:
    """llama.cpp's rotary for `llama` (its NORM mode): channels 2j and 2j+1 turn together."""
    T, D = x.shape[1:]
    angle = np.arange(T)[:, None] * theta ** (-np.arange(0, D, 2) / D)[None]
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    """A forward pass over the file's tensors and metadata alone, in float64."""
    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    w, H = _weights(reader), _field(reader, f"{arch}.attention.head_count")
    llama = arch == "llama"
    eps = _field(reader, f"{arch}.attention.layer_norm_{'rms_' if llama else ''}epsilon")
    x = w["token_embd.weight"][ids]
    if not llama:
        x = x + w["position_embd.weight"][: len(ids)]

    def lin(h: np.ndarray, name: str) -> np.ndarray:
        return h @ w[f"{name}.weight"].T + w.get(f"{name}.bias", 0.0)

    def heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(len(ids), H, -1).transpose(1, 0, 2)

    for i in range(_field(reader, f"{arch}.block_count")):
        b = f"blk.{i}."
        h = _norm(x, w[b + "attn_norm.weight"], w.get(b + "attn_norm.bias"), eps)
        if llama:
            theta = _field(reader, "llama.rope.freq_base")
            q, k = (_rope_pairs(heads(lin(h, b + n)), theta) for n in ("attn_q", "attn_k"))
            v = heads(lin(h, b + "attn_v"))
        else:
            q, k, v = (heads(t) for t in np.split(lin(h, b + "attn_qkv"), 3, axis=-1))
        x = x + lin(_attend(q, k, v), b + "attn_output")
        h = _norm(x, w[b + "ffn_norm.weight"], w.get(b + "ffn_norm.bias"), eps)
        if llama:
            g = lin(h, b + "ffn_gate")
            inner = g / (1 + np.exp(-g)) * lin(h, b + "ffn_up")
        else:
            u = lin(h, b + "ffn_up")
            inner = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        x = x + lin(inner, b + "ffn_down")
    x = _norm(x, w["output_norm.weight"], w.get("output_norm.bias"), eps)
    return x @ w.get("output.weight", w["token_embd.weight"]).T


def _minigpt_logits(run: Path, ids: list[int]) -> np.ndarray:
    model, _ = store.load_model(run / store.MODEL_FILE)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].double().numpy()


ARCHS = {"gpt2": {}, "llama": LLAMA, "llama-bias": {**LLAMA, "bias": True}}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_f32_file_runs_to_minigpts_logits(tmp_path: Path, arch: str) -> None:
    run = _run(tmp_path, **ARCHS[arch])
    out = export_gguf(run, tmp_path / "m.gguf", "f32")
    ids = list(b"The quick brown fox, 12 times.")
    ref = _minigpt_logits(run, ids)
    got = gguf_logits(out, ids)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize(("kind", "tol"), [("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 0.1)])
def test_quantized_files_hold_their_types_and_stay_close(tmp_path: Path, kind: str,
                                                         tol: float) -> None:
    run = _run(tmp_path, **LLAMA)
    out = export_gguf(run, tmp_path / "m.gguf", kind)
    reader = GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    expect = {"f16": ("F16", "F16"), "q8_0": ("Q8_0", "Q8_0"), "q4_0": ("Q4_0", "Q8_0")}[kind]
    assert (types["blk.1.ffn_down.weight"], types["token_embd.weight"]) == expect
    ids = list(b"Pack my box with five dozen liquor jugs.")
    ref = _minigpt_logits(run, ids)
    assert np.abs(gguf_logits(out, ids) - ref).max() < tol * np.abs(ref).max()
    f32 = export_gguf(run, tmp_path / "f32.gguf", "f32").stat().st_size
    assert out.stat().st_size < f32 * {"f16": 0.55, "q8_0": 0.32, "q4_0": 0.22}[kind]


def test_vocabulary_tokenizes_as_tiktoken(tmp_path: Path) -> None:
    """The merges, applied llama.cpp's way (the pair listed first merges first) to each piece
    of the split pattern, give tiktoken's ids."""
    text = " ".join(f"the {w} of {w}s, {i}; theirs" for i, w in enumerate(
        ["cat", "catalog", "dog", "dogma", "tokenizer", "token"] * 20))
    enc = tok.train_bpe([text], 300)
    run = _run(tmp_path, enc)
    reader = GGUFReader(export_gguf(run, tmp_path / "m.gguf", "f32"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = {tuple(m.split(" ")): r for r, m in enumerate(_field(reader,
                                                                  "tokenizer.ggml.merges"))}
    assert _field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    ids = {t: i for i, t in enumerate(tokens)}
    alphabet = {b: tokens[enc.encode_single_token(bytes([b]))] for b in range(256)}
    sample = "the tokenizers' catalogs, 1234 dogmas;\n  theirs!"
    got = []
    for piece in regex.findall(enc._pat_str, sample):
        parts = [alphabet[b] for b in piece.encode()]
        while len(parts) > 1:
            ranked = [(merges.get((a, b), 1 << 30), i) for i, (a, b) in
                      enumerate(itertools.pairwise(parts))]
            rank, i = min(ranked)
            if rank == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        got += [ids[p] for p in parts]
    assert got == enc.encode(sample) and len(got) < len(sample.encode())
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[enc.eot_token] == CONTROL and types[0] == NORMAL and types[-1] == UNUSED
    assert len(tokens) == len(types) == enc.n_vocab + 7


def test_chat_template_and_end_of_turn_travel(tmp_path: Path) -> None:
    enc = tok.with_tokens(tok.byte_encoding(), CHAT_TOKENS)
    reader = GGUFReader(export_gguf(_run(tmp_path, enc, chat=True), tmp_path / "m.gguf"))
    assert _field(reader, "tokenizer.chat_template") == default_template(tok.EOT).template
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens[_field(reader, "tokenizer.ggml.eot_token_id")] == "<|end|>"
    assert tokens[_field(reader, "tokenizer.ggml.bos_token_id")] == tok.EOT
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False


def test_refusals_leave_no_file(tmp_path: Path) -> None:
    """(The CLI's one-line form of each is in tests/test_bad_input.py.)"""
    run = _run(tmp_path, norm="rmsnorm")  # neither GPT-2 nor Llama
    with pytest.raises(UserError, match="neither GPT-2"):
        export_gguf(run, tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".m.gguf*")) == []
    made = export_gguf(_run(tmp_path / "ok", **LLAMA), tmp_path / "m.gguf")
    assert made.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as every file minigpt writes
    other = tmp_path / "other"
    other.mkdir()
    run = _run(other, tok._encoding("bpe", {bytes([i]): i for i in range(256)}, r"\S+|\s+"))
    with pytest.raises(UserError, match="pre-tokenizer"):
        export_gguf(run, other / "m.gguf")
    assert not list(other.glob("*.gguf*")), json.dumps([p.name for p in other.iterdir()])
