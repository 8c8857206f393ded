"""Training on several ranks (torch.distributed, gloo, DDP) ends where one process ends.

Workers are started with torch.multiprocessing and meet through a file:// rendezvous in a temp
dir (no ports), one thread each; the reference runs in this process on one thread too.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from rich.console import Console

from minigpt_cli import checkpoint as ckpt
from minigpt_cli.config import config_from_dict
from minigpt_cli.errors import UserError
from minigpt_cli.train import train
from tests.conftest import tiny_raw


def _rank(rank: int, world: int, init: str, raw: dict, data_dir: str, resume: bool) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MINIGPT_DIST_INIT=init, MINIGPT_DATA_DIR=data_dir,
                      MINIGPT_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    train(config_from_dict(raw), resume=resume, console=Console(file=io.StringIO()))


def _ranks(world: int, raw: dict, tmp: Path, resume: bool = False) -> None:
    # A fresh file per group: a reused one holds the last group's addresses, and gloo would
    # try to connect to a rank that is gone.
    init = f"file://{tempfile.mkdtemp(dir=tmp)}/rdzv"
    mp.spawn(_rank, args=(world, init, raw, str(tmp / "data"), resume), nprocs=world, join=True)


def _alone(raw: dict, tmp: Path, resume: bool = False) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("MINIGPT_DATA_DIR", str(tmp / "data"))
            train(config_from_dict(raw), resume=resume, console=Console(file=io.StringIO()))
    finally:
        torch.set_num_threads(threads)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_safetensors(run / ckpt.MODEL_FILE)[0]


def _close(a: Path, b: Path, tol: float = 1e-6) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, worst
    return worst


def _evals(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / ckpt.METRICS_FILE).read_text().splitlines()
            if "val_bpb" in x]


def test_two_ranks_end_with_one_process_weights(tmp_path: Path, corpus_file: Path) -> None:
    """Same config, dropout on, 4 micro-batches per step: 2 ranks of 2 equal 1 process of 4,
    and the logged (all-reduced) losses and sharded evaluations equal the single-process ones.
    Then the 2-rank run resumes in one process and still ends with the uninterrupted weights."""
    kw = {"grad_accum_steps": 4, "max_steps": 8, "eval_interval": 4, "save_interval": 4,
          "log_interval": 2}
    _alone(tiny_raw(corpus_file, tmp_path / "one", **kw), tmp_path)
    _ranks(2, tiny_raw(corpus_file, tmp_path / "two", **kw), tmp_path)
    _close(tmp_path / "one", tmp_path / "two")
    for a, b in zip(_evals(tmp_path / "one"), _evals(tmp_path / "two"), strict=True):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "val_bpb"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    logged = [[r["loss"] for r in map(json.loads, (tmp_path / run / ckpt.METRICS_FILE)
                                      .read_text().splitlines()) if "loss" in r]
              for run in ("one", "two")]
    assert len(logged[0]) == 4 and logged[0] == pytest.approx(logged[1], rel=1e-6)

    longer = {**kw, "max_steps": 12}
    _alone(tiny_raw(corpus_file, tmp_path / "one", **longer), tmp_path, resume=True)
    _alone(tiny_raw(corpus_file, tmp_path / "two", **longer), tmp_path, resume=True)
    _close(tmp_path / "one", tmp_path / "two")


def _logged(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / ckpt.METRICS_FILE).read_text().splitlines())
            if key in r]


def test_fsdp2_two_ranks_end_with_one_process_weights(tmp_path: Path, corpus_file: Path) -> None:
    """FSDP2 on 2 ranks (each holding half of every weight and AdamW moment, 257 embedding rows
    split unevenly, 3 evaluation batches split 2 + 1) ends with one process's weights, losses
    and evaluations. The pre-clip gradient norms agree too, which guards the trap of FSDP2 on
    gloo summing gradients over ranks instead of averaging them (pytorch/pytorch#162338):
    AdamW's update hardly changes when every gradient doubles, the norm does.

    Then the resume state moves between formats and world sizes: the one-process run's
    safetensors file resumes sharded on 2 ranks, the FSDP2 run's DCP directory (safetensors
    shards, no pickle) resumes on 2 ranks and then in one process, and the two still agree."""
    kw = {"grad_accum_steps": 4, "max_steps": 8, "eval_interval": 4, "save_interval": 4,
          "log_interval": 2, "eval_steps": 3}
    fsdp = {**kw, "parallel": "fsdp"}
    _alone(tiny_raw(corpus_file, tmp_path / "one", **kw), tmp_path)
    _ranks(2, tiny_raw(corpus_file, tmp_path / "two", **fsdp), tmp_path)
    _close(tmp_path / "one", tmp_path / "two")
    for key in ("loss", "grad_norm", "val_loss", "val_bpb"):
        assert _logged(tmp_path / "one", key) == pytest.approx(_logged(tmp_path / "two", key),
                                                              rel=1e-5), key
    dcp_dir = tmp_path / "two" / "train_state-0000008.dcp"
    assert json.loads((tmp_path / "two" / ckpt.STATE_JSON).read_text())["weights_file"] == \
        dcp_dir.name
    assert sorted(p.suffix for p in dcp_dir.iterdir()) == [".json", ".safetensors", ".safetensors"]
    assert not list((tmp_path / "two").glob("train_state-0000004*"))  # the previous one went
    # The full export loads into a plain model, with no process group.
    ckpt.load_model(tmp_path / "two" / ckpt.MODEL_FILE)

    _ranks(2, tiny_raw(corpus_file, tmp_path / "one", **{**fsdp, "max_steps": 12}), tmp_path,
           resume=True)
    _ranks(2, tiny_raw(corpus_file, tmp_path / "two", **{**fsdp, "max_steps": 12}), tmp_path,
           resume=True)
    _close(tmp_path / "one", tmp_path / "two")
    for run in ("one", "two"):
        _alone(tiny_raw(corpus_file, tmp_path / run, **{**kw, "max_steps": 16}), tmp_path,
               resume=True)
    _close(tmp_path / "one", tmp_path / "two")


def test_accumulation_must_divide_among_ranks() -> None:
    from minigpt_cli.distributed import Ranks

    assert list(Ranks(1, 2).micro_batches(4)) == [2, 3]
    with pytest.raises(UserError, match=r"grad_accum_steps \(3\) must be divisible"):
        Ranks(0, 2).micro_batches(3)



def test_a_peer_that_never_comes_is_a_one_line_error(tmp_path: Path, corpus_file: Path) -> None:
    """Rank 0 of 2 with nobody else: after MINIGPT_DIST_TIMEOUT seconds, one line and exit 2,
    not a hang; nothing written."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_raw(corpus_file, Path("run"))))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MINIGPT_DIST_TIMEOUT": "3", "MINIGPT_DIST_INIT": f"file://{tmp_path / 'rdzv'}"}
    p = subprocess.run([sys.executable, "-m", "minigpt_cli", "train", "cfg.yaml"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "could not join the process group within 3 s" in lines[0]
    assert not (tmp_path / "run").exists()
