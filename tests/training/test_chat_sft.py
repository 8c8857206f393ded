"""Chat fine-tuning: conversations in JSONL, the loss on the assistant's tokens, starting from
another run's weights, and what a fine-tuned run answers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from minigpt_cli import tokenizer as tok
from minigpt_cli.config import config_from_dict
from minigpt_cli.errors import UserError
from minigpt_cli.model import store
from minigpt_cli.tokenizer import chat
from minigpt_cli.training import chat_data
from minigpt_cli.training.loop import train
from tests.conftest import chat_raw, reverse_task, tiny_raw, write_jsonl


def test_rows_are_whole_conversations_with_targets_only_on_the_answer(tmp_path) -> None:
    enc = tok.with_tokens(tok.byte_encoding(), chat.CHAT_TOKENS)
    template = chat.default_template(tok.EOT)
    convs = [r["messages"] for r in reverse_task(3, seed=0)]
    data = chat_data.tokenize(enc, template, convs, 32, False, [])
    x, y = chat_data.rows(data, [0, 1, 2], pad=enc.eot_token)
    widest = max(len(i) for i in data.ids) - 1
    assert x.shape == y.shape == (3, widest)
    for r, messages in enumerate(convs):
        answer = messages[1]["content"] + "<|end|>"
        assert enc.decode([t for t in y[r].tolist() if t >= 0]) == answer
        n = len(data.ids[r]) - 1
        assert x[r, :n].tolist() == data.ids[r][:-1].tolist()
        assert (y[r, n:] == chat_data.IGNORE).all()  # padding is never a target


@pytest.mark.parametrize("line, why", [
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"content": "hi"}]}', "role must be one of"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"text": "hi"}', "needs a field 'messages'"),
    ("not json", "not valid JSON"),
])
def test_a_bad_line_is_named_or_counted_and_skipped(tmp_path, line, why) -> None:
    good = [json.dumps(r) for r in reverse_task(4, seed=1)]
    path = write_jsonl(tmp_path / "chat.jsonl", [good[0], line, *good[1:]])
    with pytest.raises(UserError, match=f"chat.jsonl:2.*{why}"):
        chat_data.read_conversations(str(path), 0.25, skip_bad=False)
    convs = chat_data.read_conversations(str(path), 0.25, skip_bad=True)
    assert len(convs.train) + len(convs.val) == 4 and len(convs.skipped) == 1


def test_a_conversation_longer_than_the_context_is_named_or_skipped(tmp_path) -> None:
    enc = tok.with_tokens(tok.byte_encoding(), chat.CHAT_TOKENS)
    long = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"}]
    short = reverse_task(1, seed=2)[0]["messages"]
    template = chat.default_template(tok.EOT)
    with pytest.raises(UserError, match="longer than the context"):
        chat_data.tokenize(enc, template, [short, long], 32, False, [])
    skipped: list[str] = []
    data = chat_data.tokenize(enc, template, [short, long], 32, True, skipped)
    assert len(data.ids) == 1 and "conversation 2" in skipped[0]


def test_chat_training_records_its_template_and_resumes_exactly(tmp_path) -> None:
    """A chat run trains (its losses are numbers: every row has a target), records its chat
    tokens and template with its tokenizer, and a run stopped half-way and resumed ends with
    the uninterrupted run's weights, bit for bit (float32), as text runs do."""
    source = write_jsonl(tmp_path / "chat.jsonl", reverse_task(64, seed=3))
    whole = chat_raw(tmp_path, source, max_steps=6, save_interval=3)
    whole["out_dir"] = str(tmp_path / "whole")
    summary = train(config_from_dict(whole))
    assert summary.step == 6
    assert math.isfinite(summary.val_loss) and math.isfinite(summary.train_loss)
    half = dict(whole, out_dir=str(tmp_path / "half"))
    train(config_from_dict(half, ["train.max_steps=3"]))
    train(config_from_dict(half), resume=True)
    a, _ = store.load_safetensors(tmp_path / "whole" / store.MODEL_FILE)
    b, meta = store.load_safetensors(tmp_path / "half" / store.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    desc = meta["tokenizer"]
    assert desc["added_tokens"] == {t: 257 + i for i, t in enumerate(chat.CHAT_TOKENS)}
    assert chat.ChatTemplate.from_dict(desc["chat"]) == chat.default_template(tok.EOT)


def test_init_from_takes_the_runs_weights_and_refuses_a_conflicting_shape(tmp_path) -> None:
    """A text run fine-tuned on chat: its architecture and weights, two (here four) new
    embedding rows for the chat tokens, the mean of the others; a model key that disagrees
    with the base run is a one-line error."""
    base = tiny_raw(tmp_path / "corpus.txt", tmp_path / "base")
    (tmp_path / "corpus.txt").write_text("reverse abc cba. " * 400, encoding="utf-8")
    base["tokenizer"] = {"kind": "byte"}
    base["train"].update(max_steps=2, eval_interval=2, save_interval=2)
    train(config_from_dict(base))
    source = write_jsonl(tmp_path / "chat.jsonl", reverse_task(32, seed=4))
    sft = {"out_dir": str(tmp_path / "sft"), "device": "cpu", "dtype": "float32",
           "tokenizer": {"kind": "bpe"},
           "data": {"source": str(source), "format": "chat"},
           "train": {"init_from": str(tmp_path / "base"), "max_steps": 1, "batch_size": 4,
                     "eval_interval": 1, "save_interval": 1, "eval_steps": 1, "lr": 1e-9,
                     "min_lr": 0.0, "warmup_steps": 0}}
    train(config_from_dict(sft))
    before, _ = store.load_safetensors(tmp_path / "base" / store.MODEL_FILE)
    after, meta = store.load_safetensors(tmp_path / "sft" / store.MODEL_FILE)
    assert meta["model_config"]["n_embd"] == base["model"]["n_embd"]
    assert meta["tokenizer"]["kind"] == "byte"  # the base run's tokenizer, not the config's
    old, new = before["wte.weight"], after["wte.weight"]
    assert new.shape[0] == old.shape[0] + 4
    assert torch.allclose(new[:257], old, atol=1e-5)  # lr 1e-9: one step barely moves them
    assert torch.allclose(new[257:], old.mean(0).expand(4, -1), atol=1e-5)
    clash = {**sft, "out_dir": str(tmp_path / "clash"), "model": {"n_layer": 9}}
    with pytest.raises(UserError, match=r"model\.n_layer is 9 in the config but 2"):
        train(config_from_dict(clash))
    yaml.safe_dump(meta["config"])  # the saved config is plain data
