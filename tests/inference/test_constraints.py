"""Structured output through the one engine: a barely trained model sampling at temperature 1
returns JSON its schema accepts every time; each row of a batch follows its own grammar (or
none) and gives what it gives alone; prompt-lookup drafts change nothing; a bad grammar is a
one-line error. (The server's `response_format` is tested in test_serve.py.)"""

from __future__ import annotations

import json

import jsonschema_rs
import pytest
import torch

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.inference.constraints import Grammar, constraint, from_response_format
from minigpt_cli.inference.engine import Engine, Sequence
from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.sampling import SamplerSettings
from tests.conftest import GREEDY

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"enum": ["red", "green", "blue"]}}}}


@pytest.mark.parametrize("engine", ["native", "torch"])
def test_sampled_json_is_valid_every_time(tiny_model, enc, engine: str) -> None:
    """20 of 20 at temperature 1 with a random-weight model (near-uniform logits: the worst
    case for wandering): the grammar, not the model, makes it valid."""
    prompts = [tok.encode(enc, "Person: ")] * 20
    out, _ = generate(tiny_model, enc, prompts, SamplerSettings(temperature=1.0), 120, seed=0,
                      engine=engine, grammar=Grammar("json_schema", PERSON))
    validator = jsonschema_rs.validator_for(PERSON)
    for c in out:
        assert c.finish_reason == "eos", c.text
        assert validator.is_valid(json.loads(c.text)), c.text
    assert len({c.text for c in out}) > 10  # sampled, not one answer forced


def test_each_row_follows_its_own_grammar_as_it_would_alone(model, enc) -> None:
    flag = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
            "additionalProperties": False}
    grammars = [Grammar("json_schema", flag), None, Grammar("regex", r"(yes|no)[0-9]{3}"),
                Grammar("json_schema", PERSON)]
    prompt = tok.encode(enc, "Q: ")
    ends = frozenset({enc.eot_token})

    def seq(g: Grammar | None, seed: int) -> Sequence:
        return Sequence(prompt=list(prompt), settings=SamplerSettings(temperature=0.9),
                        max_tokens=60, seed=seed, constraint=constraint(g, enc, ends))

    together = Engine(model, enc, 4).run([seq(g, i) for i, g in enumerate(grammars)])
    alone = [Engine(model, enc, 1).run([seq(g, i)])[0] for i, g in enumerate(grammars)]
    assert [s.tokens for s in together] == [s.tokens for s in alone]
    texts = [s.text for s in together]
    assert json.loads(texts[0]) in ({"ok": True}, {"ok": False})
    import re

    assert re.fullmatch(r"(yes|no)[0-9]{3}", texts[2])
    assert not texts[1].startswith("{")  # the unconstrained row is free


@pytest.mark.needs_c_step
def test_prompt_lookup_drafts_are_checked_against_the_grammar(model, enc) -> None:
    text = 'x {"a":"aaa","b":"aaa"} {"a":"aaa","b":"aaa"} '
    prompts = [tok.encode(enc, text)]
    grammar = Grammar("regex", r'\{"a":"a{1,6}","b":"a{1,6}"\}')
    plain, _ = generate(model, enc, prompts, GREEDY, 40, engine="native", grammar=grammar)
    spec, timings = generate(model, enc, prompts, GREEDY, 40, engine="native", grammar=grammar,
                             prompt_lookup=3, draft_k=4)
    assert spec[0].tokens == plain[0].tokens and plain[0].finish_reason == "eos"
    assert timings.drafted > 0


def test_bad_grammars_are_user_errors(enc) -> None:
    ends = frozenset({enc.eot_token})
    with pytest.raises(UserError, match="invalid regex"):
        constraint(Grammar("regex", "[0-9"), enc, ends)
    with pytest.raises(UserError, match="invalid json schema"):
        constraint(Grammar("json_schema", {"type": "nonsense"}), enc, ends)
    for bad in ({"type": "xml"}, {"type": "json_schema"},
                {"type": "json_schema", "json_schema": {"schema": 3}}):
        with pytest.raises(UserError, match="response_format"):
            from_response_format(bad)
    assert from_response_format({"type": "text"}) is None


def test_the_mask_leaves_the_models_logprobs(model, enc) -> None:
    """Reported log-probabilities are the model's, before the grammar's mask."""
    ends = frozenset({enc.eot_token})
    prompt = tok.encode(enc, "Q: ")
    seq = Sequence(prompt=list(prompt), settings=GREEDY, max_tokens=1, logprobs=0,
                   constraint=constraint(Grammar("regex", "z"), enc, ends))
    events = []
    seq.on_event = lambda s, ev: events.append(ev)
    Engine(model, enc, 1).run([seq])
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt]))
    lp = torch.log_softmax(logits[0, -1].float(), -1)
    assert seq.tokens == [ord("z")]
    assert events[0].logprob == pytest.approx(float(lp[ord("z")]), abs=1e-4)
