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

from minigpt_cli.inference.engine.runner import ModelRunner
from minigpt_cli.inference.engine.sequence import Sequence
from minigpt_cli.inference.sampling import choose, process, recent
from minigpt_cli.model.gpt import GPT


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
        ks = list(ks)
        live = [i for i, k in enumerate(ks) if k]
        # A sequence new to the drafter is prefilled with its whole context (next_input is
        # its last token); one it has seen gets the tokens it missed and next_input, as rows
        # of one step. (Not both for one slot in one call: a full window would slide
        # mid-call, and its rows would overwrite cache columns other rows of it read.)
        new = [i for i in live if seqs[i].draft_missing is None]
        rows: dict[int, torch.Tensor] = {}
        if new:
            firsts = self.runner.run(
                [(seqs[i].slot, seqs[i].prompt + seqs[i].tokens) for i in new], [], []).firsts
            self.steps += 1
            rows = {i: row.clone() for i, row in zip(new, firsts, strict=True)}
        todo = {i: [*(seqs[i].draft_missing or []), seqs[i].next_input] for i in live
                if i not in rows}
        for i in live:
            seqs[i].draft_missing = []
        rows.update(self._feed(seqs, todo))
        guesses: list[list[int]] = [[] for _ in seqs]
        dists: list[list[torch.Tensor]] = [[] for _ in seqs]
        while rows:
            for i, row in rows.items():
                token, q = self._sample(seqs[i], row)
                guesses[i].append(token)
                if q is not None:
                    dists[i].append(q)
                if token == self.eot:  # nothing follows end-of-text
                    ks[i] = len(guesses[i])
            more = {i: [guesses[i][-1]] for i in rows if len(guesses[i]) < ks[i]}
            rows = self._feed(seqs, more) if more else {}
        for i, s in enumerate(seqs):  # the drafter saw next_input and all guesses but the last
            s.draft_fed = [s.next_input, *guesses[i][:-1]] if guesses[i] else []
        return guesses, [torch.stack(d) if d else None for d in dists]

    def _feed(self, seqs: list[Sequence], todo: dict[int, list[int]]
              ) -> dict[int, torch.Tensor]:
        """Append todo[i] to seqs[i]'s drafter slot, all of a sequence's tokens as rows of
        one step where its window has room (more steps where it has not); the logits after
        each sequence's last token."""
        out: dict[int, torch.Tensor] = {}
        todo = {i: list(t) for i, t in todo.items()}
        while todo:
            order = list(todo)
            ran = self.runner.run([], [seqs[i].slot for i in order],
                                  [todo[i][0] for i in order], [todo[i][1:] for i in order])
            self.steps += 1
            logits = ran.logits
            assert logits is not None
            at = 0
            for n, i in enumerate(order):
                fed = 1 + ran.drafted[n]
                del todo[i][:fed]
                if not todo[i]:
                    out[i] = logits[at + fed - 1].clone()  # the C step reuses its buffer
                    del todo[i]
                at += fed
        return out

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        s = seq.settings
        history = recent(self.runner.windows[seq.slot], s, logits.device)
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
