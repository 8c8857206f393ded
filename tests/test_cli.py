"""End to end through a subprocess, as a user runs it; bad input is one line and exit 2."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_raw


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MINIGPT_DATA_DIR": str(cwd / "data")}
    return subprocess.run([sys.executable, "-m", "minigpt_cli", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def assert_user_error(p: subprocess.CompletedProcess, fragment: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small run trained through the CLI, shared by the tests below."""
    from tests.conftest import make_text

    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(make_text())
    raw = tiny_raw(root / "corpus.txt", Path("runs/tiny"), max_steps=30)
    raw["tokenizer"] = {"kind": "bpe", "vocab_size": 300}
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    p = run("train", "cfg.yaml", cwd=root)
    assert p.returncode == 0, p.stderr
    assert "val bits/byte" in p.stderr
    return root


def test_generate_streams_text(trained: Path) -> None:
    """The continuation arrives piece by piece on a pipe, not in one write at the end."""
    env = {**os.environ, "MINIGPT_DATA_DIR": str(trained / "data")}
    proc = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "generate", "--prompt",
                             "ROMEO:", "--max-new-tokens", "30", "--seed", "1"], cwd=trained,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reads = []
    while chunk := os.read(proc.stdout.fileno(), 1 << 16):  # type: ignore[union-attr]
        reads.append(chunk)
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.wait(60) == 0, err
    text = b"".join(reads).decode()
    assert text.startswith("ROMEO:") and len(text.strip()) > len("ROMEO:") + 10
    assert len(reads) >= 5, f"{len(reads)} writes: the text was not streamed"
    assert "tok/s" in err  # the stats line, on stderr


def test_stats_line_starts_on_its_own_line(trained: Path) -> None:
    """Both streams into one pipe, as a shell shows them: the text ends with a newline before
    the stats line. (A display that shows stdout without its last newline and then stderr
    prints `...for all the60 tokens`; in a shell the line break is there.)"""
    p = subprocess.run([sys.executable, "-m", "minigpt_cli", "generate", "--prompt", "ROMEO:",
                        "--max-new-tokens", "20", "--seed", "1"], cwd=trained,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
                       env={**os.environ, "MINIGPT_DATA_DIR": str(trained / "data")})
    assert p.returncode == 0, p.stdout
    stats = [ln for ln in p.stdout.splitlines() if "tok/s" in ln]
    assert len(stats) == 1 and stats[0].startswith("20 tokens · finish"), p.stdout


@pytest.mark.needs_c_step
def test_generate_json_greedy_cache_matches_no_cache(trained: Path) -> None:
    outs = []
    for flags in (["--cache"], ["--no-cache"], ["--engine", "torch"]):
        p = run("generate", "--prompt", "JULIET:", "--max-new-tokens", "40", "--temperature",
                "0", "--json", *flags, cwd=trained)
        assert p.returncode == 0, p.stderr
        outs.append(json.loads(p.stdout))
    assert outs[0]["token_ids"] == outs[1]["token_ids"] == outs[2]["token_ids"]
    # The cached default runs the fused C step; --no-cache and --engine torch run PyTorch.
    assert [o["timings"]["engine"] for o in outs] == ["native", "torch", "torch"]
    for key in ("prompt", "text", "token_ids", "finish_reason", "timings"):
        assert key in outs[0]
    assert outs[0]["timings"]["decode_tokens_per_s"] > 0


def test_empty_prompt_starts_from_endoftext(trained: Path) -> None:
    p = run("generate", "--max-new-tokens", "5", "--temperature", "0", "--json", cwd=trained)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["prompt"] == "<|endoftext|>" and len(out["prompt_token_ids"]) == 1


def test_generate_trace_shows_positions(trained: Path) -> None:
    p = run("generate", "--prompt", "NURSE:", "--max-new-tokens", "3", "--trace",
            "--temperature", "0", cwd=trained)
    assert p.returncode == 0, p.stderr
    steps = [ln for ln in p.stdout.splitlines() if ln.startswith("step")]
    assert len(steps) == 3 and "positions    1" in steps[1] and "→" in steps[0]


def test_generate_batch_from_prompts_file(trained: Path) -> None:
    (trained / "prompts.txt").write_text("ROMEO:\nJULIET: good\n")
    p = run("generate", "--prompts-file", "prompts.txt", "--max-new-tokens", "5", "--json",
            "--temperature", "0", cwd=trained)
    assert p.returncode == 0, p.stderr
    samples = json.loads(p.stdout)["samples"]
    assert [s["prompt"] for s in samples] == ["ROMEO:", "JULIET: good"]


def test_generate_without_any_run_says_how_to_train_one(tmp_path: Path) -> None:
    """The one bad-input case tests/test_bad_input.py cannot hold: its cases all have a run."""
    assert_user_error(run("generate", cwd=tmp_path), "minigpt train configs/tiny.yaml")


def test_trace_survives_markup_like_tokens() -> None:
    """Token text such as '[/' or '[bold]' is printed literally, never parsed as rich markup."""
    import tiktoken
    from rich.console import Console

    from minigpt_cli.inference.generate_cli import _token_repr

    ranks = {bytes([i]): i for i in range(256)} | {b"[/]": 256, b"[bold]": 257, b"[/x": 258}
    enc = tiktoken.Encoding("markup", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 259})
    console = Console(file=io.StringIO(), width=200)
    console.print(" · ".join(_token_repr(enc, t) for t in (256, 257, 258)) + " → [bold]x[/]")
    assert "'[/]' · '[bold]' · '[/x' → x" in console.file.getvalue()
