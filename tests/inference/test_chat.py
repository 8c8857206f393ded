"""A chat fine-tuned run in use: the server renders its template and stops at the end of the
turn, `minigpt chat` talks to it through a pipe, and its template leaves and comes back through
Hugging Face folders that `transformers` renders to the same ids.

The run is fine-tuned from scratch on `reverse_task` (a random word spelled backwards), whose
held-out answers are checkable: a run that learned nothing, or a template that renders the
prompt differently from training, answers wrong.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from minigpt_cli.convert.hf import export_hf, import_hf
from minigpt_cli.inference.chat_cli import Conversation
from minigpt_cli.inference.engine import Engine, Sequence
from minigpt_cli.inference.loading import chat_template, load_for_inference
from minigpt_cli.model import store
from minigpt_cli.tokenizer import chat
from tests.conftest import GREEDY, ROOT, reverse_task
from tests.inference.serving import serving

HELD_OUT = [r["messages"] for r in reverse_task(20, seed=99)]


def _greedy(run: Path, prompts: list[list[int]]) -> list[Sequence]:
    model, enc, meta, _ = load_for_inference(str(run), "cpu")
    stops = chat.stop_ids(enc, chat_template(meta))  # type: ignore[arg-type]
    seqs = [Sequence(prompt=p, settings=GREEDY, max_tokens=8, stop_ids=stops) for p in prompts]
    return Engine(model, enc, 4).run(seqs)


def test_the_server_renders_the_runs_template_and_stops_at_the_end_of_turn(chat_run) -> None:
    _, enc, meta, _ = load_for_inference(str(chat_run), "cpu")
    template = chat_template(meta)
    assert template is not None
    with serving(chat_run) as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
        replies = [client.chat.completions.create(model="run", messages=m[:1], max_tokens=8,
                                                  temperature=0) for m in HELD_OUT]
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(model="run", messages=HELD_OUT[0][:1],
                                                          max_tokens=8, temperature=0,
                                                          stream=True))
    right = sum(r.choices[0].message.content == m[1]["content"]
                for r, m in zip(replies, HELD_OUT, strict=True))
    assert right >= 18, f"{right} of 20 held-out words reversed"
    assert all(r.choices[0].finish_reason == "stop" for r in replies)  # at <|end|>, not length
    assert streamed == replies[0].choices[0].message.content
    ids = chat.prompt_ids(enc, template, HELD_OUT[0][:1])
    assert replies[0].usage.prompt_tokens == len(ids)
    engine = _greedy(chat_run, [ids])[0]
    assert engine.text == replies[0].choices[0].message.content


def test_minigpt_chat_through_a_pipe_answers_each_line_with_the_history(chat_run) -> None:
    """Each line is a turn and each answer a block; the second turn's prompt holds the first
    turn and its answer, which is what the engine answers given the same history."""
    lines = [m[0]["content"] for m in HELD_OUT[:2]]
    p = subprocess.run([sys.executable, "-m", "minigpt_cli", "chat", "--checkpoint",
                        str(chat_run), "--temperature", "0", "--max-new-tokens", "8"],
                       input="\n".join(lines) + "\n", capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    answers = p.stdout.split("\n\n")
    assert answers[0] == HELD_OUT[0][1]["content"] and answers[2:] == [""]
    _, enc, meta, _ = load_for_inference(str(chat_run), "cpu")
    talk = Conversation(enc, chat_template(meta), 32)
    talk.turns = [{"role": "user", "content": lines[0]},
                  {"role": "assistant", "content": answers[0]},
                  {"role": "user", "content": lines[1]}]
    assert answers[1] == _greedy(chat_run, [talk.prompt(8)])[0].text


def test_a_long_conversation_drops_its_oldest_turns_and_keeps_the_system_text() -> None:
    from minigpt_cli import tokenizer as tok

    enc = tok.with_tokens(tok.byte_encoding(), chat.CHAT_TOKENS)
    talk = Conversation(enc, chat.default_template(tok.EOT), 48, system="S")
    for i in range(4):
        talk.turns += [{"role": "user", "content": f"q{i}"}, {"role": "assistant",
                                                             "content": f"a{i}"}]
    talk.turns.append({"role": "user", "content": "last"})
    ids = talk.prompt(8)
    text = enc.decode(ids)
    assert len(ids) + 8 <= 48 and text.startswith("<|endoftext|><|system|>S<|end|>")
    assert text.endswith("<|user|>last<|end|><|assistant|>") and "q0" not in text
    talk.turns[-1]["content"] = "x" * 60
    with pytest.raises(Exception, match="do not fit the run's context"):
        talk.prompt(8)


def test_the_template_leaves_and_returns_through_hugging_face_folders(chat_run,
                                                                      tmp_path) -> None:
    """export-hf writes the template into tokenizer_config.json, `transformers` renders it to
    minigpt's ids, and import-hf brings it back with the run."""
    from transformers import AutoTokenizer

    export_hf(chat_run, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    _, enc, meta, _ = load_for_inference(str(chat_run), "cpu")
    template = chat_template(meta)
    assert template is not None
    conversations = [HELD_OUT[0][:1], HELD_OUT[1], [{"role": "system", "content": "Be kind."},
                                                    *HELD_OUT[2]]]
    for messages in conversations:
        theirs = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert theirs == chat.prompt_ids(enc, template, messages)
        whole = hf.apply_chat_template(messages, return_dict=False)
        assert whole == chat.encode(enc, chat.render(template, messages))
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = store.read_meta(tmp_path / "back" / store.MODEL_FILE)["tokenizer"]
    assert chat.ChatTemplate.from_dict(back.get("chat")) == template


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""


@pytest.mark.parametrize("template", [CHATML, ZEPHYR], ids=["chatml", "zephyr"])
def test_an_imported_folders_own_template_renders_as_transformers_renders_it(
        chat_run, tmp_path, template: str) -> None:
    """A folder from elsewhere: its tokenizer_config.json's template (whitespace control,
    loop variables, eos_token) comes in with import-hf and renders the ids `transformers`
    renders from the same folder."""
    import json

    from transformers import AutoTokenizer

    export_hf(chat_run, tmp_path / "hf")
    config_path = tmp_path / "hf" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    import_hf(tmp_path / "hf", tmp_path / "run")
    _, enc, meta, _ = load_for_inference(str(tmp_path / "run"), "cpu")
    mine = chat_template(meta)
    assert mine is not None and mine.template == template
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be kind."}, *HELD_OUT[0],
                {"role": "user", "content": "and again"}]
    for n in (1, 2, 4):
        theirs = hf.apply_chat_template(messages[:n], add_generation_prompt=True,
                                        return_dict=False)
        assert theirs == chat.prompt_ids(enc, mine, messages[:n])
