"""Prompt lookup: draft tokens for speculative decoding copied from the context itself.

When the text being generated repeats something earlier in the context (a quoted passage, code
being edited, a name list), the tokens that followed the last occurrence of the current n-gram
are a good guess for what comes next. The engine feeds the guesses to the model in the same
step as the real next token, one row each, and keeps each guess only if the token the model
then chooses (sampled with the request's own settings and generator) is that guess; so the
output is token for token what decoding one token a step gives, only in fewer steps.
"""

from __future__ import annotations

from minigpt_cli.errors import UserError


def check_options(n: int, k: int, draft: str | None = None, both: bool = False) -> None:
    """--prompt-lookup N, --draft-k K and --draft RUN, as generate, serve and bench take
    them; only bench (`both`, rows side by side) takes lookup and a draft together."""
    if n < 0:
        raise UserError(f"--prompt-lookup must be 0 (off) or an n-gram size, got {n}")
    if k < 1:
        raise UserError(f"--draft-k must be at least 1, got {k}")
    if draft is not None and not draft:
        raise UserError("--draft must name a run directory or a .safetensors file")
    if n and draft and not both:
        raise UserError("--prompt-lookup and --draft are two ways to draft tokens: choose one")


def propose(context: list[int], n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of context's last n tokens."""
    if n < 1 or k < 1 or len(context) <= n:
        return []
    tail = context[-n:]
    for start in range(len(context) - n - 1, -1, -1):
        if context[start:start + n] == tail:
            return context[start + n:start + n + k]
    return []
