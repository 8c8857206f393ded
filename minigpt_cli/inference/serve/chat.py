"""The plain-text chat template. minigpt models are base models: they continue text and were
never tuned to follow instructions, so a chat is rendered as a script they can continue:

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

from minigpt_cli.inference.serve.schemas import Message

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
STOPS = ["\nUser:", "\nSystem:"]


def render(messages: list[Message]) -> str:
    lines = [f"{ROLES[m.role]}: {m.text}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"
