"""The engine: one decode loop for the whole product.

`step()` is the heartbeat. At every step boundary it admits waiting requests into free cache
slots (prefilling their prompts), runs one decode step for every other running slot at once,
samples each sequence with its own settings and generator, hands each new token to its
request, and frees a slot the moment its request ends (EOS, a stop string, max_tokens, or a
cancel). With `join_mid_step` (the server's default) a request that arrives early in a step
joins it at a layer boundary instead of waiting for the next (runner._join_late, through
the one hook the runner calls up: `_join_step`).
`minigpt generate` drives it to completion (`run`); the server drives it forever from one
thread (`serve_forever`) while requests come and go.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import tiktoken
import torch

from minigpt_cli.inference.engine.draft import Drafter
from minigpt_cli.inference.engine.lookup import propose
from minigpt_cli.inference.engine.runner import ModelRunner, RunOutput
from minigpt_cli.inference.engine.scheduler import Scheduler
from minigpt_cli.inference.engine.sequence import Sequence, TokenEvent
from minigpt_cli.inference.engine.text import TextStream
from minigpt_cli.inference.sampling import accept_or_resample, choose, process, recent
from minigpt_cli.model.gpt import GPT

log = logging.getLogger("minigpt.engine")


class Engine:
    def __init__(self, model: GPT, enc: tiktoken.Encoding, n_slots: int, *,
                 use_cache: bool = True, engine: str = "auto", max_queue: int | None = None,
                 prefill_budget: int | None = None, prefill_first: bool = False,
                 prefix_cache: bool = True, join_mid_step: bool = False,
                 on_step: Callable[[int], None] | None = None,
                 draft: GPT | None = None) -> None:
        self.model = model
        self.enc = enc
        self.runner = ModelRunner(model, n_slots, use_cache=use_cache, engine=engine)
        # A draft model (speculative decoding) drafts for every request without prompt lookup.
        self.drafter = Drafter(draft, n_slots, enc.eot_token, engine) if draft is not None else None
        self.scheduler = Scheduler(n_slots, max_queue)
        # A new prompt skips what a slot's cache holds of its beginning: its own slot's, or
        # another's by copy; it computes only the rest (runner.held: exact, C step only).
        self.runner.reuse_prefix = prefix_cache
        self.on_step = on_step  # called with the number of sequences each step decoded
        self.prefill_budget = prefill_budget  # prompt tokens admitted per step (None: all)
        # A step that starts prompts runs them alone, the decoding rows one step later. Meant
        # for sooner first tokens; with arrivals in bursts it measured the opposite (docs §6).
        self.prefill_first = prefill_first
        # A request that arrives early in a step may join it (runner._join_late) rather
        # than wait for the next: in a server whose step is tens of ms, its first token
        # comes a step sooner. Only on the C step, and only once steps take at least
        # join_min_s: below that the wait is short and the extra calls cost more.
        self.join_mid_step = join_mid_step
        self.join_min_s = 0.002
        self.joined_mid_step = 0  # requests that did
        self._joined: list[Sequence] = []  # those of the step in progress
        self._step_s = 0.0  # how long the last step's forward took
        self.steps = 0
        self._lock = threading.Lock()  # guards the scheduler's queues against other threads
        self._wake = threading.Condition(self._lock)

    @property
    def engine(self) -> str:
        return self.runner.engine

    def add(self, *seqs: Sequence) -> None:
        """Queue requests (thread-safe), all or none: QueueFull when they would not all fit."""
        for seq in seqs:
            seq.stream = TextStream(self.enc, seq.stops)
            seq.generator = torch.Generator(device=self.runner.device)
            # No seed: a fresh one from the OS, leaving torch's global generator untouched.
            # Any integer is a seed: the generator takes its 64 low bits (as torch does a
            # negative one), so 2**70 is a seed, not an overflow.
            seq.generator.manual_seed(seq.seed % 2**64 if seq.seed is not None
                                      else int.from_bytes(os.urandom(8), "little") >> 1)
        with self._wake:
            self.scheduler.add(*seqs)
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop a request at the next step boundary (thread-safe): its slot is freed then."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def counts(self) -> tuple[int, int]:
        """(running, waiting), for metrics."""
        with self._lock:
            return len(self.scheduler.running), len(self.scheduler.waiting)

    def step(self) -> None:
        """One step, one way: schedule (who runs), run (the model, once for every row),
        postprocess (sample, stream, free). The one call back up is `_join_step`, which the
        runner makes at layer boundaries when a request may join the run under way."""
        starting, decoding, scored = self._schedule()
        for seq in scored:
            self._guarded(seq, self._score_prompt, seq)
        drafts, dists = self._drafts(decoding)
        self._joined = []
        out = self._run(starting, decoding, drafts)
        if out is not None:
            self._postprocess(out, starting, decoding, drafts, dists)
        self.steps += 1
        if self.on_step is not None:
            ran = len(decoding) + len(self._joined) if out is not None else 0
            self.on_step(ran + len(starting) + len(scored))

    def _postprocess(self, out: RunOutput, starting: list[Sequence], decoding: list[Sequence],
                     drafts: list[list[int]], dists: list[torch.Tensor | None]) -> None:
        """Sample each request's next token(s) from what the run computed, in the order the
        rows came: prompts that started, prompts that joined mid-run, then decode rows (each
        with 1 + drafted[i] rows, its guesses checked in turn)."""
        ready = list(zip(starting, out.firsts, out.filled, strict=True))
        ready += [(seq, row, n) for seq, (row, n) in zip(self._joined, out.joined, strict=True)]
        self.joined_mid_step += len(self._joined)
        for seq, row, n in ready:
            seq.cached_tokens = len(self.runner.windows[seq.slot]) - n
            self._guarded(seq, self._advance, seq, row, n)
        at = 0
        for i, seq in enumerate(decoding if out.logits is not None else []):
            k = out.drafted[i]
            q = dists[i][:k] if dists[i] is not None else None
            self._guarded(seq, self._verify, seq, out.logits[at:at + 1 + k], out.positions[i],
                          drafts[i][:k], q)
            at += 1 + k

    def _schedule(self) -> tuple[list[Sequence], list[Sequence], list[Sequence]]:
        """Drop cancelled requests, admit waiting ones into free slots, and say which start
        (their prompts go in this step's run), which decode, and which score their prompt (echo
        with logprobs: a forward of their own before the run; they decode from the next
        step)."""
        with self._lock:
            cancelled = [s for s in [*self.scheduler.waiting, *self.scheduler.running.values()]
                         if s.cancelled]
            for seq in cancelled:
                self._finish(seq, "cancelled")
            admitted = self.scheduler.admit(self.prefill_budget, self.runner.prefixes())
            decoding = [] if self.prefill_first and admitted else [
                s for s in self.scheduler.running.values()
                if s not in admitted and s.next_input is not None]
        for seq in cancelled:
            self._notify_end(seq)
        scored = [s for s in admitted if s.echo_logprobs]
        decoding.sort(key=lambda s: s.slot)
        return [s for s in admitted if not s.echo_logprobs], decoding, scored

    def _score_prompt(self, seq: Sequence) -> None:
        """echo with logprobs: the prompt's own log-probabilities need a forward over it all."""
        logits = self.runner.prefill(seq.slot, seq.prompt, all_positions=True)
        seq.prompt_logprobs = self._prompt_logprobs(seq, logits)
        self._advance(seq, logits[-1], len(self.runner.windows[seq.slot]))

    def _run(self, starting: list[Sequence], decoding: list[Sequence],
             drafts: list[list[int]]) -> RunOutput | None:
        """The model's part of the step; None when it failed (every row in it is failed).
        Requests may join it mid-way (`_join_step`) once steps are long enough to be worth
        it: on the C step, with a free slot."""
        join = self._join_step if (self.join_mid_step and self.runner.engine == "native"
                                   and self._step_s >= self.join_min_s
                                   and self.scheduler.n_free > 0) else None
        if not starting and not decoding:
            return RunOutput([], [], None)
        began = time.perf_counter()
        try:
            out = self.runner.run([(s.slot, s.prompt) for s in starting],
                                  [s.slot for s in decoding], [s.next_input for s in decoding],
                                  drafts, join)
        except Exception as exc:
            for seq in starting + decoding + self._joined:
                self._fail(seq, exc)
            self._joined = []
            return None
        self._step_s = time.perf_counter() - began
        return out

    def _guarded(self, seq: Sequence, fn: Callable[..., None], *args: object) -> None:
        """Run one request's part of the step; if it raises, that request fails, not the
        engine (nor the other requests in the step)."""
        try:
            fn(*args)
        except Exception as exc:
            self._fail(seq, exc)

    def _join_step(self, room: int, upto: dict[int, int]) -> list[tuple[int, list[int]]]:
        """The runner's one call up (runner.JoinHook), at a layer boundary early in a run:
        may waiting requests join it? The oldest ones do, in order, while a slot the run is
        not using is free and their rows fit in `room` and the prefill budget; a request that
        scores its prompt (echo with logprobs) takes a forward of its own and waits, with
        those behind it. `upto`: the columns the run is writing, which no prompt may reuse."""
        with self._lock:
            most = 0
            for seq in self.scheduler.waiting:
                if seq.echo_logprobs or seq.cancelled:
                    break
                most += 1
            if most == 0:
                return []
            budget = min(room, self.prefill_budget or room)
            joined = self.scheduler.admit(budget, self.runner.prefixes(upto), strict=True,
                                          avoid=upto, most=most)
        for seq in joined:
            seq.joined_mid_step = True
        self._joined += joined
        return [(s.slot, s.prompt) for s in joined]

    def _drafts(self, decoding: list[Sequence]
                ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Each decoding sequence's guesses for its next tokens, from prompt lookup or the
        draft model, with the draft's distributions where it sampled them. None are made
        past what a request may still generate, nor without the cache."""
        room = [min(s.draft_k, s.max_tokens - len(s.tokens) - 1) if self.runner.use_cache
                else 0 for s in decoding]
        drafts = [propose(s.prompt + s.tokens, s.lookup, k) if s.lookup and k > 0 else []
                  for s, k in zip(decoding, room, strict=True)]
        dists: list[torch.Tensor | None] = [None] * len(decoding)
        if self.drafter is not None:
            mine = [i for i, s in enumerate(decoding) if not s.lookup]
            try:
                guesses, qs = self.drafter.propose([decoding[i] for i in mine],
                                                   [max(0, room[i]) for i in mine])
            except Exception:  # a failing draft model costs speed, not the requests
                log.exception("the draft model failed: decoding without drafts this step")
                for i in mine:
                    decoding[i].draft_missing = None  # start its drafter slot afresh
                return drafts, dists
            for i, g, q in zip(mine, guesses, qs, strict=True):
                drafts[i], dists[i] = g, q
        return drafts, dists

    def _verify(self, seq: Sequence, rows: torch.Tensor, positions: int, draft: list[int],
                q: torch.Tensor | None = None) -> None:
        """Choose seq's next token from rows[0]; while it is the next draft token (already in
        the window, its row computed), go on to that row.

        Prompt lookup and greedy drafts: every token is chosen as one token a step would
        choose it, same settings, same generator draws in the same order, so the output does
        not change. Sampled drafts from the draft model (`q`, their distributions): each is
        kept or replaced by the acceptance rule, whose output is distributed as the target's.
        The wrong drafts leave the window (and the drafter's)."""
        if draft:  # counted before the tokens go out: the last one reports the totals
            seq.drafted += len(draft)
            seq.verifies += 1
        fed, kept = seq.next_input, 0  # kept: drafts the target took as its own choice
        for j in range(len(draft) + 1):
            guess = draft[j] if j < len(draft) else None
            proposal = (guess, q[j]) if q is not None and guess is not None else None
            token = self._advance(seq, rows[j], positions if j == 0 else 1,
                                  ahead=len(draft) - j, guess=guess, proposal=proposal)
            if seq.finished or token != guess:
                break
            kept += 1
        if seq.finished:
            return
        if draft:
            self.runner.truncate(seq.slot, len(draft) - kept)
        if self.drafter is not None and seq.draft_missing is not None:
            self.drafter.rollback(seq, [fed, *draft[:kept]])

    def _advance(self, seq: Sequence, logits: torch.Tensor, positions: int, ahead: int = 0,
                 guess: int | None = None,
                 proposal: tuple[int, torch.Tensor] | None = None) -> int | None:
        """Sample seq's next token from its logits row, report it, and finish it if done.

        `ahead`: tokens at the window's end that come after this row (drafts still being
        checked), left out of the repetition penalty's history. `guess`: a draft token,
        counted as accepted if it is the token taken. `proposal`: (guess, its draft
        distribution q) for the acceptance rule instead of a plain draw."""
        if seq.finished:  # ended from another thread during this step (server shutdown)
            return None
        s = seq.settings
        row = logits[None].float()
        history = recent(self.runner.windows[seq.slot], s, logits.device, ahead)
        allowed = row if seq.constraint is None else seq.constraint.mask(row)
        processed = process(allowed, s, history)
        if proposal is not None and not s.greedy:
            token = accept_or_resample(torch.softmax(processed[0], dim=-1), proposal[1],
                                       proposal[0], seq.generator)
        else:
            token = int(choose(processed, s, seq.generator)[0])
        if seq.constraint is not None:
            seq.constraint.consume(token)
        if guess is not None and token == guess:
            seq.accepted += 1
        event = TokenEvent(token=token, text="", index=len(seq.tokens), positions=positions)
        if seq.logprobs is not None:
            lp = torch.log_softmax(row[0], dim=-1)
            event.logprob = float(lp[token])
            if seq.logprobs > 0:
                top = torch.topk(lp, min(seq.logprobs, lp.numel()))
                event.top = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        if seq.trace_top > 0:
            probs = torch.softmax(processed[0], dim=-1)
            top = torch.topk(probs, min(seq.trace_top, probs.numel()))
            event.candidates = [(i, p) for i, p in zip(top.indices.tolist(), top.values.tolist(),
                                                       strict=True) if p > 0]
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        assert seq.stream is not None
        if token == self.enc.eot_token or token in seq.stop_ids:
            event.finish_reason = "eos"
        else:
            seq.tokens.append(token)
            event.text = seq.stream.feed(token)
            if seq.stream.stopped:
                event.finish_reason = "stop"
            elif len(seq.tokens) >= seq.max_tokens:
                event.finish_reason = "length"
        if event.finish_reason is not None:
            event.text += seq.stream.close()
            with self._lock:
                self._finish(seq, event.finish_reason)
        else:
            seq.next_input = token
        self._emit(seq, event)
        return token

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor
                         ) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """(log-probability, top alternatives) of each prompt token given the ones before;
        the first has no context, so None. For `echo` with `logprobs`."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        out: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
        n = min(seq.logprobs or 0, lp.size(-1))
        for t in range(1, len(seq.prompt)):
            row = lp[t - 1]
            top = torch.topk(row, n) if n else None
            out.append((float(row[seq.prompt[t]]), [] if top is None else list(
                zip(top.indices.tolist(), top.values.tolist(), strict=True))))
        return out

    def _emit(self, seq: Sequence, event: TokenEvent) -> None:
        if seq.on_event is not None:
            seq.on_event(seq, event)

    def _finish(self, seq: Sequence, reason: str) -> None:
        """Free seq's slot now (the caller holds the lock)."""
        if seq.finished:
            return
        seq.finish_reason = reason
        seq.finished_at = time.perf_counter()
        seq.next_input = None
        self.scheduler.release(seq)

    def _fail(self, seq: Sequence, exc: Exception) -> None:
        log.exception("request %s failed", seq.id, exc_info=exc)
        seq.error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._finish(seq, "error")
        self._notify_end(seq)

    def _notify_end(self, seq: Sequence) -> None:
        """Tell a request that ended without a token (cancelled, failed) that it ended."""
        try:
            self._emit(seq, TokenEvent(token=-1, text="", index=len(seq.tokens), positions=0,
                                       finish_reason=seq.finish_reason))
        except Exception:  # the request's own reporting failed: nothing more to tell it
            log.exception("request %s: reporting its end failed", seq.id)

    def run(self, seqs: list[Sequence]) -> list[Sequence]:
        """Generate every sequence to the end (the `minigpt generate` path)."""
        for seq in seqs:
            self.add(seq)
        while self.has_work:
            self.step()
        return seqs

    def serve_forever(self, stop: threading.Event) -> None:
        """Step while there is work, sleep while there is none, until `stop` is set."""
        while not stop.is_set():
            with self._wake:
                if not self.scheduler.has_work:
                    self._wake.wait(timeout=0.1)
                    continue
            self.step()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def abort_all(self, reason: str) -> list[Sequence]:
        """End every request now (server shutdown); returns those that were still open."""
        with self._lock:
            open_ = [*self.scheduler.waiting, *self.scheduler.running.values()]
            for seq in open_:
                seq.error = reason
                self._finish(seq, "error")
        for seq in open_:
            self._notify_end(seq)
        return open_
