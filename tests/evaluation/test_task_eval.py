"""`minigpt eval --task`: greedy and sampled mean reward and pass@k, through the real CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from minigpt_cli.evaluation.task_eval import run_task_eval
from tests.conftest import ROOT, chat_sft_run, reverse_task


@pytest.fixture(scope="module")
def runs(chat_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same task learned for 20 and for 200 steps."""
    return chat_sft_run(tmp_path_factory.mktemp("task") / "short", 20), chat_run


def _eval(run: Path, prompts: Path, out: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "minigpt_cli", "eval", "--checkpoint", str(run),
                        "--task", "reverse", "--prompts", str(prompts), "--samples", "4",
                        "--max-new-tokens", "8", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "pass@4" in p.stdout
    return json.loads(out.read_text())


def test_the_reward_tells_a_trained_run_from_a_barely_trained_one(runs, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(m["messages"][0]["content"] + "\n"
                               for m in reverse_task(30, seed=77)))
    short = run_task_eval(checkpoint=str(runs[0]), task="reverse", prompts=str(prompts),
                          samples=4, max_new_tokens=8, temperature=1.0, seed=0,
                          json_path=None, device="cpu", dtype="float32",
                          console=Console(file=io.StringIO()))
    long = _eval(runs[1], prompts, tmp_path / "long.json")  # and once through the real CLI
    assert long["greedy_mean_reward"] >= 0.9 > short["greedy_mean_reward"]
    assert short["pass@4"] >= short["sampled_mean_reward"]  # one right of 4 is enough
    for r in (short, long):
        assert r["prompts"] == 30 and r["template"] is True
        assert 0 <= r["sampled_mean_reward"] <= 1 and 0 <= r["pass@4"] <= 1
