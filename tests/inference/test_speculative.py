"""Speculative decoding, by prompt lookup (engine/lookup.py) and by a draft model
(engine/draft.py): greedy output is the output of decoding one token a step, token for token;
lookup keeps seeded sampling identical too; the draft model's acceptance rule samples
exactly the target's distribution (chi-square tests on fixed toy distributions)."""

from __future__ import annotations

import pytest
import torch

from minigpt_cli import tokenizer as tok
from minigpt_cli.inference.engine.lookup import propose
from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.sampling import SamplerSettings, accept_or_resample
from minigpt_cli.model.gpt import GPT, GPTConfig

ENGINES = ["native", "torch"]


def test_propose_copies_what_followed_the_last_occurrence() -> None:
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(ctx, 3, 2) == [7, 8]  # the latest earlier [1, 2, 3], not the first
    assert propose(ctx, 3, 9) == [7, 8, 5, 1, 2, 3]  # up to the end of the context
    assert propose(ctx, 4, 2) == [] and propose([1], 1, 2) == [] and propose(ctx, 0, 2) == []


def _model(block_size: int, seed: int = 11, n_layer: int = 2, n_embd: int = 32) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=257, block_size=block_size, n_layer=n_layer, n_head=2,
                          n_embd=n_embd)).eval()
    with torch.no_grad():  # peaked logits, so greedy text repeats itself (lookup has work)
        for p in model.parameters():
            p.normal_(0.0, 0.4 if p.dim() > 1 else 0.5)
    return model


@pytest.mark.parametrize(("settings", "seed"), [
    (SamplerSettings(temperature=0.0), None),
    (SamplerSettings(temperature=0.8, top_k=20), 5),
    (SamplerSettings(temperature=0.0, repetition_penalty=1.3), None),  # history: no drafts
])
@pytest.mark.parametrize(("n", "k", "block"), [(1, 1, 96), (2, 3, 96), (1, 8, 96),
                                               (2, 4, 40)])  # block 40: the window slides
@pytest.mark.parametrize("engine", ENGINES)
def test_prompt_lookup_output_equals_one_token_a_step(settings, seed, n: int, k: int,
                                                      block: int, engine: str) -> None:
    enc = tok.byte_encoding()
    model = _model(block)
    text = "the cat sat on the mat. the cat sat on the mat. the cat"
    prompts = [tok.encode(enc, text)[-block // 2:], tok.encode(enc, "abcabcabc")]
    plain, t0 = generate(model, enc, prompts, settings, 90, seed=seed, engine=engine)
    spec, t1 = generate(model, enc, prompts, settings, 90, seed=seed, engine=engine,
                        prompt_lookup=n, draft_k=k)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
    assert [c.finish_reason for c in spec] == [c.finish_reason for c in plain]
    assert t1.drafted > 0 and t1.accepted > 0  # the drafts were verified, some kept
    assert t1.accepted <= t1.drafted and t1.verify_steps <= len(prompts) * t1.steps
    assert t1.steps < t0.steps  # and that saved steps


@pytest.mark.needs_c_step
def test_prompt_lookup_under_load_equals_alone() -> None:
    """The server's case: six requests through four slots (some wait, slots are reused),
    greedy and seeded, all with prompt lookup, give what each gives alone without it; and
    the server's metrics count the drafts."""
    from minigpt_cli.inference.engine import Engine, Sequence
    from minigpt_cli.inference.serve.metrics import Metrics

    enc = tok.byte_encoding()
    model = _model(64)
    texts = ["the cat sat on the mat. the cat", "abcabcabcab", "to be or not to be, to",
             "1 2 3 1 2 3 1", "no repeats here", "xyzxyz"]
    settings = [SamplerSettings(temperature=0.0), SamplerSettings(temperature=0.9, top_p=0.9)]

    def seqs(lookup: int) -> list[Sequence]:
        return [Sequence(prompt=tok.encode(enc, t), settings=settings[i % 2], max_tokens=50,
                         seed=40 + i, lookup=lookup, draft_k=3) for i, t in enumerate(texts)]

    alone = [Engine(model, enc, 1, engine="native").run([s])[0].tokens for s in seqs(0)]
    metrics = Metrics(lambda: (0, 0))
    loaded = seqs(2)
    for s in loaded:
        s.on_event = metrics.on_token
    Engine(model, enc, 4, engine="native").run(loaded)
    assert [s.tokens for s in loaded] == alone
    drafted = sum(s.drafted for s in loaded)
    assert drafted > 0 and metrics.drafted._value.get() == drafted
    assert metrics.accepted._value.get() == sum(s.accepted for s in loaded) > 0


# The draft model: the acceptance rule, then the engine.

# Chi-square critical values at alpha = 0.001, by degrees of freedom.
_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of counts against probs; a count where probs is 0 is infinite."""
    expected = probs * counts.sum()
    if bool((counts[probs == 0] > 0).any()):
        return float("inf")
    seen = probs > 0
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


@pytest.mark.parametrize(("p", "q"), [
    ([0.5, 0.2, 0.2, 0.1, 0.0], [0.1, 0.1, 0.3, 0.2, 0.3]),  # q has mass where p has none
    ([0.1, 0.6, 0.1, 0.1, 0.1], [0.7, 0.0, 0.1, 0.1, 0.1]),  # p has mass q never drafts
    ([0.3, 0.3, 0.2, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1]),  # q == p: every draft kept
])
def test_acceptance_rule_samples_the_target_distribution(p: list[float], q: list[float]
                                                         ) -> None:
    """Draft x ~ q, then the rule: the tokens that come out follow p, not q (chi-square at
    alpha 0.001); and the test can fail: the drafts themselves, kept as they are, are
    rejected by the same test whenever q differs from p."""
    pt, qt = torch.tensor(p), torch.tensor(q)
    gen = torch.Generator().manual_seed(7)
    n = 8000
    drafts = torch.multinomial(qt, n, replacement=True, generator=gen).tolist()
    out = torch.tensor([accept_or_resample(pt, qt, x, gen) for x in drafts])
    counts = torch.bincount(out, minlength=len(p)).float()
    df = int((pt > 0).sum()) - 1
    assert _chi_square(counts, pt) < _CHI2_999[df]
    kept = sum(int(a == b) for a, b in zip(out.tolist(), drafts, strict=True)) / n
    assert kept == pytest.approx(float(torch.minimum(pt, qt).sum()), abs=0.02)
    if p != q:
        naive = torch.bincount(torch.tensor(drafts), minlength=len(p)).float()
        assert _chi_square(naive, pt) > 10 * _CHI2_999[df]


def test_rejected_drafts_are_redrawn_from_the_residual() -> None:
    """The rejection path alone: a rejected draft's replacement follows the normalised
    positive part of p - q, and never repeats the rejected token."""
    p, q = torch.tensor([0.4, 0.3, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    residual = (p - q).clamp(min=0)
    residual /= residual.sum()
    gen = torch.Generator().manual_seed(3)
    replaced = []
    for x in torch.multinomial(q, 8000, replacement=True, generator=gen).tolist():
        y = accept_or_resample(p, q, x, gen)
        if y != x:
            replaced.append(y)
    counts = torch.bincount(torch.tensor(replaced), minlength=4).float()
    assert _chi_square(counts, residual) < _CHI2_999[1]  # support {0, 1}
    assert len(replaced) / 8000 == pytest.approx(1 - float(torch.minimum(p, q).sum()), abs=0.02)


def _eos_model(block: int) -> GPT:
    """A model that sometimes ends its text: the end-of-text row (never an input) copies a
    byte's row, a little larger, so it wins where that byte was close."""
    model = _model(block)
    with torch.no_grad():
        model.wte.weight[256] = model.wte.weight[71] * 1.05
    return model


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_draft_model_greedy_equals_one_token_a_step(engine: str, k: int) -> None:
    """Greedy with a draft model is greedy without one, token for token, at end-of-text, at
    max_tokens and across slides (31 + 100 tokens in a 96-token window, the drafter's too);
    with the target as its own draft every guess is kept."""
    enc = tok.byte_encoding()
    target = _eos_model(96)
    prompts = [tok.encode(enc, t) for t in ["the cat sat on the mat. the cat", "abcabc",
                                            "hello there", "xyz"]]
    greedy = SamplerSettings(temperature=0.0)
    plain, t0 = generate(target, enc, prompts, greedy, 100, engine=engine)
    assert {c.finish_reason for c in plain} == {"eos", "length"}
    assert any(len(c.prompt_tokens) + len(c.tokens) > 96 for c in plain)  # one slid
    for draft in (_model(96, seed=12, n_layer=1, n_embd=16), target):
        spec, t1 = generate(target, enc, prompts, greedy, 100, engine=engine, draft=draft,
                            draft_k=k)
        assert [c.tokens for c in spec] == [c.tokens for c in plain]
        assert [c.finish_reason for c in spec] == [c.finish_reason for c in plain]
        assert t1.drafted > 0 and t1.draft_steps > 0
    assert t1.accepted == t1.drafted and t1.steps < t0.steps  # the target drafting itself


@pytest.mark.parametrize("engine", ENGINES)
def test_draft_model_sampling_keeps_its_own_guesses(engine: str) -> None:
    """Sampling with the target as its own draft: q equals p, so the rule keeps every guess
    (up to rounding between a one-row and a many-row step)."""
    enc = tok.byte_encoding()
    target = _model(64)
    prompts = [tok.encode(enc, "the cat sat"), tok.encode(enc, "abc")]
    s = SamplerSettings(temperature=0.9, top_k=40, repetition_penalty=1.2)
    _, t = generate(target, enc, prompts, s, 80, seed=1, engine=engine, draft=target, draft_k=4)
    assert t.drafted > 100 and t.accepted >= 0.99 * t.drafted


def test_draft_model_under_load_equals_alone() -> None:
    """Six requests through four slots with a draft model, greedy and seeded sampling (one
    with a repetition penalty), give what each gives alone with it."""
    from minigpt_cli.inference.engine import Engine, Sequence

    enc = tok.byte_encoding()
    target, draft = _model(64), _model(64, seed=12, n_layer=1, n_embd=16)
    texts = ["the cat sat on the mat. the cat", "abcabcabcab", "to be or not to be, to",
             "1 2 3 1 2 3 1", "no repeats here", "xyzxyz"]
    settings = [SamplerSettings(temperature=0.0), SamplerSettings(temperature=0.9, top_p=0.9),
                SamplerSettings(temperature=1.0, repetition_penalty=1.3)]

    def seqs() -> list[Sequence]:
        return [Sequence(prompt=tok.encode(enc, t), settings=settings[i % 3], max_tokens=50,
                         seed=40 + i, draft_k=3) for i, t in enumerate(texts)]

    alone = [Engine(target, enc, 1, draft=draft).run([s])[0].tokens for s in seqs()]
    loaded = Engine(target, enc, 4, draft=draft).run(seqs())
    assert [s.tokens for s in loaded] == alone
    assert sum(s.drafted for s in loaded) > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_drafter_guesses_are_the_draft_models_own_greedy_text(engine: str) -> None:
    """The drafter's k greedy guesses for a context are what the draft model alone generates
    greedily from that context, also when the context overflows the draft's window (its
    prefill keeps the last block, then every guess slides it)."""
    from minigpt_cli.inference.engine import Sequence
    from minigpt_cli.inference.engine.draft import Drafter

    enc = tok.byte_encoding()
    draft = _model(16, seed=12, n_layer=1, n_embd=16)
    greedy = SamplerSettings(temperature=0.0)
    for context in (tok.encode(enc, "abc"), tok.encode(enc, "the cat sat on the mat. the cat")):
        alone, _ = generate(draft, enc, [context], greedy, 6, engine=engine)
        drafter = Drafter(draft, 2, enc.eot_token, engine)
        seq = Sequence(prompt=context[:-1], settings=greedy, max_tokens=50)
        seq.slot, seq.tokens, seq.next_input = 1, context[-1:], context[-1]
        guesses, dists = drafter.propose([seq], [6])
        assert guesses == [alone[0].tokens] and dists == [None]
