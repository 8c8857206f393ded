"""A minigpt tokenizer as GGUF's `gpt2`-model vocabulary: what llama.cpp needs to split text into
the ids minigpt's tiktoken gives.

llama.cpp runs byte-level BPE from three things: the token strings (each token's bytes written
in GPT-2's printable byte alphabet), the merges in priority order, and a named pre-tokenizer
(the regex that splits text before BPE). tiktoken merges the adjacent pair whose joined token
has the lowest rank; llama.cpp merges the pair listed first. The two agree when the merges are
listed in the rank order of the tokens they make, which is how they are written here.

llama.cpp knows pre-tokenizers by name, not by regex, so only a split pattern it has a name for
exports: GPT-2's (`gpt-2`) and GPT-4's, which minigpt's own BPE uses and llama.cpp runs for
Llama 3 (`llama-bpe`). Any other is refused rather than exported to tokenize differently.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import tiktoken

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError

NORMAL, CONTROL, UNUSED = 1, 3, 5  # llama.cpp's token types (gguf.TokenType)

_GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$"""
                 r"""|\s+(?!\S)|\s""")
_CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}"""
                   r"""\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PRE_TOKENIZERS = {_GPT2_PATTERN: "gpt-2", tok.SPLIT_PATTERN: "llama-bpe",
                  _CL100K_PATTERN: "llama-bpe"}


@dataclass(frozen=True)
class Vocab:
    """Everything the GGUF's `tokenizer.ggml.*` keys hold."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte: printable Latin-1 bytes stand for themselves,
    the rest map to code points from 256 up, so every token is a visible string."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _printable(token: bytes) -> str:
    alphabet = _byte_alphabet()
    return "".join(alphabet[b] for b in token)


def _halves(token: bytes, ranks: dict[bytes, int], rank: int) -> tuple[bytes, bytes] | None:
    """The merge that makes `token`: BPE on its bytes with only the merges ranked before it
    ends in two pieces, or the token is never made by merging (then None)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            return None
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def merges(ranks: dict[bytes, int]) -> list[str]:
    """The merges, in the rank order of the tokens they make, as llama.cpp's "left right"."""
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        pair = _halves(token, ranks, rank)
        if pair is not None:
            out.append(f"{_printable(pair[0])} {_printable(pair[1])}")
    return out


def pre_tokenizer(enc: tiktoken.Encoding, kind: str) -> str:
    """llama.cpp's name for the encoding's split pattern, or a one-line refusal."""
    if kind == "hf":
        raise UserError("this run's tokenizer is an imported tokenizer.json that is not plain "
                        "byte-level BPE; llama.cpp could not reproduce it from a GGUF written "
                        "here (export-hf, then llama.cpp's convert_hf_to_gguf.py, knows more)")
    name = PRE_TOKENIZERS.get(enc._pat_str)
    if name is None:
        raise UserError(f"llama.cpp has no pre-tokenizer for this run's split pattern "
                        f"({enc._pat_str[:40]}...), so it would split text differently")
    return name


def build(enc: tiktoken.Encoding, kind: str, n_vocab: int) -> Vocab:
    """The vocabulary for a model with `n_vocab` embedding rows (ids past the tokenizer's are
    padding, as llama.cpp's converter writes them: `[PAD<id>]`, unused)."""
    pre = pre_tokenizer(enc, kind)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for token, rank in enc._mergeable_ranks.items():
        if rank < n_vocab:
            tokens[rank], types[rank] = _printable(token), NORMAL
    for text, i in enc._special_tokens.items():
        if i < n_vocab:
            tokens[i], types[i] = text, CONTROL
    return Vocab(pre, tokens, types, merges(enc._mergeable_ranks))


def special_ids(enc: tiktoken.Encoding, chat: dict[str, Any] | None) -> dict[str, int]:
    """bos/eos/eot ids: <|endoftext|> begins and ends text, as in pre-training; a chat run's
    end-of-turn token is its end of generation too."""
    eot = enc.eot_token
    ids = {"bos": eot, "eos": eot}
    if chat and chat.get("eos_token") in enc._special_tokens:
        ids["eot"] = enc._special_tokens[chat["eos_token"]]
    return ids
