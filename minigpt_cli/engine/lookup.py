"""Prompt lookup: draft tokens for speculative decoding copied from the context itself.

When the text being generated repeats something earlier in the context (a quoted passage, code
being edited, a name list), the tokens that followed the last occurrence of the current n-gram
are a good guess for what comes next. The engine feeds the guesses to the model in the same
step as the real next token, one row each, and keeps each guess only if the token the model
then chooses (sampled with the request's own settings and generator) is that guess; so the
output is token for token what decoding one token a step gives, only in fewer steps.
"""

from __future__ import annotations


def propose(context: list[int], n: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of context's last n tokens."""
    if n < 1 or k < 1 or len(context) <= n:
        return []
    tail = context[-n:]
    for start in range(len(context) - n - 1, -1, -1):
        if context[start:start + n] == tail:
            return context[start + n:start + n + k]
    return []
