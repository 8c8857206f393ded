"""The engine: continuous batching must not change any request's result.

Oracles: a request's tokens under load (other requests coming and going in other slots) equal
its tokens alone, greedy and seeded; the fused C step's logits for a row do not depend on the
other rows at all (bit for bit); cancelling frees the slot at the next step; one failing
request fails alone.
"""

from __future__ import annotations

import pytest
import torch

from minigpt_cli import tokenizer as tok
from minigpt_cli.inference.engine import (
    Engine,
    ModelRunner,
    QueueFull,
    Scheduler,
    Sequence,
    TokenEvent,
)
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.inference.serve.metrics import Metrics
from minigpt_cli.model.gpt import GPT, GPTConfig
from tests.conftest import GREEDY, SAMPLED

PROMPTS = ["A", "The quick brown fox", "to be or not", "xyz", "Once upon a time there", "q"]


def _alone(model: GPT, enc, prompt: str, settings: SamplerSettings, n: int, engine: str,
           seed: int | None = None) -> list[int]:
    seq = Sequence(prompt=tok.encode(enc, prompt), settings=settings, max_tokens=n, seed=seed)
    Engine(model, enc, 1, engine=engine).run([seq])
    return seq.tokens


@pytest.mark.parametrize("engine", ["native", "torch"])
@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_under_load_equals_alone(model: GPT, enc, engine: str,
                                 settings: SamplerSettings) -> None:
    """Six requests through two slots, with lengths that make them finish at different steps
    and cross the 32-token window: each one's tokens equal its tokens alone."""
    sizes = [50, 7, 23, 40, 3, 31]
    seqs = [Sequence(prompt=tok.encode(enc, p), settings=settings, max_tokens=n, seed=100 + i)
            for i, (p, n) in enumerate(zip(PROMPTS, sizes, strict=True))]
    batch_sizes: list[int] = []
    eng = Engine(model, enc, 2, engine=engine, on_step=batch_sizes.append)
    eng.run(seqs)
    assert max(batch_sizes) == 2 and eng.runner.prefills > len(seqs)  # slides happened
    for i, (seq, p, n) in enumerate(zip(seqs, PROMPTS, sizes, strict=True)):
        assert seq.finish_reason in ("length", "eos")
        assert seq.tokens == _alone(model, enc, p, settings, n, engine, seed=100 + i)


def test_requests_join_without_waiting_for_the_batch(model: GPT, enc) -> None:
    """A request added while others run is admitted at the next step boundary."""
    eng = Engine(model, enc, 3)
    long = Sequence(prompt=[1, 2], settings=GREEDY, max_tokens=40)
    eng.add(long)
    for _ in range(5):
        eng.step()
    late = Sequence(prompt=[3], settings=GREEDY, max_tokens=4)
    eng.add(late)
    eng.step()
    assert late.slot != -1 and len(late.tokens) == 1 and not long.finished
    while not late.finished:
        eng.step()
    assert not long.finished  # the short request ended first; the long one keeps going
    while eng.has_work:
        eng.step()
    assert long.tokens == _alone_tokens(model, enc, [1, 2], 40)


def _alone_tokens(model: GPT, enc, prompt: list[int], n: int) -> list[int]:
    seq = Sequence(prompt=prompt, settings=GREEDY, max_tokens=n)
    Engine(model, enc, 1).run([seq])
    return seq.tokens


@pytest.mark.needs_c_step
def test_native_rows_do_not_depend_on_each_other(model: GPT) -> None:
    """The C step's logits for a slot are bit-identical whatever else shares the step."""
    alone = ModelRunner(model, 4, engine="native")
    alone.prefill(2, [5, 6, 7, 8, 9])
    ref = alone.decode([2], [10]).clone()
    crowd = ModelRunner(model, 4, engine="native")
    crowd.prefill(0, list(range(20, 40)))
    crowd.prefill(2, [5, 6, 7, 8, 9])
    crowd.prefill(3, [1])
    got = crowd.decode([0, 2, 3], [11, 10, 12])
    assert torch.equal(got[1], ref[0])


@pytest.mark.needs_c_step
def test_torch_rows_match_native(model: GPT) -> None:
    runners = {e: ModelRunner(model, 3, engine=e) for e in ("native", "torch")}
    for r in runners.values():
        r.prefill(0, [1, 2, 3])
        r.prefill(2, list(range(40, 60)))
    a = runners["native"].decode([0, 2], [7, 8])
    b = runners["torch"].decode([0, 2], [7, 8])
    assert (a - b).abs().max().item() < 1e-4


def test_cancel_frees_the_slot_at_the_next_step(model: GPT, enc) -> None:
    eng = Engine(model, enc, 1)
    first = Sequence(prompt=[1], settings=GREEDY, max_tokens=100)
    second = Sequence(prompt=[2], settings=GREEDY, max_tokens=3)
    eng.add(first)
    eng.add(second)
    eng.step()
    assert first.slot == 0 and second.slot == -1
    eng.cancel(first)
    eng.step()
    assert first.finish_reason == "cancelled" and second.slot == 0
    assert len(first.tokens) == 1


def test_one_failing_request_fails_alone(model: GPT, enc) -> None:
    seen: list[str | None] = []

    def explode(seq: Sequence, event) -> None:
        if event.finish_reason == "error":
            seen.append(seq.error)
            return
        if event.index == 3:
            raise ValueError("client went away badly")

    bad = Sequence(prompt=[1, 2], settings=GREEDY, max_tokens=20, on_event=explode)
    good = Sequence(prompt=[3, 4], settings=GREEDY, max_tokens=20)
    Engine(model, enc, 2).run([bad, good])
    assert bad.finish_reason == "error" and "client went away badly" in (bad.error or "")
    assert seen and len(bad.tokens) == 4
    assert good.tokens == _alone_tokens(model, enc, [3, 4], 20)


def test_stop_strings_and_eos(model: GPT, enc) -> None:
    ref = _alone_tokens(model, enc, [72, 105], 30)
    text = enc.decode(ref)
    stop = text[5:8]
    seq = Sequence(prompt=[72, 105], settings=GREEDY, max_tokens=30, stops=[stop])
    Engine(model, enc, 1).run([seq])
    assert seq.finish_reason == "stop" and seq.text == text[:text.find(stop)]


def test_queue_is_bounded() -> None:
    s = Scheduler(1, max_queue=2)
    for _ in range(2):
        s.add(Sequence(prompt=[1], settings=GREEDY, max_tokens=1))
    with pytest.raises(QueueFull):
        s.add(Sequence(prompt=[1], settings=GREEDY, max_tokens=1))
    assert len(s.admit()) == 1 and len(s.waiting) == 1


@pytest.mark.needs_c_step
def test_chunked_prefill_matches_the_pytorch_prefill() -> None:
    """The C step prefills prompts as rows of the step (in calls of at most 64 rows, so a
    150-token prompt takes three) beside running decode rows; the logits match PyTorch's
    one-pass prefill and the greedy tokens match the torch engine."""
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=257, block_size=160, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = [(i * 37) % 256 for i in range(150)]
    fast = ModelRunner(model, 2, engine="native")
    ref = ModelRunner(model, 2, engine="torch")
    fast.prefill(1, [5, 6, 7])
    out = fast.run([(0, prompt)], [1], [8])
    firsts, dec = out.firsts, out.logits
    want_first = ref.prefill(0, prompt)
    ref.prefill(1, [5, 6, 7])
    want_dec = ref.decode([1], [8])
    assert (firsts[0] - want_first).abs().max().item() < 1e-4
    assert dec is not None and (dec - want_dec).abs().max().item() < 1e-4
    enc = tok.byte_encoding()
    runs = {}
    for engine in ("native", "torch"):
        seq = Sequence(prompt=prompt, settings=GREEDY, max_tokens=30)
        Engine(model, enc, 1, engine=engine).run([seq])
        runs[engine] = seq.tokens
    assert runs["native"] == runs["torch"] and len(runs["native"]) > 10


def test_prefill_budget_spreads_a_burst_over_steps() -> None:
    s = Scheduler(8)
    for n in (10, 5, 3, 20, 1):
        s.add(Sequence(prompt=[1] * n, settings=GREEDY, max_tokens=1))
    assert [len(q.prompt) for q in s.admit(16)] == [10, 5]  # 10 + 5 fits, + 3 would not
    assert [len(q.prompt) for q in s.admit(16)] == [3]  # the 20 after it would not fit
    assert [len(q.prompt) for q in s.admit(16)] == [20]  # over the budget alone: still goes
    assert [len(q.prompt) for q in s.admit(None)] == [1]


def test_admitting_into_a_step_under_way_keeps_to_its_limits() -> None:
    """Joining a step in progress: even the first request must fit the budget (its rows must
    fit the step's row limit), the step's own slots are not used, and at most `most` go."""
    s = Scheduler(4)
    s.admit()  # nothing waits yet
    for n in (6, 2, 2, 2):
        s.add(Sequence(prompt=[1] * n, settings=GREEDY, max_tokens=1))
    assert s.admit(5, strict=True) == []  # the oldest (6 tokens) does not fit: nobody jumps it
    assert [len(q.prompt) for q in s.admit(5)] == [6]  # a step boundary: the first always goes
    got = s.admit(8, strict=True, avoid={1, 2}, most=2)
    assert [(len(q.prompt), q.slot) for q in got] == [(2, 3)]  # slots 1 and 2 avoided, 0 taken
    assert [q.slot for q in s.admit(8, strict=True, most=1)] == [1]


def test_a_budget_does_not_change_results(model: GPT, enc) -> None:
    sizes = [20, 9, 31]

    def run(budget: int | None) -> list[list[int]]:
        seqs = [Sequence(prompt=tok.encode(enc, p), settings=GREEDY, max_tokens=n)
                for p, n in zip(PROMPTS, sizes, strict=False)]
        Engine(model, enc, 3, prefill_budget=budget).run(seqs)
        return [q.tokens for q in seqs]

    assert run(4) == run(None)


def test_prefill_first_runs_prompts_alone_with_the_same_results(model: GPT, enc) -> None:
    """With prefill_first, a step that starts prompts carries no decoding rows; the tokens
    are the same as mixed steps give (each row's result never depends on its step-mates)."""
    sizes = [12, 3, 20, 7]

    def run(first: bool) -> tuple[list[list[int]], list[tuple[int, int]]]:
        seqs = [Sequence(prompt=tok.encode(enc, p), settings=GREEDY, max_tokens=n)
                for p, n in zip(PROMPTS * 2, sizes, strict=False)]
        engine = Engine(model, enc, 2, prefill_budget=8, prefill_first=first)
        steps, inner = [], engine.runner.run

        def spy(prompts, slots, inputs, drafts=None, join=None):
            steps.append((len(prompts), len(slots)))
            return inner(prompts, slots, inputs, drafts, join)

        engine.runner.run = spy  # type: ignore[method-assign]
        engine.run(seqs)
        return [q.tokens for q in seqs], steps

    mixed, mixed_steps = run(False)
    alone, alone_steps = run(True)
    assert alone == mixed and all(len(t) == n for t, n in zip(alone, sizes, strict=True))
    assert any(p and d for p, d in mixed_steps)  # mixed steps happen without the policy
    assert all(not (p and d) for p, d in alone_steps)
    assert sum(p for p, _ in alone_steps) == len(sizes)


@pytest.mark.needs_c_step
@pytest.mark.parametrize("arrivals", [(1,), (2,), (1, 2)])
def test_requests_joining_a_step_in_progress_get_their_tokens_alone(enc, arrivals) -> None:
    """A request that arrives while a step is under way joins it at a layer boundary (its
    rows catch up on the layers done, then go on with the others): it gets its first token
    from that step, and every request's tokens and log-probabilities equal those it gets
    alone, bit for bit, greedy and seeded. Each newcomer's prompt is the previous request's
    window plus one token, so it may reuse that slot's cache only up to the column the step
    is still writing."""
    torch.manual_seed(7)
    model = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=4, n_head=2, n_embd=32)).eval()
    eng = Engine(model, enc, 3, engine="native", join_mid_step=True)
    eng.join_min_s = 0.0  # this model's steps are far shorter than a served model's
    first = _logged(tok.encode(enc, "The quick brown fox"), GREEDY, 20, None)
    eng.add(first)
    for _ in range(4):
        eng.step()
    joined: list[Sequence] = []
    offers, inner = [], eng._join_step

    def arrive(room: int, upto: dict[int, int]) -> list[tuple[int, list[int]]]:
        offers.append(dict(upto))
        if len(offers) in arrivals:  # arrives during this step, before this boundary
            before = (joined or [first])[-1]
            window = eng.runner.windows[before.slot]
            joined.append(_logged([*window, 33 + len(joined)], SAMPLED, 9, 11 + len(joined)))
            eng.add(joined[-1])
        return inner(room, upto)

    eng._join_step = arrive  # type: ignore[method-assign]
    steps = eng.steps
    eng.step()
    assert eng.steps == steps + 1 and eng.joined_mid_step == len(arrivals)
    assert all(len(seq.tokens) == 1 for seq in joined)
    assert offers[0] == {first.slot: len(joined[0].prompt) - 2}  # the column being written
    metrics = Metrics(lambda: (0, 0))  # /metrics counts the joined requests, not the other
    for seq in (first, *joined):
        metrics.on_token(seq, TokenEvent(token=seq.tokens[-1], text="", index=0, positions=1))
    assert metrics.joined._value.get() == len(arrivals)
    eng.run([])
    for seq in (first, *joined):
        alone = _logged(seq.prompt, seq.settings, seq.max_tokens, seq.seed)
        Engine(model, enc, 1, engine="native").run([alone])
        assert seq.log == alone.log and len(seq.tokens) == seq.max_tokens  # type: ignore[attr-defined]


def _logged(prompt: list[int], settings: SamplerSettings, n: int, seed: int | None
            ) -> Sequence:
    """A request that keeps (token, log-probability) of every token it is given in .log."""
    seq = Sequence(prompt=prompt, settings=settings, max_tokens=n, seed=seed, logprobs=0)
    seq.log = []  # type: ignore[attr-defined]
    seq.on_event = lambda s, e: s.log.append((e.token, e.logprob))  # type: ignore[attr-defined]
    return seq
