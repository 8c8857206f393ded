"""Answers to prompts, many at once, through the engine: what RL fine-tuning samples and what
`minigpt eval --task` scores.

A prompt is a user's turn: rendered through the run's chat template where it has one (the
answer ends at its end-of-turn token), or given as plain text to a base run (the answer ends at
end-of-text or the token limit).
"""

from __future__ import annotations

from typing import Any

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.inference.engine import Engine, Sequence, TokenEvent
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model.gpt import GPT
from minigpt_cli.tokenizer import chat


def prompt_ids(enc: Any, template: chat.ChatTemplate | None, text: str) -> list[int]:
    if template is None:
        return tok.encode(enc, text) or [enc.eot_token]
    return chat.prompt_ids(enc, template, [{"role": "user", "content": text}])


def answer(model: GPT, enc: Any, template: chat.ChatTemplate | None, prompts: list[list[int]],
           settings: SamplerSettings, max_tokens: int, seeds: list[int | None]
           ) -> list[tuple[list[int], str]]:
    """One answer per prompt (repeat a prompt for several), all decoded in one batch in eval
    mode: (the tokens sampled, the end-of-turn token included where it stopped there; the
    text)."""
    stop_ids = chat.stop_ids(enc, template) if template is not None else frozenset()
    tokens: dict[int, list[int]] = {}

    def keep(seq: Sequence, event: TokenEvent) -> None:
        tokens.setdefault(seq.id, []).append(event.token)

    seqs = [Sequence(prompt=p, settings=settings, max_tokens=max_tokens, stop_ids=stop_ids,
                     seed=s, on_event=keep) for p, s in zip(prompts, seeds, strict=True)]
    was = model.training
    model.eval()  # dropout off: answers as the model will be used
    try:
        Engine(model, enc, min(len(seqs), 256)).run(seqs)
    finally:
        model.train(was)
    failed = next((s.error for s in seqs if s.error), None)
    if failed:
        raise UserError(f"generating an answer failed: {failed}")
    return [(tokens.get(s.id, []), s.text) for s in seqs]
