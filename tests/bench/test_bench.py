"""bench: completes fast on a tiny model, reports every field, and catches a broken cache."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from minigpt_cli.bench.measure import kv_cache_bytes
from minigpt_cli.bench.run import run_bench
from minigpt_cli.errors import UserError
from minigpt_cli.inference.engine import ModelRunner


@pytest.fixture
def small_config(tmp_path: Path) -> Path:
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump({
        "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "dropout": 0.0}}))
    return path


def _bench(config: Path | None, tmp_path: Path, **kw) -> tuple[int, dict]:
    out = tmp_path / "bench.json"
    args = {"checkpoint": None, "config": config and str(config), "lengths": [8, 160],
            "prompt_len": 4,
            "batch_size": 1, "repeats": 1, "device": "cpu", "dtype": "float32",
            "json_path": out, "plot_path": None, "train": False,
            "console": Console(file=io.StringIO())}
    code = run_bench(**{**args, **kw})
    return code, json.loads(out.read_text())


def test_bench_reports_every_field(small_config: Path, tmp_path: Path) -> None:
    code, report = _bench(small_config, tmp_path, train=True)
    assert code == 0
    assert report["header"]["model"]["block_size"] == 164  # raised to fit prompt + 160
    for field in ("device", "dtype", "threads", "torch", "params", "engine"):
        assert field in report["header"]
    short, long = report["lengths"]
    assert (short["n"], long["n"]) == (8, 160)
    for mode in ("cached", "uncached"):
        for field in ("total_s", "tokens_per_s", "ms_per_token", "positions_computed"):
            assert field in long[mode]
        assert len(long[mode]["ms_per_token"]) == 160
    assert long["forwards_uncached"] == 160 * 161 // 2 and long["forwards_cached"] == 160
    assert long["cached"]["positions_computed"] == 4 + 159  # prefill once, then 1 per step
    assert long["uncached"]["positions_computed"] == sum(4 + i for i in range(160))
    assert long["tokens_match"] and short["tokens_match"] and long["ok"]
    assert long["max_logit_diff"] < 1e-3
    # the speed-up is reported, not asserted: a timing depends on the machine's load; the work
    # counts above are what the cache saves
    assert math.isfinite(long["speedup"]) and long["speedup"] > 0
    # float32 K and V: 2 x layers 2 x heads 2 x positions x head_dim 16 x 4 bytes
    assert long["kv_bytes_formula"] == 2 * 2 * 2 * (4 + 160) * 16 * 4
    assert long["kv_bytes_allocated"] == 2 * 2 * 2 * 164 * 16 * 4  # block_size 164 (raised)
    tv = report["train_vs_generate"]
    assert tv["training"]["forward_passes_per_sequence"] == 1
    assert tv["training"]["dropout"] == 0.1  # the config has none: timed with dropout on
    assert tv["scoring"]["forward_passes_per_sequence"] == 1 and tv["scoring"]["tokens_per_s"] > 0
    assert tv["generation"]["forward_passes_per_sequence"] == 163
    assert tv["training"]["memory_bytes"]["activations_saved_for_backward"] > 0
    assert report["memory"]["process_peak_rss_bytes"] > 0


def test_kv_bytes_are_measured_on_the_allocated_cache(tmp_path: Path) -> None:
    """A context window (256) longer than prompt + n (4 + 40), and a batch of 3: the cache
    holds the whole window for every row, the tutorial's formula counts the tokens used."""
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump({
        "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 3, "n_head": 2, "n_embd": 32, "block_size": 256, "dropout": 0.0}}))
    _, report = _bench(path, tmp_path, lengths=[40], batch_size=3)
    r = report["lengths"][0]
    assert report["header"]["model"]["block_size"] == 256
    assert r["kv_bytes_allocated"] == 2 * 3 * 3 * 2 * 256 * 16 * 4  # K,V x batch x layers ...
    assert r["kv_bytes_formula"] == 2 * 3 * 3 * 2 * (4 + 40) * 16 * 4


def test_the_tutorials_gpt2_memory_example() -> None:
    # GPT-2 small, 1000 tokens, fp32: 2 x 12 x 12 x 1000 x 64 floats = 73.7 MB (the tutorial's)
    assert round(kv_cache_bytes(12, 12, 1000, 64, 1, 4) / 1e6, 1) == 73.7
    assert round(kv_cache_bytes(12, 12, 1000, 64, 1, 2) / 1e6, 1) == 36.9


@pytest.mark.parametrize("engine", ["torch", "native"])
def test_broken_cache_fails_the_equality_check(small_config: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               engine: str) -> None:
    real_step = ModelRunner._next_tokens

    def corrupt(self: ModelRunner, slots: list[int], tokens: list[int]) -> torch.Tensor:
        if len(self.windows[slots[0]]) == 10:  # once, mid-way: a cached key of layer 0 breaks
            self.cache.k[0, :, :, 2] += 5.0
        return real_step(self, slots, tokens)

    monkeypatch.setattr(ModelRunner, "_next_tokens", corrupt)
    code, report = _bench(small_config, tmp_path, lengths=[30], engine=engine)
    assert report["header"]["engine"] == engine
    assert code == 1
    assert report["lengths"][0]["ok"] is False
    assert report["lengths"][0]["max_logit_diff"] > 1e-3


def test_bench_bad_lengths(small_config: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--lengths"):
        _bench(small_config, tmp_path, lengths=[0])


def test_bench_memory_wall_rows(small_config: Path, tmp_path: Path) -> None:
    """--quantize int8 adds float32 and int8 rows for cached decoding: the weight bytes a step
    streams (int8: 1 byte a weight plus a 2-byte float16 scale per 32), the GB/s those bytes
    imply at the measured step time, and how many greedy tokens the int8 run shares with
    float32."""
    code, report = _bench(small_config, tmp_path, lengths=[16], quantize="int8")
    assert code == 0
    f32, q8 = report["memory_wall"]
    assert (f32["weights"], q8["weights"]) == ("float32", "int8")
    n = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 32 * 257  # block matrices + head
    assert f32["bytes_per_step"] == 4 * n
    assert q8["bytes_per_step"] == n + 2 * n // 32
    for row in (f32, q8):
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0
        assert row["gb_per_s"] == pytest.approx(row["bytes_per_step"] / row["ms_per_step"]
                                                / 1e6)
    assert f32["tokens_match_float32"] == 1.0 and 0 <= q8["tokens_match_float32"] <= 1


def _random_run(out: Path, n_layer: int, n_embd: int) -> Path:
    """A run directory holding a random byte-level model, as `minigpt train` would leave it."""
    from minigpt_cli import tokenizer as tok
    from minigpt_cli.model import store
    from minigpt_cli.model.gpt import GPT, GPTConfig

    out.mkdir()
    torch.manual_seed(n_layer)
    model = GPT(GPTConfig(vocab_size=257, block_size=64, n_layer=n_layer, n_head=2,
                          n_embd=n_embd))
    store.save_model(out / store.MODEL_FILE, model, {
        "model_config": vars(model.config),
        "tokenizer": tok.describe(tok.byte_encoding(), "byte")})
    return out


def test_bench_speculative_rows(tmp_path: Path) -> None:
    """--prompt-lookup and --draft add rows beside plain decoding: the same greedy tokens,
    the model's and the draft's steps per token, and the weight bytes those steps stream."""
    run = _random_run(tmp_path / "run", 2, 32)
    draft = _random_run(tmp_path / "draft", 1, 16)
    code, report = _bench(None, tmp_path, checkpoint=str(run), lengths=[24], prompt_lookup=2,
                          draft=str(draft), draft_k=3)
    assert code == 0
    plain, _, drafted = report["speculative"]
    assert [r["mode"] for r in report["speculative"]] == ["plain", "prompt lookup 2",
                                                          f"draft {draft}"]
    assert all(r["same_as_plain"] for r in report["speculative"])
    target = 4 * (2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 32 * 257)
    assert plain["steps_per_token"] == 1 and plain["acceptance"] is None
    assert plain["weight_bytes_per_token"] == target
    small = 4 * ((16 * 48 + 16 * 16 + 16 * 64 + 64 * 16) + 16 * 257)
    assert drafted["draft_steps_per_token"] > 0 and 0 <= drafted["acceptance"] <= 1
    assert drafted["weight_bytes_per_token"] == pytest.approx(
        target * drafted["steps_per_token"] + small * drafted["draft_steps_per_token"])
    for row in report["speculative"]:
        assert row["gb_per_s"] == pytest.approx(row["weight_bytes_per_token"]
                                                * row["tokens_per_s"] / 1e9)
    with pytest.raises(UserError, match="--checkpoint"):
        _bench(None, tmp_path, prompt_lookup=2)
