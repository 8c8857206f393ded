"""One request inside the engine: its tokens, its own sampling settings and random generator,
its slot, and what it has produced so far.

A sequence never looks at any other: its next token depends only on its own logits row, its
own settings and its own seeded generator. That is what makes a request's output the same
alone or under any load.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minigpt_cli.inference.constraints import Constraint
from minigpt_cli.inference.engine.text import TextStream
from minigpt_cli.inference.sampling import SamplerSettings

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenEvent:
    """One generated token as its request sees it."""
    token: int
    text: str  # newly printable text: '' while bytes or a possible stop string are held back
    index: int  # 0 for the first generated token
    positions: int  # positions the forward pass computed for it (the prompt, or 1 with a cache)
    logprob: float | None = None  # the model's log-probability of `token` (before any filter)
    top: list[tuple[int, float]] | None = None  # the model's top tokens and log-probabilities
    candidates: list[tuple[int, float]] | None = None  # after the sampler's filters (--trace)
    finish_reason: str | None = None  # set on a request's last event: length | eos | stop | ...


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    settings: SamplerSettings
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()  # tokens that end it as end-of-text does (end of turn)
    seed: int | None = None
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: and the top N
    trace_top: int = 0  # > 0: report the top candidates after the sampler's filters
    echo_logprobs: bool = False  # also score the prompt's own tokens (echo with logprobs)
    lookup: int = 0  # > 0: draft tokens by prompt lookup on this n-gram size (lookup.py)
    draft_k: int = 4  # most draft tokens verified per step
    on_event: Callable[[Sequence, TokenEvent], None] | None = None
    constraint: Constraint | None = None  # a grammar its tokens follow (constraints.py)
    # State, owned by the engine.
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    next_input: int | None = None  # the last sampled token, fed at the next decode step
    stream: TextStream | None = None
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values a slot's cache held
    joined_mid_step: bool = False  # started in a step already under way (engine._join_step)
    drafted: int = 0  # speculative decoding: draft tokens verified ...
    accepted: int = 0  # ... and kept
    verifies: int = 0  # steps that verified drafts
    draft_missing: list[int] | None = None  # draft model: tokens its slot has yet to see
    draft_fed: list[int] = field(default_factory=list)  # ... and fed this step

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def text(self) -> str:
        return self.stream.text if self.stream is not None else ""
