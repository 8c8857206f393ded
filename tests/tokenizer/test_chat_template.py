"""Chat templates: rendering, the assistant's tokens, the sandbox, and bad conversations."""

from __future__ import annotations

import pytest

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.tokenizer import chat

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Farewell."}]


@pytest.fixture
def enc():
    return tok.with_tokens(tok.byte_encoding(), chat.CHAT_TOKENS)


def test_chat_tokens_come_after_the_vocabulary_and_survive_a_save(enc, tmp_path) -> None:
    base = tok.byte_encoding()
    assert [enc.encode_single_token(t) for t in chat.CHAT_TOKENS] == [257, 258, 259, 260]
    assert enc.n_vocab == base.n_vocab + 4 and enc.encode("Hi") == base.encode("Hi")
    assert tok.with_tokens(enc, chat.CHAT_TOKENS) is enc  # nothing to add
    again = tok.load(tok.describe(enc, "byte"), tmp_path)
    assert again._special_tokens == enc._special_tokens


def test_the_default_template_renders_each_turn_between_role_and_end_markers(enc) -> None:
    template = chat.default_template(tok.EOT)
    text = chat.render(template, CONVERSATION[:2], add_generation_prompt=True)
    assert text == "<|endoftext|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
    ids = chat.prompt_ids(enc, template, CONVERSATION[:2])
    assert ids[0] == enc.eot_token and ids[-1] == enc.encode_single_token("<|assistant|>")
    assert chat.stop_ids(enc, template) == {enc.encode_single_token("<|end|>")}


def test_only_the_assistants_answers_and_their_end_of_turn_are_learned(enc) -> None:
    ids, mask = chat.assistant_mask(enc, chat.default_template(tok.EOT), CONVERSATION)
    assert len(ids) == len(mask)
    learned = [enc.decode([t]) for t, m in zip(ids, mask, strict=True) if m]
    assert "".join(learned) == "Hello.<|end|>Farewell.<|end|>"
    assert ids == chat.encode(enc, chat.render(chat.default_template(tok.EOT), CONVERSATION))


def test_a_template_that_does_not_render_prefix_by_prefix_is_refused(enc) -> None:
    backwards = chat.ChatTemplate("{% for m in messages|reverse %}{{ m['content'] }}|"
                                  "{% endfor %}", "", "")
    with pytest.raises(UserError, match="prefix by prefix"):
        chat.assistant_mask(enc, backwards, CONVERSATION[1:3])


@pytest.mark.parametrize("template, why", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "failed"),  # the sandbox says no
    ("{{ raise_exception('no system messages') }}", "no system messages"),
    ("{% for %}", "does not parse"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),  # a runtime error is the template's
    ("{{ messages[9]['content'] }}", "failed"),
])
def test_templates_run_sandboxed_and_fail_in_one_line(enc, template, why) -> None:
    with pytest.raises(UserError, match=why):
        chat.render(chat.ChatTemplate(template, "", ""), CONVERSATION)


@pytest.mark.parametrize("messages, why", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"content": "hi"}], "role must be one of"),
    ([{"role": "robot", "content": "hi"}], "role must be one of"),
    ([{"role": "user"}], "content must be a string"),
    (["hi"], "not an object"),
])
def test_bad_conversations_are_named(messages, why) -> None:
    with pytest.raises(UserError, match=why):
        chat.check_messages(messages)
