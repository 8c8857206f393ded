"""A reward for RL fine-tuning against exposure bias: how likely the exact oracle (the teacher
of benchmarks/exposure_teacher.py, which wrote the corpus) finds a completion, per token.

    rl.reward: benchmarks/exposure_reward.py:teacher_logprob      (MINIGPT_TEACHER=RUN_DIR)

The student is then trained on its own samples toward the text's true distribution: the
remedy the tutorials name beside scheduled sampling, with the oracle as the judge.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch


@functools.cache
def _teacher() -> tuple[Any, Any]:
    from minigpt_cli.inference.loading import load_for_inference

    model, enc, _, _ = load_for_inference(os.environ["MINIGPT_TEACHER"], "cpu", "float32")
    return model, enc


@torch.no_grad()
def teacher_logprob(prompt: str, completion: str, **fields: Any) -> float:
    """The teacher's mean log-probability of the completion's tokens after the prompt."""
    from minigpt_cli import tokenizer as tok

    model, enc = _teacher()
    context, answer = tok.encode(enc, prompt), tok.encode(enc, completion)
    if not answer:
        return -10.0  # an empty completion (end of text at once): as unlikely as it gets here
    ids = torch.tensor([[enc.eot_token, *context, *answer]])
    logits, _ = model(ids[:, :-1])
    logp = torch.log_softmax(logits[0, -len(answer):].float(), dim=-1)
    return float(logp.gather(1, ids[0, -len(answer):, None]).mean())
