"""Who runs next: a bounded waiting queue, a fixed set of KV-cache slots, and the rule that
requests are admitted at step boundaries the moment a slot is free (continuous batching:
nobody waits for the whole batch to finish)."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Collection
from typing import Protocol

from minigpt_cli.inference.engine.sequence import Sequence, Status


class Prefixes(Protocol):
    """What the cache can reuse of a prompt (runner.PrefixView): the scheduler asks, the
    cache answers; nothing flows back."""

    def reusable(self, slot: int, prompt: list[int]) -> tuple[int, int]: ...


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


class Scheduler:
    def __init__(self, n_slots: int, max_queue: int | None = None) -> None:
        self.n_slots = n_slots
        self.max_queue = max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        # Lowest free slot first keeps running slots packed at the front of the cache, where
        # the PyTorch path reads them through views instead of gathering.
        self._free = list(range(n_slots))
        heapq.heapify(self._free)

    def add(self, *seqs: Sequence) -> None:
        """Queue all of `seqs` or none of them."""
        if self.max_queue is not None and len(self.waiting) + len(seqs) > self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting "
                            f"(the queue holds {self.max_queue})")
        self.waiting.extend(seqs)

    def admit(self, budget: int | None = None,
              prefixes: Prefixes | None = None, *,
              strict: bool = False, avoid: Collection[int] = (), most: int | None = None
              ) -> list[Sequence]:
        """Move waiting sequences into free slots, oldest first. With a `budget`, stop once
        the admitted prompts would exceed that many tokens (the first always goes in): a
        burst of arrivals is prefilled over several steps, so the first requests start
        sooner and running requests never wait on one huge step.

        `prefixes.reusable(slot, prompt)`: (how many of the prompt's first tokens a free slot
        can skip, how many of those its own cache holds; the rest it would copy from another
        slot).
        A sequence then goes to the free slot that skips most, the one holding them itself
        first, then the lowest, and only the tokens left to compute count against the
        budget.

        For a run already under way (Engine._join_step, joining late): `strict`, even the first
        must fit the budget; `avoid`, slots not to use; `most`, at most that many."""
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting and (most is None or len(admitted) < most):
            free = [s for s in self._free if s not in avoid]
            if not free:
                break
            seq = self.waiting[0]
            slot, reused = min(free), 0
            if prefixes is not None:
                reused, _, slot = max((*prefixes.reusable(s, seq.prompt), -s) for s in free)
                slot = -slot
            cost = len(seq.prompt) - reused
            if budget is not None and (admitted or strict) and tokens + cost > budget:
                break
            tokens += cost
            self.waiting.popleft()
            self._free.remove(slot)
            heapq.heapify(self._free)
            seq.slot = slot
            seq.status = Status.RUNNING
            self.running[seq.slot] = seq
            admitted.append(seq)
        return admitted

    def release(self, seq: Sequence) -> None:
        """A finished sequence gives its slot back at once."""
        if seq.status is Status.RUNNING and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            heapq.heappush(self._free, seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    @property
    def n_free(self) -> int:
        return len(self._free)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
