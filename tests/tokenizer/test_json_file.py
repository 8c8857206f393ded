"""A tokenizer.json tiktoken cannot run (Llama 2's SentencePiece-style BPE with byte fallback)
is run by the `tokenizers` library: the same ids, text streamed from token bytes that agree
with the library's decode, and a Llama folder that brings one imports, generates, fine-tunes
and exports again."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from minigpt_cli import tokenizer as tok
from minigpt_cli.config import config_from_dict
from minigpt_cli.convert.hf import export_hf, import_hf
from minigpt_cli.errors import UserError
from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.tokenizer.json_file import JsonTokenizer
from minigpt_cli.training.loop import train
from tests.conftest import fine_tune_imported

WORDS = ["the", "quick", "brown", "fox", "don't", "it's", "2024", "3.14159", "x=1+2", "café",
         "naïve", "tabs\tdouble", "", "spaces\n\nnew", "lines", "def", "f(x):\n", "return",
         "x**2", "#", "ok", "Über", "straße"]
# Never in the training text: their characters are outside the vocabulary, so they come out
# as <0xNN> byte tokens (a character of 2, 3 and 4 UTF-8 bytes).
UNSEEN = ["日本語", "🙂 and Ω", "ĳ ﬁ 𝔘", "ç"]
SPECIALS = ["<unk>", "<s>", "</s>"]


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(25)) for _ in range(n)]


def _llama2(path: Path, legacy: bool = True, vocab: int = 700) -> Tokenizer:
    """Llama 2's kind in small: BPE over characters with byte fallback (ids 3..258 are
    <0x00>..<0xFF>), spaces as "▁" and one prepended, <s> and </s> special. Trained with a
    Metaspace split; `legacy` then swaps it for the normalizer form older Llama files have."""
    t = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    t.train_from_iterator(_texts(300), trainers.BpeTrainer(
        vocab_size=vocab, show_progress=False,
        special_tokens=[*SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]))
    if legacy:
        t.pre_tokenizer = None
        t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                             normalizers.Replace(" ", "▁")])
    spec = json.loads(t.to_str())  # as in Llama's file, the byte tokens are vocabulary, not
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] in SPECIALS]  # added
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return Tokenizer.from_file(str(path / "tokenizer.json"))


@pytest.mark.parametrize("legacy", [True, False], ids=["normalizer", "metaspace"])
def test_ids_and_streamed_bytes_agree_with_the_library(tmp_path: Path, legacy: bool) -> None:
    ref = _llama2(tmp_path, legacy)
    enc = JsonTokenizer((tmp_path / "tokenizer.json").read_text(), 2, "t")
    fallback = 0
    for text in [*_texts(40, seed=1), *UNSEEN, "  two leading", "end </s> mid", ""]:
        ids = tok.encode(enc, text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert enc.decode(ids) == ref.decode(ids, skip_special_tokens=False)
        fallback += sum(3 <= i < 259 for i in ids)
        # What streaming joins, token by token: the text with the one space SentencePiece
        # puts in front (the library's decoder drops it; a continuation keeps it). The old
        # normalizer always adds it, Metaspace only before a text that has none. A special
        # token splits the text, and each part gets its own "▁": the library's rule.
        front = "" if not ids or (not legacy and text.startswith(" ")) else " "
        if "</s>" not in text:
            assert enc.decode_bytes(ids).decode() == front + text
    assert fallback >= 10
    assert tok.encode(enc, "a </s>")[-1] == 2  # a special token written in a prompt
    assert 2 not in enc.encode_ordinary_batch(["a </s>"])[0]  # ...but not in training text
    assert enc.n_vocab == ref.get_vocab_size() and enc.eot_token == 2
    lengths = tok.token_byte_lengths(enc)
    assert lengths[3 + 0xC3] == 1 and lengths[ref.token_to_id("▁the")] == 4
    assert lengths[2] == 0 and tok.token_byte_lengths(enc)[ref.token_to_id("é")] == 2


def test_a_decoder_the_byte_rules_do_not_describe_is_refused(tmp_path: Path) -> None:
    _llama2(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["decoder"]["decoders"][0]["content"] = "_"  # "▁" decodes as "_", not a space
    with pytest.raises(UserError, match="decodes as"):
        JsonTokenizer(json.dumps(spec), 2, "t")
    spec["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    with pytest.raises(UserError, match="neither byte-level nor SentencePiece"):
        JsonTokenizer(json.dumps(spec), 2, "t")
    with pytest.raises(UserError, match="outside its"):
        JsonTokenizer((tmp_path / "tokenizer.json").read_text(), 10**6, "t")


def test_without_the_tokenizers_library_the_error_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _llama2(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)
    with pytest.raises(UserError, match=r"pip install 'minigpt\[hf\]'"):
        JsonTokenizer((tmp_path / "tokenizer.json").read_text(), 2, "t")


def _llama_folder(path: Path) -> tuple[Tokenizer, Any]:
    """A Llama-2-shaped folder from elsewhere: random weights, its own tokenizer.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = _llama2(path)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=ref.get_vocab_size(), hidden_size=48, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)).eval()
    hf.save_pretrained(path)
    return ref, hf


def test_a_llama2_folder_imports_generates_fine_tunes_and_exports(tmp_path: Path) -> None:
    ref, hf = _llama_folder(tmp_path / "hf")
    run = tmp_path / "run"
    import_hf(tmp_path / "hf", run)
    model, enc, meta, _ = load_for_inference(str(run), "cpu", "float32")
    assert meta["tokenizer"] == {"kind": "hf", "n_vocab": ref.get_vocab_size(), "eot_id": 2,
                                 "file": "tokenizer.json"}
    prompt = tok.encode(enc, "the quick 日本語")
    out, _ = generate(model, enc, [prompt], SamplerSettings(temperature=0), 12)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ids = out[0].tokens
    assert ids and ids == want[:len(ids)] and (len(ids) == 12 or ids[-1] == 2)
    assert out[0].text == enc.decode_bytes(ids).decode("utf-8", errors="replace").removesuffix(
        "</s>")

    corpus = tmp_path / "mine.txt"
    corpus.write_text("\n".join(_texts(80, seed=2)))
    summary, meta, moved, cfg = fine_tune_imported(run, corpus)
    assert summary.step == 3 and moved and cfg["tokenizer"]["kind"] == "hf"
    assert meta["tokenizer"]["kind"] == "hf"
    with pytest.raises(UserError, match="--resume"):  # a fresh run cannot make one
        train(config_from_dict({**cfg, "out_dir": str(tmp_path / "fresh")}))

    out_dir = export_hf(run, tmp_path / "export")
    assert (out_dir / "tokenizer.json").read_text() == (tmp_path / "hf" /
                                                        "tokenizer.json").read_text()
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(out_dir)
    assert auto("the quick 日本語", add_special_tokens=False)["input_ids"] == prompt
    assert auto.eos_token == "</s>"
    import_hf(out_dir, tmp_path / "back")
    _, enc2, meta2, _ = load_for_inference(str(tmp_path / "back"), "cpu", "float32")
    assert meta2["tokenizer"]["kind"] == "hf" and tok.encode(enc2, "ok café") == tok.encode(
        enc, "ok café")


def test_a_byte_level_bpe_without_endoftext_runs_through_the_library(tmp_path: Path) -> None:
    """Llama 3's case: byte-level, but documents end with <|end_of_text|>, not minigpt's
    <|endoftext|>, so tiktoken's conversion refuses it and the library runs it instead."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(_texts(200), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    enc = JsonTokenizer(t.to_str(), 1, "t")
    for text in [*_texts(20, seed=3), *UNSEEN, " lead", ""]:
        ids = tok.encode(enc, text)
        assert ids == t.encode(text).ids and enc.decode_bytes(ids).decode() == text
    assert tok.token_byte_lengths(enc)[1] == 0
