"""The fused C decode step must compute what the PyTorch forward computes.

Every check steps both engines on the same inputs and compares logits (float32: only the
order of additions differs) and greedy tokens. Shapes cover bias on and off, batches with
left padding, context overflow (re-prefill), and beam search's cache reordering.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.inference import native
from minigpt_cli.inference.engine import ModelRunner
from minigpt_cli.inference.generate import Decoder, beam_search, generate
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model.gpt import GPT, GPTConfig, KVCache

GREEDY = SamplerSettings(temperature=0.0)


def _model(seed: int = 3, **shape: object) -> GPT:
    torch.manual_seed(seed)
    cfg = {"vocab_size": 257, "block_size": 48, "n_layer": 2, "n_head": 4, "n_embd": 64,
           **shape}
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: peaked, context-dependent logits
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 0.5)
    return model


def _lockstep(model: GPT, prompts: list[list[int]], steps: int) -> float:
    """Step a native and a torch decoder on the same tokens; the largest logit difference."""
    fast = Decoder(model, prompts, engine="native")
    ref = Decoder(model, prompts, engine="torch")
    assert (fast.engine, ref.engine) == ("native", "torch")
    worst = 0.0
    for _ in range(steps):
        a, b = fast.logits(), ref.logits()
        assert a.shape == b.shape == (len(prompts), model.config.vocab_size)
        worst = max(worst, (a - b).abs().max().item())
        nxt = b.argmax(-1).tolist()
        fast.append(nxt)
        ref.append(nxt)
    return worst


@pytest.mark.parametrize("bias", [True, False])
def test_native_step_matches_torch(bias: bool) -> None:
    model = _model(bias=bias)
    assert _lockstep(model, [[1, 2, 3, 4, 5]], 30) < 1e-4


ARCHITECTURES = {
    "llama": {"norm": "rmsnorm", "position": "rotary", "mlp": "swiglu", "bias": False},
    "qk_norm+relu2": {"qk_norm": True, "mlp": "relu2", "position": "rotary", "rope_theta": 50.0},
    "rmsnorm+learned": {"norm": "rmsnorm", "mlp_hidden": 72},
    "norm_eps": {"norm_eps": 0.05, "qk_norm": True},  # every norm, query/key norm included
}


@pytest.mark.parametrize("arch", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_native_step_matches_torch_for_every_architecture(arch: dict) -> None:
    """The C step computes the layers.py options too (RMSNorm, rotary positions, SwiGLU and
    ReLU², query/key norm, any MLP width), across slides and several rows in one call."""
    model = _model(block_size=16, **arch)
    assert _lockstep(model, [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 100, 50]], 40) < 1e-4
    int8 = _model(block_size=16, **arch)
    from minigpt_cli.model.int8 import quantize_model

    quantize_model(int8)
    assert _lockstep(int8, [[3, 1, 4, 1, 5]], 20) < 1e-4


def test_native_step_matches_torch_with_padding_and_overflow() -> None:
    model = _model(block_size=16)
    prompts = [[7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [200, 100, 50]]
    # 60 steps cross the 16-token window several times: slides, re-prefills, padding masks.
    assert _lockstep(model, prompts, 60) < 1e-4


def test_native_step_sees_the_cache() -> None:
    """Guard against a step that ignores the cache: corrupting a cached key must show."""
    model = _model()
    d = Decoder(model, [[1, 2, 3, 4, 5, 6]], engine="native")
    d.logits()
    d.append([9])
    clean = d.logits().clone()
    d2 = Decoder(model, [[1, 2, 3, 4, 5, 6]], engine="native")
    d2.logits()
    with torch.inference_mode():
        d2.cache.k[1, 0, :, 2] += 3.0
    d2.append([9])
    assert (d2.logits() - clean).abs().max().item() > 1e-2


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_native_equals_torch(use_cache: bool) -> None:
    enc = tok.byte_encoding()
    model = _model(block_size=24)
    prompts = [tok.encode(enc, "Once upon"), tok.encode(enc, "a")]
    runs = {}
    for engine in ("native", "torch"):
        out, timings = generate(model, enc, prompts, GREEDY, 80, use_cache=use_cache,
                                engine=engine)
        assert timings.engine == (engine if use_cache else "torch")
        runs[engine] = [c.tokens for c in out]
    assert runs["native"] == runs["torch"]
    assert len(runs["native"][0]) > 40


def test_beam_search_native_equals_torch() -> None:
    enc = tok.byte_encoding()
    model = _model()
    prompt = tok.encode(enc, "to be")
    fast, t_fast = beam_search(model, enc, prompt, 4, 30, engine="native")
    ref, t_ref = beam_search(model, enc, prompt, 4, 30, engine="torch")
    assert (t_fast.engine, t_ref.engine) == ("native", "torch")
    assert fast.tokens == ref.tokens


def test_engine_choice() -> None:
    model = _model()
    assert native.choose_engine("auto", model) == "native"
    assert native.choose_engine("torch", model) == "torch"
    with pytest.raises(UserError, match="unknown engine"):
        native.choose_engine("fast", model)
    half = _model().to(torch.bfloat16)
    assert native.choose_engine("auto", half) == "torch"
    with pytest.raises(UserError, match="float32 only"):
        native.choose_engine("native", half)
    model.train()
    assert native.choose_engine("auto", model) == "torch"


@pytest.fixture
def fresh_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """load_library() against an empty cache directory; the real one is restored after."""
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "cache"))
    native.load_library.cache_clear()
    yield tmp_path / "cache"
    native.load_library.cache_clear()


def test_library_is_built_once_into_the_cache_dir(fresh_library: Path) -> None:
    lib = native.load_library()
    assert not isinstance(lib, str), lib
    built = list((fresh_library / "native").glob("decode_step-*.so"))
    assert len(built) == 1
    assert [p.name for p in (fresh_library / "native").iterdir()] == [built[0].name]  # no temp
    stamp = built[0].stat().st_mtime_ns
    native.load_library.cache_clear()
    assert not isinstance(native.load_library(), str)
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_without_a_compiler_auto_falls_back(fresh_library: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(fresh_library / "no-such-compiler"))
    model = _model()
    reason = native.load_library()
    assert isinstance(reason, str) and "could not run" in reason
    assert native.choose_engine("auto", model) == "torch"
    assert Decoder(model, [[1, 2]]).engine == "torch"
    with pytest.raises(UserError, match="--engine native is not available"):
        native.choose_engine("native", model)


@pytest.mark.parametrize(("n_embd", "n_head", "rows"), [
    (36, 4, 11),  # blocks of 6/12, 2 and 1 rows
    (30, 3, 16),  # a width not divisible by 4 (head_dim 10), and exactly 16 rows
    (9, 1, 16),  # a width smaller than one vector, odd head_dim
    (36, 4, 65),  # more rows than one C call takes (64): two calls
])
def test_native_odd_shapes_and_row_blocks(n_embd: int, n_head: int, rows: int) -> None:
    """Widths that are not multiples of the C step's column strip (tails read one column at a
    time), and row counts that exercise every register block: each row equals the PyTorch
    forward, and equals itself decoded alone, bit for bit."""
    model = _model(n_embd=n_embd, n_head=n_head, vocab_size=263, block_size=160)
    runners = {e: ModelRunner(model, rows, engine=e) for e in ("native", "torch")}
    alone = ModelRunner(model, rows, engine="native")
    for r in runners.values():
        for s in range(rows):
            r.prefill(s, list(range(1 + s, 4 + 2 * s)))
    alone.prefill(5, list(range(6, 14)))
    tokens = [(7 * s) % 263 for s in range(rows)]
    got = runners["native"].decode(list(range(rows)), tokens).clone()
    ref = runners["torch"].decode(list(range(rows)), tokens)
    assert (got - ref).abs().max().item() < 1e-4
    assert torch.equal(alone.decode([5], [tokens[5]])[0], got[5])


_BUILD_AND_STEP = """
import pathlib, sys, time, torch
from minigpt_cli.inference import native
from minigpt_cli.inference.engine import ModelRunner
from minigpt_cli.model.gpt import GPT, GPTConfig
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.005)
lib = native.load_library()
assert not isinstance(lib, str), lib
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
runner = ModelRunner(model, 1, engine="native")
print(runner.prefill(0, [1, 2, 3]).sum().item())
"""


def test_two_processes_building_the_library_at_once(tmp_path: Path) -> None:
    """Two processes start with an empty cache at the same moment: both build, each into its
    own temp file renamed into place, so both load a whole library and compute the same."""
    env = {**os.environ, "MINIGPT_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_AND_STEP, str(tmp_path / f"r{i}"),
                               str(tmp_path / "go")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"r{i}").exists() for i in range(2)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == outs[1][0] and outs[0][0].strip()
    assert [p.suffix for p in (tmp_path / "cache" / "native").iterdir()] == [".so"]


@pytest.mark.parametrize("arch", [{}, ARCHITECTURES["llama"]], ids=["gpt2", "llama"])
def test_a_step_split_at_layer_boundaries_gives_the_same_bits(arch: dict) -> None:
    """The engine lets a late request join a step in progress: the step's rows run some
    layers, the newcomer's rows catch up on those layers alone, and all go on in one call
    (runner._join_late). Logits and every cached key and value must equal one whole call's,
    bit for bit, wherever the step is split."""
    model = _model(n_layer=4, **arch)
    step = native.FusedForward(model)
    cfg = model.config
    prompt = [(5 * i + 3) % cfg.vocab_size for i in range(9)]
    cols, want = list(range(9)), [False] * 8 + [True]

    def cache() -> KVCache:
        c = KVCache(cfg, 2, cfg.block_size, "cpu", torch.float32)
        step([11, 12], [0, 1], [0, 0], [0, 1], c)  # slot 0 holds two tokens already
        return c

    whole = cache()
    ref = step([13, *prompt], [2, *cols], [0] + [1] * 9, [2, *cols], whole, [True, *want]).clone()
    for split in (1, 2, 3):
        c = cache()
        x = step([13], [2], [0], [2], c, None, (0, split)).clone()
        caught = step(prompt, cols, [1] * 9, cols, c, want, (0, split)).clone()
        got = step([13, *prompt], [2, *cols], [0] + [1] * 9, [2, *cols], c, [True, *want],
                   (split, 4), torch.cat([x, caught]))
        assert torch.equal(got, ref), split
        assert torch.equal(c.k, whole.k) and torch.equal(c.v, whole.v), split
    with pytest.raises(ValueError, match="residual stream"):
        step([13], [2], [0], [2], cache(), None, (1, 4))
