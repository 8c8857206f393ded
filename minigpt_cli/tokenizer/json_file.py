"""A Hugging Face `tokenizer.json` that tiktoken cannot run exactly, run by `tokenizers` itself.

hf_tokenizer.py turns a byte-level BPE into a tiktoken encoding, exactly or not at all. Some
tokenizers cannot become one: SentencePiece-style BPE (Llama 2's, TinyLlama's, Mistral's)
merges over characters rather than bytes, marks spaces with "▁", and falls back to <0xNN> byte
tokens only for characters outside its vocabulary; others add a normalizer or a prefix space,
or end documents with a token other than <|endoftext|>. For those the ids come from the
library that defines what the file means, and `JsonTokenizer` offers the part of
`tiktoken.Encoding`'s interface minigpt uses, so the rest of the product does not know which
it holds.

What minigpt needs beyond ids is the bytes each token stands for (streaming text, stop
strings, bits per byte). They follow from the decoder's rules ("▁" is a space, <0xNN> is byte
NN; or GPT-2's byte characters), and every token's are checked against the library's own
`decode` on load: a decoder these rules do not describe is refused in one line.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from minigpt_cli.errors import UserError

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
METASPACE = "▁"


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise UserError("this tokenizer.json is run by Hugging Face's `tokenizers` library, "
                        "which is not installed: pip install 'minigpt[hf]'") from None
    return tokenizers


def _decoder_kinds(spec: dict[str, Any]) -> list[str]:
    dec = spec.get("decoder") or {}
    steps = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    return [s.get("type", "") for s in steps if isinstance(s, dict)]


def _piece_bytes(spec: dict[str, Any], where: str) -> Callable[[str], bytes]:
    """The rule that turns a vocabulary entry into the bytes it stands for, from the decoder."""
    kinds = _decoder_kinds(spec)
    if "ByteLevel" in kinds:
        from minigpt_cli.tokenizer.hf import byte_chars

        chars = byte_chars()
        return lambda piece: bytes(chars[c] for c in piece)
    fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    if "Metaspace" in kinds or "Replace" in kinds:
        def sentencepiece(piece: str) -> bytes:
            byte = BYTE_TOKEN.fullmatch(piece) if fallback else None
            return bytes([int(byte[1], 16)]) if byte else piece.replace(METASPACE, " ").encode()
        return sentencepiece
    raise UserError(f"{where}: decoder {kinds} is neither byte-level nor SentencePiece's "
                    "('▁' for spaces), so minigpt cannot tell which bytes a token stands for")


def _check(tk: Any, table: list[bytes | None], specials: set[int], where: str) -> None:
    """Every token's bytes, as the library decodes it after a plain anchor token (so a
    decoder's "drop the first space" rule does not apply to it). Bytes that are not UTF-8 on
    their own (a lone <0xC3>) cannot be compared as text and rest on the byte rule alone."""
    vocab = tk.get_vocab(with_added_tokens=True)
    anchor = next((vocab[c] for c in "abcdefghijklmnopqrstuvwxyz" if c in vocab), None)
    if anchor is None:
        raise UserError(f"{where}: no single-letter token to check the decoder against")
    head = tk.decode([anchor], skip_special_tokens=False)
    ids = [i for i, b in enumerate(table) if b is not None and i not in specials]
    texts = tk.decode_batch([[anchor, i] for i in ids], skip_special_tokens=False)
    for i, got in zip(ids, texts, strict=True):
        try:
            want = head + table[i].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if got != want:
            raise UserError(f"{where}: token {i} decodes as {got[len(head):]!r}, not "
                            f"{want[len(head):]!r}; minigpt cannot stream it exactly")


class JsonTokenizer:
    """`tokenizers` behind the part of `tiktoken.Encoding`'s interface minigpt uses."""

    def __init__(self, source: str, eot: int, where: str) -> None:
        lib = _tokenizers()
        try:
            self._tk = lib.Tokenizer.from_str(source)
        except Exception as e:  # the library raises its own exception type for bad files
            raise UserError(f"{where}: the tokenizers library cannot load it ({e})") from None
        self.source = source
        self.n_vocab = self._tk.get_vocab_size(with_added_tokens=True)
        if not 0 <= eot < self.n_vocab:
            raise UserError(f"{where}: end-of-text id {eot} is outside its {self.n_vocab} "
                            "tokens")
        self.eot_token = eot
        spec = json.loads(source)
        rule = _piece_bytes(spec, where)
        added = {t["id"]: t["content"] for t in spec.get("added_tokens") or []
                 if isinstance(t, dict) and isinstance(t.get("id"), int)}
        table: list[bytes | None] = [None] * self.n_vocab
        for piece, i in self._tk.get_vocab(with_added_tokens=True).items():
            if 0 <= i < self.n_vocab:
                try:
                    table[i] = added[i].encode() if i in added else rule(piece)
                except KeyError:
                    raise UserError(f"{where}: token {piece!r} has a character that stands "
                                    "for no byte") from None
        # Special tokens by name, as tiktoken keeps them: they count no bytes of text.
        self._special_tokens = {t["content"]: t["id"] for t in spec.get("added_tokens") or []
                                if isinstance(t, dict) and t.get("special")
                                and isinstance(t.get("id"), int)}
        _check(self._tk, table, set(self._special_tokens.values()), where)
        self._bytes = table

    def encode(self, text: str, allowed_special: Any = None) -> list[int]:
        """Ids as the library gives them, without the BOS a post-processor would add (minigpt
        separates documents with the end-of-text token); special tokens written in the text
        are those tokens (tiktoken's allowed_special is the tokenizer's own list here)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def _plain(self) -> Any:
        """A second copy whose special tokens' spellings stay text; only training needs it."""
        plain = _tokenizers().Tokenizer.from_str(self.source)
        plain.encode_special_tokens = True
        return plain

    def encode_ordinary_batch(self, texts: Iterable[str], num_threads: int = 1
                              ) -> list[list[int]]:
        """Training text: a special token's spelling in a document is plain text."""
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, tokens: list[int]) -> str:
        return self._tk.decode(list(tokens), skip_special_tokens=False)

    def decode_single_token_bytes(self, token: int) -> bytes:
        found = self._bytes[token] if 0 <= token < self.n_vocab else None
        if found is None:
            raise KeyError(token)
        return found

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return b"".join(self.decode_single_token_bytes(t) for t in tokens)


def _eot_id(source: str, hf_config: dict[str, Any], where: str) -> int:
    """The token that ends a document: the model's eos_token_id, else the tokenizer's
    <|endoftext|> or </s>."""
    eos = hf_config.get("eos_token_id")
    if isinstance(eos, list) and eos:
        eos = eos[0]
    if isinstance(eos, int) and not isinstance(eos, bool):
        return eos
    try:
        added = json.loads(source).get("added_tokens") or []
    except (json.JSONDecodeError, AttributeError):
        added = []
    for name in ("<|endoftext|>", "</s>"):
        for t in added:
            if isinstance(t, dict) and t.get("content") == name and isinstance(t.get("id"), int):
                return t["id"]
    raise UserError(f"{where}: no eos_token_id in config.json and no <|endoftext|> or </s> "
                    "token, so minigpt cannot tell where a document ends")


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is unreadable ({e})") from None


def load(path: Path, eot: int) -> JsonTokenizer:
    """A run's stored tokenizer.json, with the end-of-text id its checkpoint records."""
    return JsonTokenizer(_read(path), eot, str(path))


def import_file(path: Path, hf_config: dict[str, Any]) -> JsonTokenizer:
    """A Hugging Face folder's tokenizer.json, read once; documents end with its model's
    eos_token_id (config.json), else the tokenizer's <|endoftext|> or </s>."""
    source = _read(path)
    return JsonTokenizer(source, _eot_id(source, hf_config, str(path)), str(path))
