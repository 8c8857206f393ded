"""Inference: prefill the prompt once, then one token per step through a KV cache.

`generate` runs prompts through the engine (minigpt_cli/inference/engine/), the same slots,
scheduler and step loop that `minigpt serve` runs, so there is one decode loop in the codebase.
Each prompt gets its own cache slot, positions and context window (the overflow policy is in
engine/runner.py), so a prompt's tokens do not depend on what else is in the batch.

`Decoder` is the lock-step view of the same runner for a fixed batch: `bench` times it, beam
search reorders it, and tests step two of them side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import tiktoken
import torch

from minigpt_cli.inference.constraints import Grammar, constraint
from minigpt_cli.inference.engine import Engine, ModelRunner, Sequence, TokenEvent
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model.gpt import GPT, KVCache

MAX_SLOTS = 64  # prompts decoded at once by `generate`; more wait for a free slot


class Decoder:
    """Next-token logits for a fixed batch of growing sequences, all stepped together."""

    def __init__(self, model: GPT, windows: list[list[int]], use_cache: bool = True,
                 engine: str = "auto") -> None:
        self.runner = ModelRunner(model, len(windows), use_cache=use_cache, engine=engine)
        self._prompts: list[list[int]] | None = [list(w) for w in windows]
        self.pending: list[int] | None = None  # tokens appended since the last forward
        self.last_positions = 0  # most positions one row's last forward computed (--trace)

    @property
    def engine(self) -> str:
        return self.runner.engine

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def cache(self) -> KVCache | None:
        return self.runner.cache

    @property
    def batch_size(self) -> int:
        return self.runner.n_slots

    @property
    def windows(self) -> list[list[int]]:
        return self.runner.windows

    def logits(self) -> torch.Tensor:
        """Logits [B, V] for the next token of every sequence. Read them before the next call:
        the native engine reuses one buffer."""
        if self._prompts is not None:
            rows = [self.runner.prefill(i, p) for i, p in enumerate(self._prompts)]
            self._prompts = None
            self.last_positions = max(len(w) for w in self.runner.windows)
            return torch.stack(rows)
        assert self.pending is not None, "append() a token to every sequence first"
        tokens, self.pending = self.pending, None
        out = self.runner.decode(list(range(self.batch_size)), tokens)
        self.last_positions = max(self.runner.positions)
        return out

    def append(self, tokens: list[int]) -> None:
        """Add one token to every sequence (fed at the next `logits()`)."""
        self.pending = list(tokens)

    def reorder(self, rows: list[int]) -> None:
        """Beam search: sequence i becomes a copy of sequence rows[i], cache included."""
        self.runner.reorder(rows)


@dataclass
class Completion:
    prompt: str
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # length | eos | stop


@dataclass
class Timings:
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    steps: int = 0
    prefills: int = 0
    engine: str = "torch"  # what ran the cached decode steps: native (C) or torch
    drafted: int = 0  # speculative decoding: draft tokens verified ...
    accepted: int = 0  # ... and kept (acceptance rate = accepted / drafted)
    verify_steps: int = 0  # steps that verified drafts
    draft_steps: int = 0  # forward calls of the draft model (--draft)
    acceptance: float | None = None  # accepted / drafted (None: nothing drafted)
    tokens_per_verify_step: float | None = None  # kept drafts + the model's own token


@dataclass
class StepInfo:
    """What one decode step did, for --trace: candidates after the filters, and the choice."""
    step: int
    row: int
    candidates: list[tuple[int, float]]
    chosen: int
    positions: int


def generate(
    model: GPT,
    enc: tiktoken.Encoding,
    prompts: list[list[int]],
    settings: SamplerSettings,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    seed: int | None = None,
    stops: list[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    trace_top: int = 5,
    engine: str = "auto",
    prompt_lookup: int = 0,
    draft_k: int = 4,
    draft: GPT | None = None,
    grammar: Grammar | None = None,
) -> tuple[list[Completion], Timings]:
    """Generate for several prompts (token ids) on the engine; each stops on its own.

    `on_text(row, text)` receives printable text as soon as it is safe to print. With a
    `seed`, prompt i samples from its own generator seeded `seed + i`. `draft`: a draft
    model for speculative decoding (engine/draft.py), proposing up to `draft_k` tokens.
    `grammar`: what every output must follow (constraints.py), each with its own state.
    """
    eng = Engine(model, enc, min(len(prompts), MAX_SLOTS), use_cache=use_cache, engine=engine,
                 draft=draft)
    rows: dict[int, int] = {}
    t0 = time.perf_counter()
    t_first: list[float] = []
    events = 0

    def on_event(seq: Sequence, ev: TokenEvent) -> None:
        nonlocal events
        events += 1
        if not t_first:
            t_first.append(time.perf_counter())
        row = rows[seq.id]
        if on_step is not None and ev.finish_reason != "error":
            on_step(StepInfo(ev.index, row, ev.candidates or [], ev.token, ev.positions))
        if ev.text and on_text is not None:
            on_text(row, ev.text)

    compiled = constraint(grammar, enc, frozenset({enc.eot_token}))
    seqs = [Sequence(prompt=list(p), settings=settings, max_tokens=max_new_tokens,
                     stops=stops or [], seed=None if seed is None else seed + i,
                     trace_top=trace_top if on_step is not None else 0, on_event=on_event,
                     lookup=prompt_lookup, draft_k=draft_k,
                     constraint=compiled.copy() if compiled is not None else None)
            for i, p in enumerate(prompts)]
    rows.update({seq.id: i for i, seq in enumerate(seqs)})
    eng.run(seqs)
    t_end = time.perf_counter()
    out = []
    for seq in seqs:
        if seq.finish_reason == "error":
            raise RuntimeError(f"generation failed: {seq.error}")
        out.append(Completion(prompt=enc.decode(seq.prompt), prompt_tokens=seq.prompt,
                              tokens=seq.tokens, text=seq.text,
                              finish_reason=seq.finish_reason or "length"))
    first = t_first[0] if t_first else t_end
    decode_s = t_end - first
    timings = Timings(time_to_first_token_s=first - t0, total_s=t_end - t0, steps=eng.steps,
                      prefills=eng.runner.prefills, engine=eng.engine,
                      decode_tokens_per_s=(events - len(prompts)) / decode_s if decode_s > 0
                      else 0.0, drafted=sum(s.drafted for s in seqs),
                      accepted=sum(s.accepted for s in seqs),
                      verify_steps=sum(s.verifies for s in seqs),
                      draft_steps=eng.drafter.steps if eng.drafter is not None else 0)
    if timings.drafted:
        timings.acceptance = timings.accepted / timings.drafted
        timings.tokens_per_verify_step = 1 + timings.accepted / timings.verify_steps
    return out, timings


@torch.inference_mode()
def beam_search(model: GPT, enc: tiktoken.Encoding, prompt: list[int], num_beams: int,
                max_new_tokens: int, length_penalty: float = 1.0, use_cache: bool = True,
                engine: str = "auto") -> tuple[Completion, Timings]:
    """Deterministic beam search: keep the `num_beams` best partial sequences by summed
    log-probability; finished ones are ranked by score / length**length_penalty."""
    t0 = time.perf_counter()
    eot = enc.eot_token
    decoder = Decoder(model, [prompt] * num_beams, use_cache=use_cache, engine=engine)
    scores = torch.full((num_beams,), float("-inf"), device=decoder.device)
    scores[0] = 0.0  # all beams start identical: expand only the first at step one
    beams: list[list[int]] = [[] for _ in range(num_beams)]
    finished: list[tuple[float, list[int]]] = []
    timings = Timings(engine=decoder.engine)
    for step in range(max_new_tokens):
        logprobs = torch.log_softmax(decoder.logits().float(), dim=-1)
        if step == 0:
            timings.time_to_first_token_s = time.perf_counter() - t0
        total = (scores[:, None] + logprobs).flatten()
        top = torch.topk(total, 2 * num_beams)
        vocab = logprobs.size(-1)
        rows, next_ids, next_scores = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, token = divmod(flat, vocab)
            if token == eot:
                n = max(1, len(beams[row]))
                finished.append((score / n ** length_penalty, beams[row]))
                continue
            rows.append(row)
            next_ids.append(token)
            next_scores.append(score)
            if len(rows) == num_beams:
                break
        timings.steps = step + 1
        best_open = max(next_scores) / (len(beams[0]) + 1) ** length_penalty
        if len(finished) >= num_beams and max(f[0] for f in finished) >= best_open:
            break
        beams = [beams[r] + [t] for r, t in zip(rows, next_ids, strict=True)]
        scores = torch.tensor(next_scores, device=decoder.device)
        decoder.reorder(rows)
        decoder.append(next_ids)
    for score, beam in zip(scores.tolist(), beams, strict=True):
        finished.append((score / max(1, len(beam)) ** length_penalty, beam))
    best = max(finished, key=lambda f: f[0])[1]
    reason = "eos" if len(best) < timings.steps else "length"
    timings.total_s = time.perf_counter() - t0
    decode_time = timings.total_s - timings.time_to_first_token_s
    timings.decode_tokens_per_s = (timings.steps - 1) / decode_time if decode_time > 0 else 0.0
    text = enc.decode_bytes(best).decode("utf-8", errors="replace")
    return Completion(prompt=enc.decode(prompt), prompt_tokens=list(prompt), tokens=best,
                      text=text, finish_reason=reason), timings
