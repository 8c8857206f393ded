"""A Hugging Face byte-level BPE tokenizer.json, imported as a tiktoken encoding, gives the ids
the `tokenizers` library gives; a Llama folder that brings one imports, generates and
fine-tunes on it; what cannot be reproduced exactly is refused in one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from minigpt_cli import tokenizer as tok
from minigpt_cli.convert.hf import export_hf, import_hf
from minigpt_cli.errors import UserError
from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.tokenizer import hf as hf_tokenizer
from tests.conftest import fine_tune_imported

WORDS = ["the", "quick", "brown", "fox", "don't", "it's", "we'll", "2024", "3.14159", "x=1+2",
         "café", "naïve", "日本語", "🙂", "tabs\tdouble", "", "spaces\n\nnew", "lines", "def",
         "f(x):\n", "", "", "", "return", "x**2", "#", "ok"]
GPT4_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
              r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama3": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(n)]


def _trained(kind: str, path: Path, vocab: int = 500) -> Tokenizer:
    """A small byte-level BPE trained by `tokenizers` itself, special tokens first (ids 0, 1)
    as SmolLM's are, saved as tokenizer.json."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = PRE_TOKENIZERS[kind]()
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(_texts(300), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[tok.EOT, "<|im_start|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    t.save(str(path / "tokenizer.json"))
    return t


@pytest.mark.parametrize("kind", sorted(PRE_TOKENIZERS))
def test_same_ids_as_the_tokenizers_library(tmp_path: Path, kind: str) -> None:
    ref = _trained(kind, tmp_path)
    enc = hf_tokenizer.read(tmp_path / "tokenizer.json")
    edge = ["  leading", "trailing   ", "a  1", "a 12 b", "x\n\n  y", "12345 678", "I'm",
            "\u00a0nbsp", "", " ", "1 2  3", f"one{tok.EOT}two", "unseen: ĳ ﬁ Ω 𝔘"]
    merged = 0
    for text in _texts(60, seed=1) + edge:
        ids = tok.encode(enc, text)
        assert ids == ref.encode(text).ids, (kind, text)
        assert enc.decode(ids) == text
        merged += sum(i > 257 for i in ids)
    assert merged > 100  # the merges really ran, not only single bytes
    assert enc.eot_token == 0 and enc.n_vocab == ref.get_vocab_size()


def _break(path: Path, change) -> None:
    spec = json.loads(path.read_text())
    change(spec)
    path.write_text(json.dumps(spec))


def _swap_merge_ids(spec: dict) -> None:
    """Two merged tokens trade ids: the merge order no longer follows the ids."""
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    a, b = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges[:2])
    vocab[a], vocab[b] = vocab[b], vocab[a]


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}),
     "byte-level BPE"),
    (lambda s: s.update(normalizer={"type": "NFKC"}), "normalizer"),
    (lambda s: s["pre_tokenizer"].update(add_prefix_space=True), "prefix space"),
    (lambda s: s.update(added_tokens=[t for t in s["added_tokens"] if t["id"] != 0]),
     "<|endoftext|>"),
    (_swap_merge_ids, "merge order"),
    (lambda s: s["model"].update(type="WordPiece"), "not a BPE"),
])
def test_what_cannot_be_exact_is_refused(tmp_path: Path, change, fragment: str) -> None:
    _trained("gpt2", tmp_path)
    _break(tmp_path / "tokenizer.json", change)
    with pytest.raises(UserError, match=fragment):
        hf_tokenizer.read(tmp_path / "tokenizer.json")


def test_a_llama_folder_with_its_tokenizer_imports_generates_and_fine_tunes(
        tmp_path: Path) -> None:
    """SmolLM's case: a Llama folder from elsewhere with its own tokenizer.json. The imported
    run encodes as that tokenizer does, generates, and `train --resume` fine-tunes it on a
    user's text with the same ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_dir = tmp_path / "hf"
    ref = _trained("smollm", hf_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=ref.get_vocab_size(), hidden_size=48, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0)).save_pretrained(hf_dir)
    run = tmp_path / "run"
    import_hf(hf_dir, run)
    model, enc, _, _ = load_for_inference(str(run), "cpu", "float32")
    text = "def f(x): return 2024 * x"
    assert tok.encode(enc, text) == ref.encode(text).ids
    out, _ = generate(model, enc, [tok.encode(enc, text)], SamplerSettings(temperature=0), 6)
    assert len(out[0].tokens) >= 1

    corpus = tmp_path / "mine.txt"
    corpus.write_text("\n".join(_texts(80, seed=2)))
    summary, meta, moved, _ = fine_tune_imported(run, corpus)
    assert summary.step == 3 and moved
    assert meta["tokenizer"]["special_tokens"] == {tok.EOT: 0, "<|im_start|>": 1}
    again = tok.load(meta["tokenizer"], run)
    assert tok.encode(again, text) == ref.encode(text).ids

    # Exported again, the folder's tokenizer.json gives AutoTokenizer the same ids, specials
    # at their own ids (the converter alone would number them after the merges).
    from transformers import AutoTokenizer

    export_hf(run, tmp_path / "out")
    auto = AutoTokenizer.from_pretrained(tmp_path / "out")
    for probe in (text, f"{tok.EOT}a  1 22<|im_start|>"):
        assert auto(probe)["input_ids"] == ref.encode(probe).ids
