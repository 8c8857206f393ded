"""Prefix reuse: a new prompt that begins with what a slot's cache already holds (its own
slot's, or another's by copy) computes only the rest, and nothing it produces changes.

Oracle: each request's tokens (greedy and seeded) equal its tokens from a fresh engine with
reuse off; and reuse must really happen, counted in rows the step computed.
"""

from __future__ import annotations

import random

import pytest

from minigpt_cli import tokenizer as tok
from minigpt_cli.inference.engine import Engine, ModelRunner, Scheduler, Sequence, TokenEvent
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model.gpt import GPT
from tests.conftest import GREEDY, SAMPLED


def _watch(seq: Sequence, firsts: dict[int, int]) -> Sequence:
    """Record in firsts[seq.id] the positions its first token's step computed for it."""
    def on_event(s: Sequence, ev: TokenEvent) -> None:
        if ev.index == 0 and ev.token >= 0:
            firsts.setdefault(s.id, ev.positions)

    seq.on_event = on_event
    return seq


def _run(model: GPT, enc, prompts: list[str], settings: SamplerSettings, slots: int,
         prefix_cache: bool) -> tuple[list[Sequence], list[int]]:
    """Every prompt through `slots` slots; (sequences, positions of each first token)."""
    firsts: dict[int, int] = {}
    seqs = [_watch(Sequence(prompt=tok.encode(enc, p), settings=settings, max_tokens=6,
                            seed=30 + i), firsts) for i, p in enumerate(prompts)]
    engine = Engine(model, enc, slots, engine="native", prefix_cache=prefix_cache)
    engine.run(seqs)
    return seqs, [firsts[s.id] for s in seqs]


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_reused_prefix_gives_the_same_tokens_and_computes_only_the_rest(
        model: GPT, enc, settings: SamplerSettings) -> None:
    stem = "quick brown fox"
    prompts = [stem + " over", stem + " high", stem, "Zebra " + stem, "Zebra " + stem]
    reused, computed = _run(model, enc, prompts, settings, 1, prefix_cache=True)
    fresh, whole = _run(model, enc, prompts, settings, 1, prefix_cache=False)
    assert [s.tokens for s in reused] == [s.tokens for s in fresh]
    assert all(len(s.tokens) == 6 for s in reused)
    assert whole == [len(p) for p in prompts]  # byte tokens: one per character
    # "quick brown fox over" is computed whole; "... high" shares "quick brown fox " (16);
    # the bare stem is all cached but its last token, whose logits are needed; "Zebra" shares
    # nothing; the same prompt again shares all but its last token.
    assert computed == [20, 4, 1, 21, 1]


def test_a_prompt_goes_to_the_free_slot_holding_most_of_it(model: GPT, enc) -> None:
    """Two slots hold two different texts; a prompt that starts like the second one's goes to
    that slot (not the lowest free one) and equals its result from a fresh engine."""
    first = ["alpha beta gamma", "one two three four"]
    engine = Engine(model, enc, 2, engine="native")
    seqs = [Sequence(prompt=tok.encode(enc, p), settings=GREEDY, max_tokens=4) for p in first]
    engine.run(seqs)
    assert sorted(s.slot for s in seqs) == [0, 1]
    firsts: dict[int, int] = {}
    later = _watch(Sequence(prompt=tok.encode(enc, "one two three five"), settings=GREEDY,
                            max_tokens=5), firsts)
    engine.run([later])
    assert later.slot == next(s.slot for s in seqs if s.prompt == tok.encode(enc, first[1]))
    assert firsts[later.id] == len("ive")  # "one two three f" is held
    fresh = Sequence(prompt=list(later.prompt), settings=GREEDY, max_tokens=5)
    Engine(model, enc, 1, engine="native", prefix_cache=False).run([fresh])
    assert later.tokens == fresh.tokens


class Held:
    """A stand-in for the runner's PrefixView: what each slot can skip, by slot alone."""

    def __init__(self, by_slot) -> None:
        self.by_slot = by_slot

    def reusable(self, slot: int, prompt: list[int]) -> tuple[int, int]:
        return self.by_slot(slot)


def test_the_budget_counts_only_the_tokens_left_to_compute() -> None:
    held = {0: (2, 2), 1: (5, 5), 2: (5, 5)}
    sched = Scheduler(3)
    a, b = (Sequence(prompt=[1] * 8, settings=GREEDY, max_tokens=1) for _ in range(2))
    sched.add(a, b)
    assert sched.admit(4, Held(lambda s: held[s])) == [a]  # costs 3; b's 3 more would pass 4
    assert a.slot == 1  # holds 5, as slot 2 does: the lower one
    assert sched.admit(4, Held(lambda s: held[s])) == [b] and b.slot == 2
    plain = Scheduler(3)
    plain.add(Sequence(prompt=[1] * 8, settings=GREEDY, max_tokens=1))
    assert [s.slot for s in plain.admit(4)] == [0]


def test_a_failed_step_leaves_nothing_to_reuse(model: GPT, enc,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """When the C step fails, the slot's window claims tokens its cache never got: the window
    is emptied, so the next prompt there is computed whole and comes out right."""
    engine = Engine(model, enc, 1, engine="native")
    broken = Sequence(prompt=tok.encode(enc, "hello world"), settings=GREEDY, max_tokens=3)
    real = engine.runner._native_rows

    def fail(rows):
        raise RuntimeError("the step failed")

    monkeypatch.setattr(engine.runner, "_native_rows", fail)
    engine.run([broken])
    assert broken.finish_reason == "error" and engine.runner.windows[0] == []
    monkeypatch.setattr(engine.runner, "_native_rows", real)
    firsts: dict[int, int] = {}
    again = _watch(Sequence(prompt=tok.encode(enc, "hello world"), settings=GREEDY,
                            max_tokens=3), firsts)
    engine.run([again])
    assert firsts[again.id] == len("hello world")
    fresh = Sequence(prompt=list(again.prompt), settings=GREEDY, max_tokens=3)
    Engine(model, enc, 1, engine="native", prefix_cache=False).run([fresh])
    assert again.tokens == fresh.tokens


def test_a_slot_a_pytorch_forward_filled_is_not_reused(model: GPT, enc) -> None:
    """A prompt scored whole (echo with logprobs) is prefilled by the model's PyTorch forward,
    whose keys and values may differ in the last bit from the C step's: the same prompt next
    in that slot is computed whole, so its tokens still equal a fresh engine's."""
    engine = Engine(model, enc, 1, engine="native")
    scored = Sequence(prompt=tok.encode(enc, "to be or not"), settings=GREEDY, max_tokens=3,
                      logprobs=0, echo_logprobs=True)
    engine.run([scored])
    assert scored.prompt_logprobs is not None
    firsts: dict[int, int] = {}
    again = _watch(Sequence(prompt=list(scored.prompt), settings=GREEDY, max_tokens=3), firsts)
    engine.run([again])
    assert firsts[again.id] == len("to be or not")
    then = _watch(Sequence(prompt=list(scored.prompt), settings=GREEDY, max_tokens=3), firsts)
    engine.run([then])  # the C step filled it this time: reused
    assert firsts[then.id] == 1
    fresh = Sequence(prompt=list(scored.prompt), settings=GREEDY, max_tokens=3)
    Engine(model, enc, 1, engine="native", prefix_cache=False).run([fresh])
    assert again.tokens == then.tokens == fresh.tokens


def test_a_prompt_copies_its_beginning_from_a_running_slot(model: GPT, enc) -> None:
    """A prompt that begins like the one still running in another slot takes those columns by
    copy: it computes only the rest, and neither it nor the running request changes."""
    engine = Engine(model, enc, 2, engine="native")
    running = Sequence(prompt=tok.encode(enc, "quick brown fox over"), settings=GREEDY,
                       max_tokens=8)
    short = Sequence(prompt=tok.encode(enc, "zz"), settings=GREEDY, max_tokens=1)
    engine.add(running, short)
    while not short.finished:
        engine.step()
    assert not running.finished
    firsts: dict[int, int] = {}
    later = _watch(Sequence(prompt=tok.encode(enc, "quick brown fox high"), settings=GREEDY,
                            max_tokens=5), firsts)
    engine.add(later)
    while engine.has_work:
        engine.step()
    assert later.slot == short.slot != running.slot
    assert firsts[later.id] == len("high")  # "quick brown fox " came from the running slot
    for seq in (running, later):
        fresh = Sequence(prompt=list(seq.prompt), settings=GREEDY, max_tokens=seq.max_tokens)
        Engine(model, enc, 1, engine="native", prefix_cache=False).run([fresh])
        assert seq.tokens == fresh.tokens


def test_a_burst_that_begins_alike_computes_the_beginning_once() -> None:
    """Admission counts what a prompt can copy from any slot: with a budget of 8 prompt
    tokens, three prompts that share 9 tokens with a held window all start at once."""
    own = {0: 9, 1: 0, 2: 0, 3: 0}
    sched = Scheduler(4)
    seqs = [Sequence(prompt=[1] * 10, settings=GREEDY, max_tokens=1) for _ in range(3)]
    sched.add(*seqs)
    assert sched.admit(8, Held(lambda s: (9, own[s]))) == seqs
    assert [s.slot for s in seqs] == [0, 1, 2]  # the slot holding them itself goes first


def test_held_is_the_common_prefix_short_of_the_last_token(model: GPT) -> None:
    """`held` (a bisection over slice comparisons) against a plain token-by-token count."""
    runner = ModelRunner(model, 1, engine="native")
    runner.reuse_prefix = True
    rng = random.Random(0)
    for _ in range(300):
        runner.windows[0] = [rng.randrange(3) for _ in range(rng.randrange(12))]
        prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
        n = 0
        while (n < min(len(runner.windows[0]), len(prompt) - 1)
               and runner.windows[0][n] == prompt[n]):
            n += 1
        assert runner.held(0, prompt) == n
