"""Every tokenizer kind is a tiktoken.Encoding that round-trips any Unicode text exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tiktoken

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from tests.conftest import make_text

SAMPLES = [
    "Hello, world!",
    "Ünïcödé — ça va? 日本語のテキスト, Ελληνικά, עברית",
    "emoji: 👩‍👩‍👧 🎭 ✨ and a flag 🇳🇴",
    "tabs\tand\nnewlines\r\n  spaces   ",
    "",
]

HAS_CACHE = Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent")).is_dir()


def _round_trip(enc: tiktoken.Encoding) -> None:
    for text in SAMPLES:
        assert enc.decode(tok.encode(enc, text)) == text
    with_eot = f"first doc{tok.EOT}second doc"
    ids = tok.encode(enc, with_eot)
    assert enc.eot_token in ids  # the special token is one id, not its characters
    assert enc.decode(ids) == with_eot


def test_byte_round_trip() -> None:
    enc = tok.byte_encoding()
    assert enc.n_vocab == 257 and enc.eot_token == 256
    _round_trip(enc)
    assert tok.encode(enc, "é") == list("é".encode())


def test_bpe_trains_round_trips_and_compresses() -> None:
    text = make_text(200)
    enc = tok.train_bpe([text], 400)
    assert enc.n_vocab <= 400 and enc.eot_token == enc.n_vocab - 1
    _round_trip(enc)
    assert len(enc.encode(text)) < 0.6 * len(text.encode())  # merges were learned


def test_bpe_save_and_load(tmp_path: Path) -> None:
    enc = tok.train_bpe([make_text(100)], 300)
    tok.save_ranks(enc, tmp_path / tok.TOKENIZER_FILE)
    back = tok.load(tok.describe(enc, "bpe"), tmp_path)
    for text in SAMPLES:
        assert back.encode(text) == enc.encode(text)
    assert tok.fingerprint(back, "bpe") == tok.fingerprint(enc, "bpe")


@pytest.mark.skipif(not HAS_CACHE, reason="no offline tiktoken files (TIKTOKEN_CACHE_DIR)")
@pytest.mark.parametrize("kind", ["gpt2", "r50k_base", "cl100k_base"])
def test_tiktoken_kinds_round_trip(kind: str) -> None:
    enc = tok.build(kind)
    _round_trip(enc)


@pytest.mark.skipif(not HAS_CACHE, reason="no offline tiktoken files (TIKTOKEN_CACHE_DIR)")
def test_gpt2_known_ids() -> None:
    assert tok.build("gpt2").encode("Hello world") == [15496, 995]


def test_unavailable_encoding_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    import tiktoken.load

    def offline(*_: object, **__: object) -> bytes:
        raise ConnectionError("no network")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR"):
        tok.tiktoken_encoding("o200k_base")


def test_token_byte_lengths() -> None:
    enc = tok.byte_encoding()
    lengths = tok.token_byte_lengths(enc)
    assert lengths[:256] == [1] * 256 and lengths[256] == 0  # EOT stands for no bytes
