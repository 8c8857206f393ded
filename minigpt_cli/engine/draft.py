"""A draft model for speculative decoding: a smaller model with the same tokenizer guesses the
next few tokens, one cheap step each, and the target checks them all in one step.

The drafter keeps its own cache slots, one per engine slot, in its own `ModelRunner` (so its
windows slide by the same overflow policy). Each engine step it catches every drafting
sequence up on the tokens it has not seen, then runs `k` steps for all of them at once, each
step sampling one guess per sequence with that sequence's own sampler settings and generator.
It keeps each guess's filtered distribution q, which the target's acceptance rule
(`sampling.accept_or_resample`) needs. After the target's verdict, `rollback` drops the guesses
the target did not keep from the drafter's windows.
"""

from __future__ import annotations

import torch

from minigpt_cli.engine.runner import ModelRunner
from minigpt_cli.engine.sequence import Sequence
from minigpt_cli.model import GPT
from minigpt_cli.sampling import choose, process


class Drafter:
    def __init__(self, model: GPT, n_slots: int, eot: int, engine: str = "auto") -> None:
        self.model = model
        self.eot = eot  # nothing follows end-of-text: a guess of it is a sequence's last
        self.runner = ModelRunner(model, n_slots, use_cache=True, engine=engine)
        self.steps = 0  # draft-model forward calls, for the cost model in docs and bench

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]
                ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Up to ks[i] guesses for seqs[i], and their distributions q [k, V] (None when
        greedy: a greedy guess is the draft's argmax and is checked by equality)."""
        new = [s for s, k in zip(seqs, ks, strict=True) if k and s.draft_missing is None]
        for s in new:  # started now: the drafter has seen nothing of it yet
            s.draft_missing = (s.prompt + s.tokens)[:-1]
        if new:  # long contexts go in as one prefill each; the runner keeps the last block
            self.runner.step([(s.slot, s.draft_missing) for s in new], [], [])
            self.steps += 1
            for s in new:
                s.draft_missing = []
        behind = [s for s, k in zip(seqs, ks, strict=True) if k and s.draft_missing]
        while behind:  # at most one token each (the last guess of an all-accepted round)
            self.runner.step([], [s.slot for s in behind], [s.draft_missing.pop(0) for s in behind])
            self.steps += 1
            behind = [s for s in behind if s.draft_missing]
        ks = list(ks)
        guesses: list[list[int]] = [[] for _ in seqs]
        dists: list[list[torch.Tensor]] = [[] for _ in seqs]
        feed = {i: s.next_input for i, s in enumerate(seqs) if ks[i]}
        for j in range(max(ks, default=0)):
            live = [i for i in feed if ks[i] > j]
            _, logits = self.runner.step([], [seqs[i].slot for i in live], [feed[i] for i in live])
            self.steps += 1
            assert logits is not None
            for i, row in zip(live, logits, strict=True):
                token, q = self._sample(seqs[i], row)
                guesses[i].append(token)
                if q is not None:
                    dists[i].append(q)
                feed[i] = token
                if token == self.eot:
                    ks[i] = len(guesses[i])
        for i, s in enumerate(seqs):  # the drafter saw next_input and all guesses but the last
            s.draft_fed = [s.next_input, *guesses[i][:-1]] if guesses[i] else []
        return guesses, [torch.stack(d) if d else None for d in dists]

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        s = seq.settings
        history = None
        if s.repetition_penalty != 1 and s.repeat_last_n > 0:
            history = torch.tensor([self.runner.windows[seq.slot][-s.repeat_last_n:]],
                                   device=logits.device)
        processed = process(logits[None].float(), s, history)
        token = int(choose(processed, s, seq.generator)[0])
        return token, None if s.greedy else torch.softmax(processed[0], dim=-1)

    def rollback(self, seq: Sequence, kept: list[int]) -> None:
        """The target kept `kept` (next_input, then the accepted guesses): drop what the
        drafter fed past them, and remember what it has yet to see."""
        fed = seq.draft_fed
        same = 0
        while same < min(len(fed), len(kept)) and fed[same] == kept[same]:
            same += 1
        self.runner.truncate(seq.slot, len(fed) - same)
        seq.draft_missing = (seq.draft_missing or []) + kept[same:]
        seq.draft_fed = []
