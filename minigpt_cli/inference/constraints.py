"""Structured output: a grammar (a JSON schema, any JSON object, or a regular expression) that
one sequence's tokens must follow, applied as a mask on its logits row.

The grammar engine is llguidance, the one llama.cpp, vLLM and SGLang use: given the tokens so
far it says which next tokens can still lead to a string in the language, and only those keep
their logits; the sampler then draws among them as it would among all. Once the grammar is
complete only an end token is allowed, so a request ends there. The mask is per sequence, so
every row of a batch may follow its own grammar or none; the model's step is untouched
(the fused C step included), and a speculative draft is checked row by row against the same
mask its token would have met. Log-probabilities reported are the model's own, before the mask.

JSON is generated compact (no whitespace between tokens): a model then cannot wander in
blank space, and `json.loads` reads it the same.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import tiktoken
import torch

from minigpt_cli.errors import UserError

KINDS = ("json_schema", "json_object", "regex")
_BITS = torch.arange(32, dtype=torch.int32)


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise UserError("structured output needs llguidance: pip install "
                        "'minigpt[structured]'") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What a request asked its output to be: `kind` one of KINDS; `source` the JSON schema
    (a dict), the regular expression, or None for any JSON object."""

    kind: str
    source: Any = None

    def llguidance_grammar(self) -> str:
        llg = _llguidance()
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(self.source)
        schema = {"type": "object"} if self.kind == "json_object" else self.source
        try:
            return llg.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False})
        except Exception as e:  # ValueError is documented; a request's data may find more
            raise UserError(f"invalid JSON schema: {' '.join(str(e).split())[:300]}") from None


@functools.lru_cache(maxsize=8)
def _tokenizer(enc: tiktoken.Encoding, ends: tuple[int, ...]) -> Any:
    """llguidance's view of a tokenizer (built once per tokenizer and set of end tokens)."""
    from llguidance.tiktoken import lltokenizer_from_encoding

    return lltokenizer_from_encoding(enc, eos_token=list(ends))


class Constraint:
    """One sequence's grammar state: the mask for its next token, and each token it took."""

    def __init__(self, grammar: Grammar, enc: tiktoken.Encoding, ends: tuple[int, ...]) -> None:
        llg = _llguidance()
        source = grammar.llguidance_grammar()
        try:
            lltok = _tokenizer(enc, ends)
        except Exception as e:  # e.g. a tokenizer.json run by the tokenizers library
            raise UserError(f"structured output cannot use this run's tokenizer "
                            f"({type(e).__name__}: {e})") from None
        try:
            self.matcher = llg.LLMatcher(lltok, source, log_level=0)
            error = self.matcher.get_error() if self.matcher.is_error() else ""
        except Exception as e:  # documented never to raise on a bad grammar; guarded anyway
            error = str(e)
        if error:
            raise UserError(f"invalid {grammar.kind.replace('_', ' ')}: "
                            f"{' '.join(error.split())[:300]}")
        self.n_vocab = enc.n_vocab
        self.words = torch.zeros((enc.n_vocab + 31) // 32, dtype=torch.int32)

    def allowed(self, width: int) -> torch.Tensor:
        """A bool row over `width` logits (ids past the tokenizer's are never allowed)."""
        self.matcher.unsafe_compute_mask_ptr(self.words.data_ptr(), self.words.numel() * 4)
        bits = ((self.words[:, None] >> _BITS) & 1).reshape(-1)[: self.n_vocab].bool()
        if width > self.n_vocab:
            bits = torch.cat([bits, bits.new_zeros(width - self.n_vocab)])
        return bits[:width]

    def mask(self, row: torch.Tensor) -> torch.Tensor:
        """`row` [1, V] with every token the grammar forbids at -inf."""
        keep = self.allowed(row.shape[-1]).to(row.device)
        return row.masked_fill(~keep, float("-inf"))

    def copy(self) -> Constraint:
        """Another sequence's state at this point, without compiling the grammar again (the
        n choices of one request each take a copy of one compiled grammar)."""
        twin = object.__new__(Constraint)
        twin.matcher, twin.n_vocab = self.matcher.deep_copy(), self.n_vocab
        twin.words = torch.zeros_like(self.words)
        return twin

    def consume(self, token: int) -> None:
        if not self.matcher.is_stopped() and not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: "
                               f"{self.matcher.get_error()}")


def constraint(grammar: Grammar | None, enc: tiktoken.Encoding, ends: frozenset[int]
               ) -> Constraint | None:
    """A fresh state for one sequence (None: no grammar); a bad grammar is a UserError."""
    if grammar is None:
        return None
    return Constraint(grammar, enc, tuple(sorted(ends)))


def from_response_format(fmt: dict[str, Any] | None) -> Grammar | None:
    """OpenAI's `response_format`: {"type": "text" | "json_object" | "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}; a malformed one is a
    UserError naming what is wrong."""
    if fmt is None or fmt.get("type") == "text":
        return None
    kind = fmt.get("type")
    if kind == "json_object":
        return Grammar("json_object")
    if kind != "json_schema":
        raise UserError("response_format.type must be one of text, json_object, json_schema")
    spec = fmt.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise UserError("response_format.json_schema.schema must be a JSON schema (an object)")
    return Grammar("json_schema", schema)


def from_file(path: str) -> Grammar:
    """`generate --json-schema FILE`."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise UserError(f"--json-schema: cannot read {path} ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--json-schema: {path} is not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise UserError(f"--json-schema: {path} holds no JSON schema (an object)")
    return Grammar("json_schema", schema)
