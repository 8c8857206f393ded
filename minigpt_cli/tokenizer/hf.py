"""A Hugging Face byte-level BPE `tokenizer.json` as a tiktoken encoding, exactly or not at all.

Why this can be exact: a byte-level BPE (GPT-2's, SmolLM's, Llama 3's kind) maps every byte to
a printable character, learns merges over those characters, and numbers its tokens in merge
order. tiktoken's algorithm merges the adjacent pair whose joined token has the lowest rank, so
with rank = the Hugging Face id it merges in the same order, and the ids are the same ids: the
model's embedding rows need no permutation. What makes that true is checked on the way in
(every byte a token; each merge's result numbered after its parts and after the merges before
it); a tokenizer that breaks it, or needs a pre-tokenizer, normalizer or model that one split
pattern cannot express, is refused in one line rather than imported approximately.

Pre-tokenizers that become one pattern: `ByteLevel` with its own regex (GPT-2's split);
`Split(Regex, Isolated)` then `ByteLevel` without regex (Llama 3's kind); `Digits(individual
digits)` then `ByteLevel` (SmolLM's, StarCoder's): each digit alone, GPT-2's split between.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tiktoken

from minigpt_cli.errors import UserError
from minigpt_cli.tokenizer import EOT

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same split with every digit its own piece: `\p{N}` alone, and whitespace may end before a
# digit as it would at the end of a piece (Digits cuts the text there before ByteLevel splits).
DIGITS_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                  r"""|\s+(?![^\s\p{N}])|\s+""")


def byte_chars() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, reversed: character -> byte. Printable Latin-1
    bytes stand for themselves; the rest take code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _pattern(pre: Any, where: str) -> str:
    """The one regex a pre-tokenizer amounts to, or a refusal naming what it does instead."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get(
        "type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    last = steps[-1] if steps and isinstance(steps[-1], dict) else {}
    if kinds[-1:] != ["ByteLevel"] or last.get("add_prefix_space", False):
        raise UserError(f"{where}: pre-tokenizer {kinds} is not a byte-level BPE's without a "
                        "prefix space; minigpt imports byte-level BPE tokenizers only")
    regex = last.get("use_regex", True)
    if kinds == ["ByteLevel"] and regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and regex and steps[0].get("individual_digits"):
        return DIGITS_PATTERN
    split = steps[0] if kinds == ["Split", "ByteLevel"] and not regex else {}
    if (isinstance(split.get("pattern"), dict) and "Regex" in split["pattern"]
            and split.get("behavior") == "Isolated" and not split.get("invert")):
        return split["pattern"]["Regex"]
    raise UserError(f"{where}: pre-tokenizer {kinds} has no single split pattern minigpt can "
                    "run exactly")


def _ranks(model: dict[str, Any], specials: set[int], where: str) -> dict[bytes, int]:
    """Token bytes -> id, checked so that tiktoken's merge order is the tokenizer's own."""
    chars = byte_chars()
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise UserError(f"{where}: the BPE model has no vocab")
    ranks: dict[bytes, int] = {}
    for text, i in vocab.items():
        if i in specials:
            continue
        try:
            ranks[bytes(chars[c] for c in text)] = i
        except KeyError:
            raise UserError(f"{where}: token {text!r} is not byte-level (no byte stands for "
                            "one of its characters)") from None
    if len(set(ranks.values())) != len(ranks):
        raise UserError(f"{where}: two tokens share an id")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{where}: not every byte is a token, so some text cannot be encoded")
    last = -1
    for merge in model.get("merges") or []:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        left, right = (bytes(chars[c] for c in part) for part in (a, b))
        joined = ranks.get(left + right)
        if joined is None or joined <= max(ranks.get(left, -1), ranks.get(right, -1), last):
            raise UserError(f"{where}: merge {a!r} + {b!r} is not numbered after its parts "
                            "and the merges before it, so ids are not in merge order")
        last = joined
    return ranks


def read(path: Path) -> tiktoken.Encoding:
    """The tiktoken encoding that produces the same ids as the `tokenizer.json` at `path`."""
    where = str(path)
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where} is unreadable or not JSON ({e})") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise UserError(f"{where}: not a BPE tokenizer; minigpt imports byte-level BPE only")
    if spec.get("normalizer") or model.get("dropout") or model.get(
            "continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UserError(f"{where}: a normalizer, BPE dropout or word affixes change the text "
                        "before or during merging; minigpt cannot reproduce them")
    pattern = _pattern(spec.get("pre_tokenizer"), where)
    added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []
             if isinstance(t, dict) and t.get("special")}
    if EOT not in added:
        raise UserError(f"{where}: no {EOT} special token, which minigpt uses to end and "
                        "separate documents")
    ranks = _ranks(model, set(added.values()), where)
    return tiktoken.Encoding(name="bpe", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=added)
