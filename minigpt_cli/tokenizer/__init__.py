"""Every tokenizer is a `tiktoken.Encoding`: trained BPE, raw bytes, or one of tiktoken's own.

A trained tokenizer is saved beside the weights as a `.tiktoken` ranks file plus a JSON
description (pattern, special tokens), so a checkpoint carries everything `generate` needs.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tiktoken

from minigpt_cli.errors import UserError

EOT = "<|endoftext|>"
# GPT-4's split pattern, which rustbpe uses by default: words, numbers in groups of 3, punctuation.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TIKTOKEN_KINDS = ("gpt2", "r50k_base", "cl100k_base", "o200k_base")
TOKENIZER_FILE = "tokenizer.tiktoken"
JSON_FILE = "tokenizer.json"  # kind hf: the file itself (tokenizer_json.py)


def _encoding(name: str, ranks: dict[bytes, int], pattern: str) -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
    )


def byte_encoding() -> tiktoken.Encoding:
    """256 single-byte tokens and no merges: the character-level baseline that never fails."""
    return _encoding("byte", {bytes([i]): i for i in range(256)}, SPLIT_PATTERN)


def tiktoken_encoding(kind: str) -> tiktoken.Encoding:
    """One of tiktoken's published encodings; offline it needs TIKTOKEN_CACHE_DIR."""
    try:
        enc = tiktoken.get_encoding(kind)
    except Exception as e:  # network errors come in many types (requests, urllib, ssl)
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "(unset)")
        raise UserError(
            f"could not load tiktoken encoding '{kind}' ({type(e).__name__}); offline, set "
            f"TIKTOKEN_CACHE_DIR to a folder holding its files (now: {cache})"
        ) from None
    if EOT not in enc.special_tokens_set:
        # cl100k/o200k have <|endoftext|> already; keep the contract for any future kind.
        raise UserError(f"tiktoken encoding '{kind}' has no {EOT} token")
    return enc


def train_bpe(texts: Iterable[str], vocab_size: int) -> tiktoken.Encoding:
    """Learn byte-level BPE merges with rustbpe, then hand the ranks to tiktoken to encode."""
    import rustbpe

    trainer = rustbpe.Tokenizer()
    # One id is reserved for <|endoftext|>, so the merges stop one short of vocab_size.
    trainer.train_from_iterator(iter(texts), vocab_size - 1, pattern=SPLIT_PATTERN)
    ranks = dict(trainer.get_mergeable_ranks())
    return _encoding("bpe", ranks, SPLIT_PATTERN)


def describe(enc: tiktoken.Encoding, kind: str, chat: dict[str, str] | None = None
             ) -> dict[str, Any]:
    """A JSON-able description stored with a checkpoint; `load` reverses it. `chat`: the
    run's chat template and its tokens (tokenizer/chat.py), where it has one."""
    desc: dict[str, Any] = {"kind": kind, "n_vocab": enc.n_vocab, "eot_id": enc.eot_token}
    if kind == "bpe":
        desc.update(file=TOKENIZER_FILE, pattern=enc._pat_str, special_tokens=enc._special_tokens)
    elif kind == "hf":
        desc.update(file=JSON_FILE)
    else:
        added = {t: i for t, i in enc._special_tokens.items() if t not in _named(kind)}
        if added:
            desc["added_tokens"] = added
    if chat is not None:
        desc["chat"] = chat
    return desc


@functools.cache
def _named(kind: str) -> dict[str, int]:
    """The special tokens a named encoding has of itself."""
    return dict(build(kind)._special_tokens)


def with_tokens(enc: tiktoken.Encoding, tokens: Iterable[str]) -> tiktoken.Encoding:
    """`enc` with special tokens added after its last id (those it lacks): the chat tokens a
    base model's tokenizer gains for fine-tuning. A model trained on `enc` gains as many
    embedding rows."""
    specials = dict(enc._special_tokens)
    for t in tokens:
        if t not in specials:
            specials[t] = enc.n_vocab + len(specials) - len(enc._special_tokens)
    if len(specials) == len(enc._special_tokens):
        return enc
    return tiktoken.Encoding(name=enc.name, pat_str=enc._pat_str,
                             mergeable_ranks=enc._mergeable_ranks, special_tokens=specials)


def fingerprint(enc: tiktoken.Encoding, kind: str) -> str:
    """A short hash that changes whenever the token ids would; keys the token cache."""
    h = hashlib.sha256(kind.encode())
    if kind == "hf":
        h.update(enc.source.encode())
        return h.hexdigest()[:16]
    h.update(enc._pat_str.encode())
    for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(token)
        h.update(rank.to_bytes(4, "little"))
    h.update(json.dumps(enc._special_tokens, sort_keys=True).encode())
    return h.hexdigest()[:16]


def save_ranks(enc: tiktoken.Encoding, path: Path) -> None:
    """Write merges in tiktoken's own `.tiktoken` format: base64 token, space, rank."""
    from minigpt_cli.files import atomic_write_bytes

    lines = [
        f"{base64.b64encode(tok).decode()} {rank}"
        for tok, rank in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])
    ]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def copy_tokenizer_file(desc: dict[str, Any], src_dir: Path, out_dir: Path) -> None:
    """A trained BPE's ranks file (or an imported tokenizer.json) goes wherever its weights go
    (export-hf, quantize): the weights alone cannot be decoded. Other tokenizers are named,
    not stored."""
    from minigpt_cli.files import atomic_write_bytes

    if desc.get("kind") not in ("bpe", "hf"):
        return
    default = TOKENIZER_FILE if desc["kind"] == "bpe" else JSON_FILE
    name = Path(desc.get("file", default)).name  # never a path a file's metadata names
    src = Path(src_dir) / name
    if src.is_file():
        atomic_write_bytes(Path(out_dir) / name, src.read_bytes())


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"tokenizer file {path} is unreadable or corrupt ({e})") from None
    return ranks


def load_bpe_file(path: Path, pattern: str = SPLIT_PATTERN,
                  special_tokens: dict[str, int] | None = None) -> tiktoken.Encoding:
    """A BPE from its ranks file. minigpt's own put <|endoftext|> after the last merge; one
    imported from a tokenizer.json keeps its special tokens' ids (`special_tokens`)."""
    ranks = _load_ranks(path)
    if special_tokens is None:
        return _encoding("bpe", ranks, pattern)
    return tiktoken.Encoding(name="bpe", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=special_tokens)


def build(kind: str, texts: Iterable[str] | None = None, vocab_size: int = 4096
          ) -> tiktoken.Encoding:
    """Make the encoding for a config; `bpe` trains on `texts` (the training split only)."""
    if kind == "byte":
        return byte_encoding()
    if kind in TIKTOKEN_KINDS:
        return tiktoken_encoding(kind)
    if kind == "bpe":
        if texts is None:
            raise ValueError("training a BPE tokenizer needs texts")
        return train_bpe(texts, vocab_size)
    if kind == "hf":
        raise UserError("tokenizer.kind hf is an imported run's own tokenizer.json: fine-tune "
                        "that run with `minigpt train RUN/config.yaml --resume`")
    raise UserError(f"unknown tokenizer kind '{kind}'")


def load(desc: dict[str, Any], run_dir: Path) -> tiktoken.Encoding:
    """Rebuild the encoding a checkpoint was trained with, from its description."""
    kind = desc.get("kind")
    if kind == "bpe":
        specials = desc.get("special_tokens")
        enc = load_bpe_file(run_dir / desc.get("file", TOKENIZER_FILE), desc["pattern"],
                            specials if isinstance(specials, dict) else None)
    elif kind == "hf":
        from minigpt_cli.tokenizer import json_file as tokenizer_json

        eot = desc.get("eot_id")
        if not isinstance(eot, int):
            raise UserError(f"checkpoint in {run_dir} names a tokenizer.json but no eot_id")
        enc = tokenizer_json.load(run_dir / Path(desc.get("file", JSON_FILE)).name, eot)
    elif kind in ("byte", *TIKTOKEN_KINDS):
        enc = build(kind)
        added = desc.get("added_tokens")
        if isinstance(added, dict) and added:
            enc = with_tokens(enc, sorted(added, key=lambda t: added[t]))
            if any(enc._special_tokens.get(t) != i for t, i in added.items()):
                raise UserError(f"checkpoint in {run_dir} names added tokens at ids this "
                                f"tokenizer cannot give them: {added}")
    else:
        raise UserError(f"checkpoint names an unknown tokenizer kind '{kind}'")
    if "n_vocab" in desc and enc.n_vocab != desc["n_vocab"]:
        raise UserError(f"tokenizer in {run_dir} has {enc.n_vocab} tokens, checkpoint expects "
                        f"{desc['n_vocab']}: the run directory is inconsistent")
    return enc


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Encode user text; a literal <|endoftext|> in it is the special token, as in training."""
    return enc.encode(text, allowed_special={EOT})


def token_byte_lengths(enc: tiktoken.Encoding) -> list[int]:
    """UTF-8 bytes each token stands for (0 for special tokens): the denominator of bits/byte."""
    lengths = [0] * enc.n_vocab
    special = set(enc._special_tokens.values())
    for i in range(enc.n_vocab):
        if i in special:
            continue
        try:
            lengths[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:  # gaps in a vocabulary's id space
            lengths[i] = 0
    return lengths
