"""Chat templates, the Hugging Face way: a Jinja2 string that turns a list of messages into the
text a model reads.

The semantics are those of `tokenizer_config.json`'s `chat_template`, so an imported model's own
template renders here the ids `transformers`' `apply_chat_template` gives: the template sees
`messages` (dicts with `role` and `content`), `add_generation_prompt`, `bos_token` and
`eos_token`, and may call `raise_exception`; it runs in Jinja2's immutable sandbox with
`trim_blocks` and `lstrip_blocks`, as `transformers` runs it. The rendered text is then encoded
with its special tokens recognised as such.

minigpt's own tokenizers get four special tokens for chat (a role marker for each role and an
end-of-turn token) and `DEFAULT_TEMPLATE`; a conversation starts with <|endoftext|>, as every
pre-training document does, so a base model sees a chat begin where it saw text begin.

Which tokens a model learns from is found by rendering, not by parsing the template: the
assistant's turn i is the tokens between the rendering of messages[:i] with a generation prompt
and the rendering of messages[:i + 1]. That holds for any template that renders a conversation
prefix by prefix, which `assistant_mask` checks rather than assumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from minigpt_cli.errors import UserError

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN)
DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A run's chat template and the tokens it names: `bos` opens a conversation (may be
    empty), `eos` ends an assistant's turn; generation stops there. Saved in the tokenizer's
    description, as `tokenizer_config.json` keeps `chat_template` beside the tokenizer."""

    template: str
    bos: str
    eos: str

    def to_dict(self) -> dict[str, str]:
        return {"template": self.template, "bos_token": self.bos, "eos_token": self.eos}

    @classmethod
    def from_dict(cls, raw: Any) -> ChatTemplate | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("template"), str):
            return None
        return cls(raw["template"], str(raw.get("bos_token") or ""),
                   str(raw.get("eos_token") or ""))


def default_template(eot: str) -> ChatTemplate:
    return ChatTemplate(DEFAULT_TEMPLATE, eot, END_OF_TURN)


def _raise(message: str) -> None:
    raise UserError(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise UserError(f"the chat template does not parse: {e}") from None


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, str]]:
    """The conversation as the template expects it, or a one-line error naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: a conversation needs a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UserError(f"{where}[{i}] is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"{where}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise UserError(f"{where}[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def render(fmt: ChatTemplate, messages: list[dict[str, str]],
           add_generation_prompt: bool = False) -> str:
    """The text the model reads for `messages` (checked with `check_messages` first). A
    template that fails on a conversation (the sandbox refusing an attribute, arithmetic on a
    string, a missing key) is the conversation's error, in one line, never the caller's crash:
    the template is data from a model folder, not our code."""
    template = _compile(fmt.template)
    try:
        return template.render(messages=messages, bos_token=fmt.bos, eos_token=fmt.eos,
                               add_generation_prompt=add_generation_prompt)
    except UserError:  # raise_exception: the template's own words
        raise
    except Exception as e:
        raise UserError(f"the chat template failed: {type(e).__name__}: {e}") from None


def encode(enc: Any, text: str) -> list[int]:
    """Rendered text to ids, its special tokens (role markers, <|end|>, a bos) as such."""
    return list(enc.encode(text, allowed_special="all"))


def stop_ids(enc: Any, template: ChatTemplate) -> frozenset[int]:
    """The token that ends an assistant's turn, where the template's eos is one token."""
    ids = encode(enc, template.eos) if template.eos else []
    return frozenset(ids) if len(ids) == 1 else frozenset()


def prompt_ids(enc: Any, fmt: ChatTemplate, messages: list[dict[str, str]]) -> list[int]:
    """What a model is given to answer the conversation: it, then the assistant's prompt."""
    return encode(enc, render(fmt, messages, add_generation_prompt=True))


def assistant_mask(enc: Any, fmt: ChatTemplate, messages: list[dict[str, str]]
                   ) -> tuple[list[int], list[bool]]:
    """The conversation's ids, and for each whether it is the assistant's (its answer and the
    end of its turn: what fine-tuning learns from). Checks that the template renders prefix by
    prefix, so each turn's tokens are where the rendering says."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        before = prompt_ids(enc, fmt, messages[:i]) if m["role"] == "assistant" else None
        upto = encode(enc, render(fmt, messages[:i + 1]))
        start = len(before) if before is not None else len(ids)
        if upto[:len(ids)] != ids or (before is not None and upto[:len(before)] != before):
            raise UserError("the chat template does not render a conversation prefix by "
                            "prefix, so the assistant's tokens cannot be told apart")
        mask += [False] * (start - len(ids)) + [before is not None] * (len(upto) - start)
        ids = upto
    return ids, mask
