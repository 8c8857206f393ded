"""The plain-text chat script, for base runs, which have no chat template: they continue
text and were never tuned to follow instructions, so a chat is rendered as a script they can
continue:

    System: You are terse.
    User: Hello!
    Assistant: Hi.
    User: What is a KV cache?
    Assistant:

Each message is `Role: content` on its own line, and the prompt ends with `Assistant:` for
the model to continue. Generation also stops at a new `User:` or `System:` line, so the model
does not write the user's next turn.
"""

from __future__ import annotations

from collections.abc import Iterable

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
STOPS = ["\nUser:", "\nSystem:"]


def render(turns: Iterable[tuple[str, str]]) -> str:
    """(role, text) pairs as the script, ending where the assistant speaks next."""
    lines = [f"{ROLES[role]}: {text}" for role, text in turns]
    return "\n".join(lines) + "\nAssistant:"
