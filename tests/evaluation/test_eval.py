"""`minigpt eval`: the sliding-window scorer against a direct per-token computation, agreement
with training's own validation figure, and exposure bias's accumulated error."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from minigpt_cli import tokenizer as tok
from minigpt_cli.config import config_from_dict
from minigpt_cli.errors import UserError
from minigpt_cli.evaluation import exposure as X
from minigpt_cli.evaluation.scoring import score_text, windows
from minigpt_cli.training.loop import train
from tests.conftest import score, tiny_raw


@given(n=st.integers(2, 300), window=st.integers(1, 64), stride=st.integers(1, 64))
def test_every_token_after_the_first_is_scored_once(n: int, window: int, stride: int) -> None:
    stride = min(stride, window)
    counts = np.zeros(n, dtype=int)
    for w in windows(n, window, stride):
        assert 0 <= w.begin < w.end <= n - 1 and w.end - w.begin <= window
        assert 1 <= w.new <= w.end - w.begin
        counts[w.end - w.new + 1:w.end + 1] += 1  # targets tokens[begin + 1:end + 1], last `new`
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_sliding_window_score_equals_direct_per_token_computation(tiny_model) -> None:
    """Each token's loss, recomputed alone from exactly the context the plan gives it."""
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (150,)).numpy()
    token_bytes = tok.token_byte_lengths(tok.byte_encoding())
    stride = 10
    got = score_text(tiny_model, tokens, token_bytes, stride=stride, batch_size=3)
    nats, count = 0.0, 0
    with torch.no_grad():
        for w in windows(len(tokens), tiny_model.config.block_size, stride):
            for j in range(w.end - w.new + 1, w.end + 1):  # token j, context tokens[begin:j]
                logits, _ = tiny_model(torch.from_numpy(tokens[w.begin:j][None].astype(np.int64)))
                nats -= torch.log_softmax(logits[0, -1].double(), -1)[int(tokens[j])].item()
                count += 1
    assert got.tokens == count == len(tokens) - 1
    assert got.nats == pytest.approx(nats, rel=1e-5)
    assert got.bytes == count  # one byte per byte token
    assert got.bpb == pytest.approx(nats / math.log(2) / count, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nats / count), rel=1e-5)


def test_own_validation_split_agrees_with_the_training_log(run: Path, tmp_path: Path) -> None:
    """Non-overlapping windows score what training's evaluation samples: the same text and
    the same context lengths, all of it rather than 64 windows of it."""
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val_bpb = [r["val_bpb"] for r in logged if "val_bpb" in r][-1]
    flat = score(run, stride=32, json_path=tmp_path / "e.json", plot_path=tmp_path / "e.png")
    assert flat["train_log_val_bpb"] == pytest.approx(val_bpb)
    assert flat["bits_per_byte"] == pytest.approx(val_bpb, rel=0.03)
    strict = json.loads((tmp_path / "e.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert strict["tokens"] == flat["tokens"]
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    overlapping = score(run)  # stride 16: past the first window, 16+ tokens of context
    assert overlapping["tokens"] == flat["tokens"] and overlapping["stride"] == 16
    assert overlapping["windows"] == 2 * flat["windows"] - 1


def test_exposure_against_itself_is_zero_and_undefined(run: Path, tmp_path: Path) -> None:
    out = io.StringIO()
    r = score(run, exposure=True, oracle=str(run), context=8, length=16, samples=2, windows=6,
              console=Console(file=out, width=250), plot_path=tmp_path / "x.png")
    assert max(max(v) for v in r["R"].values()) < 1e-6
    assert all(c["value"] is None for c in r["ex_acc_err_greedy"].values())
    assert "undefined" in out.getvalue() and "nan" not in out.getvalue().lower()
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_exposure_with_another_oracle_and_without_one(run: Path, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_DATA_DIR", str(tmp_path / "data"))
        raw = tiny_raw(run.parent / "corpus.txt", tmp_path / "oracle", max_steps=120)
        train(config_from_dict(raw))
    r = score(run, exposure=True, oracle=str(tmp_path / "oracle"), context=8, length=16,
              samples=2, windows=8)
    assert r["levels"] == [8, 16]
    for kind in ("data", "greedy", "sampled"):
        assert len(r["R"][kind]) == 16 and r["R"][kind][-1] > 0
        assert all(a <= b for a, b in zip(r["R"][kind], r["R"][kind][1:], strict=False))
    cell = r["ex_acc_err_greedy"]["16"]
    assert math.isfinite(cell["value"]) and cell["ci95"][0] <= cell["value"] <= cell["ci95"][1]
    out = io.StringIO()
    alone = score(run, exposure=True, context=8, length=16, samples=2, windows=8,
                  console=Console(file=out, width=250))
    assert "R" not in alone and "cannot be identified" in out.getvalue()
    assert set(alone["entropy_by_position"]) == {"data", "greedy", "sampled"}


def test_repetition_measures() -> None:
    rows = np.array([[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]])
    assert X.seq_rep(rows, 4, 8) == pytest.approx((1 - 4 / 5 + 0) / 2)
    assert X.distinct(rows[:1], 2, 8) == pytest.approx(4 / 7)
    assert X.table_levels(64) == [8, 16, 32, 64] and X.table_levels(40) == [8, 16, 32, 40]


def test_exposure_refuses_an_oracle_with_another_tokenizer(run: Path, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_DATA_DIR", str(tmp_path / "data"))
        raw = tiny_raw(run.parent / "corpus.txt", tmp_path / "bpe", max_steps=2)
        raw["tokenizer"] = {"kind": "bpe", "vocab_size": 300}
        train(config_from_dict(raw))
    with pytest.raises(UserError, match="another tokenizer"):
        score(run, exposure=True, oracle=str(tmp_path / "bpe"), context=8, length=16)
