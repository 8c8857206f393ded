"""Speculative decoding by prompt lookup (engine/lookup.py): the output is the output of
decoding one token a step, token for token, greedy or seeded sampling, in fewer steps."""

from __future__ import annotations

import pytest
import torch

from minigpt_cli import native
from minigpt_cli import tokenizer as tok
from minigpt_cli.engine.lookup import propose
from minigpt_cli.generate import generate
from minigpt_cli.model import GPT, GPTConfig
from minigpt_cli.sampling import SamplerSettings

pytestmark = pytest.mark.skipif(isinstance(native.load_library(), str),
                                reason="prompt lookup runs on the C step")


def test_propose_copies_what_followed_the_last_occurrence() -> None:
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(ctx, 3, 2) == [7, 8]  # the latest earlier [1, 2, 3], not the first
    assert propose(ctx, 3, 9) == [7, 8, 5, 1, 2, 3]  # up to the end of the context
    assert propose(ctx, 4, 2) == [] and propose([1], 1, 2) == [] and propose(ctx, 0, 2) == []


def _model(block_size: int) -> GPT:
    torch.manual_seed(11)
    model = GPT(GPTConfig(vocab_size=257, block_size=block_size, n_layer=2, n_head=2,
                          n_embd=32)).eval()
    with torch.no_grad():  # peaked logits, so greedy text repeats itself (lookup has work)
        for p in model.parameters():
            p.normal_(0.0, 0.4 if p.dim() > 1 else 0.5)
    return model


@pytest.mark.parametrize(("settings", "seed"), [
    (SamplerSettings(temperature=0.0), None),
    (SamplerSettings(temperature=0.8, top_k=20), 5),
])
@pytest.mark.parametrize(("n", "k", "block"), [(1, 1, 96), (2, 3, 96), (1, 8, 96),
                                               (2, 4, 40)])  # block 40: the window slides
def test_prompt_lookup_output_equals_one_token_a_step(settings, seed, n: int, k: int,
                                                      block: int) -> None:
    enc = tok.byte_encoding()
    model = _model(block)
    text = "the cat sat on the mat. the cat sat on the mat. the cat"
    prompts = [tok.encode(enc, text)[-block // 2:], tok.encode(enc, "abcabcabc")]
    plain, t0 = generate(model, enc, prompts, settings, 90, seed=seed, engine="native")
    spec, t1 = generate(model, enc, prompts, settings, 90, seed=seed, engine="native",
                        prompt_lookup=n, draft_k=k)
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
    assert [c.finish_reason for c in spec] == [c.finish_reason for c in plain]
    assert t1.drafted > 0 and t1.accepted > 0  # the drafts were verified, some kept
    assert t1.accepted <= t1.drafted and t1.verify_steps <= len(prompts) * t1.steps
    assert t1.steps < t0.steps  # and that saved steps


def test_prompt_lookup_under_load_equals_alone() -> None:
    """The server's case: six requests through four slots (some wait, slots are reused),
    greedy and seeded, all with prompt lookup, give what each gives alone without it; and
    the server's metrics count the drafts."""
    from minigpt_cli.engine import Engine, Sequence
    from minigpt_cli.serve.metrics import Metrics

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
