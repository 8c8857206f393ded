"""Chat data for fine-tuning: conversations in JSONL, rendered through the run's template, with
the loss on the assistant's tokens only.

One line per conversation, `{"messages": [{"role": "system" | "user" | "assistant",
"content": "..."}]}`, the convention of OpenAI's fine-tuning files and TRL. The last
`val_fraction` of the lines is held out.

A row of a batch is one conversation, never two: its tokens from the start, then padding up to
the longest row of the batch. Packing several conversations into a row would let a turn attend
to a stranger's conversation before it, which a chat model never sees when it answers; padding
costs compute on short conversations instead, and the padding is masked out of the loss.
Targets are -1 (ignored by the loss) everywhere but at the assistant's tokens: its answers and
the end of each of its turns, which is where it learns to stop.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minigpt_cli.errors import UserError
from minigpt_cli.tokenizer import chat
from minigpt_cli.training.data import micro_seed

IGNORE = -1


@dataclass
class Conversations:
    """The conversations of a source, split, before tokenizing."""

    train: list[list[dict[str, str]]]
    val: list[list[dict[str, str]]]
    digest: str
    skipped: list[str] = field(default_factory=list)  # why each skipped line was skipped


def _record(line: str, where: str) -> list[dict[str, str]]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        raise UserError(f"{where} is not valid JSON") from None
    if not isinstance(obj, dict) or "messages" not in obj:
        raise UserError(f"{where} needs a field 'messages' (a list of role/content objects)")
    messages = chat.check_messages(obj["messages"], f"{where}: messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def read_conversations(source: str, val_fraction: float, skip_bad: bool) -> Conversations:
    """Every conversation of a .jsonl file; a bad line is an error naming it, or (skip_bad)
    counted and skipped."""
    path = Path(source).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        raise UserError(f"data.format chat reads a .jsonl file of conversations; "
                        f"data.source '{source}' is not one")
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    found, skipped = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            found.append(_record(line, f"{path}:{n}"))
        except UserError as e:
            if not skip_bad:
                raise UserError(f"{e} (data.bad_records skip counts and skips such lines)") \
                    from None
            skipped.append(str(e))
    if len(found) < 2:
        raise UserError(f"{path} holds {len(found)} usable conversation(s): at least 2 are "
                        "needed, one to train on and one to hold out")
    n_val = max(1, round(len(found) * val_fraction))
    digest = hashlib.sha256(raw + str(val_fraction).encode()).hexdigest()[:16]
    return Conversations(found[:-n_val], found[-n_val:], digest, skipped)


@dataclass
class Tokenized:
    """One split: each conversation's ids and, per id, whether it is the assistant's."""

    ids: list[np.ndarray]
    masks: list[np.ndarray]

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)


def tokenize(enc: Any, fmt: chat.ChatFormat, convs: list[list[dict[str, str]]],
             block_size: int, skip_bad: bool, skipped: list[str]) -> Tokenized:
    """Render and encode each conversation; one longer than the context (block_size + 1 ids)
    is an error, or (skip_bad) counted in `skipped`."""
    ids, masks = [], []
    for i, messages in enumerate(convs):
        toks, mask = chat.assistant_mask(enc, fmt, messages)
        if len(toks) > block_size + 1:
            why = (f"conversation {i + 1} is {len(toks)} tokens, longer than the context "
                   f"(model.block_size {block_size} + 1)")
            if not skip_bad:
                raise UserError(f"{why}: shorten it, raise model.block_size, or set "
                                "data.bad_records skip")
            skipped.append(why)
            continue
        ids.append(np.asarray(toks, dtype=np.int64))
        masks.append(np.asarray(mask, dtype=bool))
    if not ids:
        raise UserError("no conversation fits the context: raise model.block_size")
    return Tokenized(ids, masks)


def rows(data: Tokenized, picks: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets for the conversations `picks`, one per row, padded to the longest;
    a target is -1 wherever the next token is not the assistant's (or is padding)."""
    width = max(len(data.ids[i]) for i in picks) - 1
    x = np.full((len(picks), width), pad, dtype=np.int64)
    y = np.full((len(picks), width), IGNORE, dtype=np.int64)
    for r, i in enumerate(picks):
        ids, mask = data.ids[i], data.masks[i]
        n = len(ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = np.where(mask[1:], ids[1:], IGNORE)
    return torch.from_numpy(x), torch.from_numpy(y)


def train_rows(data: Tokenized, batch_size: int, pad: int, seed: int, step: int,
               micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random conversations, a pure function of (seed, step, micro-step), as text windows
    are: a resumed run sees exactly the rows an unbroken one would."""
    g = torch.Generator().manual_seed(micro_seed(seed, step, micro))
    picks = torch.randint(0, len(data.ids), (batch_size,), generator=g).tolist()
    return rows(data, picks, pad)


def eval_rows(data: Tokenized, batch_size: int, steps: int, pad: int
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same conversations at every evaluation: the first batch_size x steps of the split
    (all of them when fewer), in order."""
    picks = list(range(min(len(data.ids), batch_size * steps)))
    return [rows(data, picks[i:i + batch_size], pad) for i in range(0, len(picks), batch_size)]
