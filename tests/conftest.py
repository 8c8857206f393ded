"""Shared fixtures: a small corpus, a tiny config, offline tiktoken files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from minigpt_cli.config import config_from_dict
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
TIKTOKEN_CACHE = ROOT.parent / "shared" / "tiktoken-cache"
if TIKTOKEN_CACHE.is_dir() and "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_CACHE)

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Tests of the fused C step (test_native.py, test_prefix_cache.py, every "native" parameter and
# the tests marked needs_c_step) need a C compiler. Without one they are skipped, saying why,
# except under CI, whose machine has one: there a missing compiler fails them.
C_STEP_MODULES = {"test_native.py", "test_prefix_cache.py"}


def _needs_c_step(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (item.path.name in C_STEP_MODULES or "native" in params.values()
            or item.get_closest_marker("needs_c_step") is not None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CI") or not any(_needs_c_step(i) for i in items):
        return
    from minigpt_cli.inference import native

    lib = native.load_library()
    if not isinstance(lib, str):
        return
    skip = pytest.mark.skip(reason=f"no C step on this machine: {lib}")
    for item in items:
        if _needs_c_step(item):
            item.add_marker(skip)

WORDS = ["the", "king", "my", "lord", "good", "sweet", "love", "night", "day", "heart", "eyes",
         "speak", "come", "go", "hath", "thou", "thee", "shall", "would", "death", "life", "fair",
         "noble", "gentle"]


def make_text(n_speeches: int = 300, seed: int = 0) -> str:
    """A play-shaped corpus with enough structure for a tiny model to learn something."""
    rng = random.Random(seed)
    speakers = ["ROMEO", "JULIET", "NURSE", "FRIAR"]
    out = []
    for _ in range(n_speeches):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))).capitalize() + ","
                 for _ in range(rng.randint(1, 3))]
        out.append(f"{rng.choice(speakers)}:\n" + "\n".join(lines) + "\n")
    return "\n".join(out)


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "data"
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(d))
    return d


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(make_text(), encoding="utf-8")
    return p


def tiny_raw(corpus: Path, out_dir: Path, **train: object) -> dict:
    """A config dict small enough to train in a second or two on a CPU."""
    return {
        "out_dir": str(out_dir),
        "seed": 7,
        "device": "cpu",
        "dtype": "float32",  # what the bit-equality tests claim exactness in
        "data": {"source": str(corpus), "val_fraction": 0.1},
        "tokenizer": {"kind": "byte"},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.1},
        "train": {"batch_size": 8, "max_steps": 20, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 4, "eval_interval": 10, "eval_steps": 2, "save_interval": 5,
                  "log_interval": 5, **train},
    }


def fine_tune_imported(run: Path, corpus: Path) -> tuple[Any, dict, bool, dict]:
    """Three steps of `train RUN/config.yaml --resume` on `corpus`, as a user fine-tunes an
    imported run: (the train summary, the new weights' metadata, whether the embedding moved),
    plus the config dict used, for a test that goes on from it."""
    from minigpt_cli.model import store
    from minigpt_cli.training.loop import train

    cfg = yaml.safe_load((run / store.CONFIG_FILE).read_text())
    cfg.update(device="cpu", data={"source": str(corpus), "val_fraction": 0.1})
    cfg["train"].update(batch_size=2, max_steps=3, eval_interval=3, eval_steps=1,
                        save_interval=3, warmup_steps=1, lr=1e-3, min_lr=1e-4)
    before, _ = store.load_safetensors(run / store.MODEL_FILE)
    summary = train(config_from_dict(cfg), resume=True)
    after, meta = store.load_safetensors(run / store.MODEL_FILE)
    return summary, meta, not torch.equal(before["wte.weight"], after["wte.weight"]), cfg


@pytest.fixture
def tiny_config(tmp_path: Path, corpus_file: Path, data_dir: Path):
    return config_from_dict(tiny_raw(corpus_file, tmp_path / "run"))


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=32,
                          dropout=0.0))
    return model.eval()


@pytest.fixture
def model() -> GPT:
    """The engine tests' model: byte vocabulary, 32-token window, peaked logits, so greedy
    choices are not near-ties."""
    torch.manual_seed(5)
    m = GPT(GPTConfig(vocab_size=257, block_size=32, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        m.wte.weight.mul_(20)
    return m.eval()


@pytest.fixture
def enc():
    from minigpt_cli import tokenizer as tok

    return tok.byte_encoding()


# A tiny trained run and `minigpt eval` on it (the evaluation and int8 tests share them).
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run whose evaluations cover its whole validation split (8 x 8 windows of 32)."""
    root = tmp_path_factory.mktemp("eval")
    (root / "corpus.txt").write_text(make_text())
    from minigpt_cli.training.loop import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIGPT_DATA_DIR", str(root / "data"))
        train(config_from_dict(tiny_raw(root / "corpus.txt", root / "run", max_steps=200,
                                        eval_interval=200, save_interval=200, eval_steps=8)))
    return root / "run"


def score(run: Path, **kw) -> dict:
    """`minigpt eval` of `run` on its own validation text, as a dict."""
    import io

    from rich.console import Console

    from minigpt_cli.evaluation.eval_cli import run_eval

    args = {"checkpoint": str(run), "data": None, "stride": None, "batch_size": 8,
            "json_path": None, "plot_path": None, "device": "cpu", "dtype": "float32",
            "console": Console(file=io.StringIO(), width=200)}
    return run_eval(**{**args, **kw})


# Sampler settings the engine's oracle tests run under.
GREEDY = SamplerSettings(temperature=0.0)
SAMPLED = SamplerSettings(temperature=1.0, top_p=0.9, top_k=40)


LETTERS = "abcdefghij"


def reverse_task(n: int, seed: int) -> list[dict]:
    """Conversations whose answer is a random word spelled backwards: checkable, and nothing
    in pre-training text teaches it."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 4)))
        out.append({"messages": [{"role": "user", "content": f"reverse {word}"},
                                 {"role": "assistant", "content": word[::-1]}]})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    """One record per line; a string is written as it is (a malformed line, say)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def chat_raw(tmp_path: Path, source: Path, **train: object) -> dict:
    """tiny_raw for chat fine-tuning from scratch on `source`, a JSONL of conversations."""
    raw = tiny_raw(source, tmp_path / "run")
    raw["data"]["format"] = "chat"
    raw["tokenizer"] = {"kind": "byte"}
    # tiny.yaml's recipe (Llama, Muon) at 2 x 48: it learns reverse_task in ~200 steps; in a
    # probe, GPT-2's architecture with AdamW at this size had not learned it after 1,000.
    raw["model"].update(block_size=32, n_layer=2, n_head=2, n_embd=48, dropout=0.0,
                        bias=False, norm="rmsnorm", position="rotary", mlp="swiglu")
    raw["train"].update({"batch_size": 32, "max_steps": 6, "eval_interval": 6,
                         "save_interval": 6, "warmup_steps": 10, "lr": 1e-2, "min_lr": 1e-3,
                         "optimizer": "muon", **train})
    return raw


def chat_sft_run(tmp: Path, steps: int) -> Path:
    """A chat run fine-tuned from scratch for `steps` on reverse_task: at 60 steps some answers
    are right and some not (what RL and task evaluation need); at 200, nearly all."""
    import io

    from rich.console import Console

    from minigpt_cli.training.loop import train

    tmp.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(tmp / "chat.jsonl", reverse_task(2000, seed=0))
    raw = chat_raw(tmp, source, max_steps=steps, eval_interval=steps, save_interval=steps)
    train(config_from_dict(raw), console=Console(file=io.StringIO()))
    return tmp / "run"


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chat run fine-tuned for 200 steps on reverse_task (~4 s, once a session): it answers
    held-out words exactly. Tests only read it."""
    return chat_sft_run(tmp_path_factory.mktemp("chat-run"), 200)
