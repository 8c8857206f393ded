"""Training on several ranks (torch.distributed, gloo, DDP) ends where one process ends.

Workers are started with torch.multiprocessing and meet through a file:// rendezvous in a temp
dir (no ports), one thread each; the reference runs in this process on one thread too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from rich.console import Console

from minigpt_cli.config import config_from_dict
from minigpt_cli.errors import UserError
from minigpt_cli.model import store
from minigpt_cli.training import run_state
from minigpt_cli.training.loop import train
from tests.conftest import make_text, tiny_raw


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
    return store.load_safetensors(run / store.MODEL_FILE)[0]


def _close(a: Path, b: Path, tol: float = 1e-6) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= tol, worst
    return worst


def _evals(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / run_state.METRICS_FILE).read_text().splitlines()
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
    logged = [[r["loss"] for r in map(json.loads, (tmp_path / run / run_state.METRICS_FILE)
                                      .read_text().splitlines()) if "loss" in r]
              for run in ("one", "two")]
    assert len(logged[0]) == 4 and logged[0] == pytest.approx(logged[1], rel=1e-6)

    longer = {**kw, "max_steps": 12}
    _alone(tiny_raw(corpus_file, tmp_path / "one", **longer), tmp_path, resume=True)
    _alone(tiny_raw(corpus_file, tmp_path / "two", **longer), tmp_path, resume=True)
    _close(tmp_path / "one", tmp_path / "two")


def _logged(run: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run / run_state.METRICS_FILE).read_text().splitlines())
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
    assert json.loads((tmp_path / "two" / run_state.STATE_JSON).read_text())["weights_file"] == \
        dcp_dir.name
    assert sorted(p.suffix for p in dcp_dir.iterdir()) == [".json", ".safetensors", ".safetensors"]
    assert not list((tmp_path / "two").glob("train_state-0000004*"))  # the previous one went
    # The full export loads into a plain model, with no process group.
    store.load_model(tmp_path / "two" / store.MODEL_FILE)

    _ranks(2, tiny_raw(corpus_file, tmp_path / "one", **{**fsdp, "max_steps": 12}), tmp_path,
           resume=True)
    _ranks(2, tiny_raw(corpus_file, tmp_path / "two", **{**fsdp, "max_steps": 12}), tmp_path,
           resume=True)
    _close(tmp_path / "one", tmp_path / "two")
    for run in ("one", "two"):
        _alone(tiny_raw(corpus_file, tmp_path / run, **{**kw, "max_steps": 16}), tmp_path,
               resume=True)
    _close(tmp_path / "one", tmp_path / "two")


def test_two_ranks_in_bf16_agree_with_one_process_within_its_rounding(
        tmp_path: Path, corpus_file: Path) -> None:
    """bf16 autocast's contract for ranks: not bit-equal, but within bf16's rounding. The ranks
    sum the micro-batches' gradients in another order than one process does; in float32 that
    moves a weight by ~1e-7, but bf16 autocast rounds every weight to 8 bits of mantissa at each
    forward pass, and a weight that close to a rounding boundary lands on the other side. Losses
    agree to 1e-4 relative, weights to 1e-2 after 8 steps (measured: 1e-5, and 4.7e-4 with DDP,
    1.5e-3 with FSDP2; DDP is the one kept in the suite, for its time)."""
    kw = {"grad_accum_steps": 4, "max_steps": 8, "save_interval": 4, "log_interval": 2}
    runs = {n: {**tiny_raw(corpus_file, tmp_path / n, **kw), "dtype": "bfloat16"}
            for n in ("one", "two")}
    _alone(runs["one"], tmp_path)
    _ranks(2, runs["two"], tmp_path)
    _close(tmp_path / "one", tmp_path / "two", tol=1e-2)
    assert _logged(tmp_path / "one", "loss") == pytest.approx(_logged(tmp_path / "two", "loss"),
                                                             rel=1e-4)
    assert json.loads((tmp_path / "two" / run_state.STATE_JSON).read_text())["dtype"] == "bfloat16"


def test_accumulation_must_divide_among_ranks() -> None:
    from minigpt_cli.training.distributed import Ranks

    assert list(Ranks(1, 2).micro_batches(4)) == [2, 3]
    with pytest.raises(UserError, match=r"grad_accum_steps \(3\) must be divisible"):
        Ranks(0, 2).micro_batches(3)



def test_a_peer_that_never_comes_is_a_one_line_error(tmp_path: Path, corpus_file: Path) -> None:
    """Rank 0 of 2 with nobody else: after MINIGPT_DIST_TIMEOUT seconds, one line and exit 2,
    not a hang; nothing written."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_raw(corpus_file, Path("run"))))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
           "MINIGPT_DIST_TIMEOUT": "1", "MINIGPT_DIST_INIT": f"file://{tmp_path / 'rdzv'}"}
    p = subprocess.run([sys.executable, "-m", "minigpt_cli", "train", "cfg.yaml"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "could not join the process group within 1 s" in lines[0]
    assert not (tmp_path / "run").exists()


# --- Real torchrun launches: restarts after kill -9, two agents as two nodes ------------------

# Clipping off: FSDP2 sums the global gradient norm shard by shard, in another order than one
# process does, so with clipping on its weights drift from one process's by ~5e-5 over 120
# steps; with it off FSDP2 and DDP both end bit-for-bit equal to one process (measured).
_KILL_RUN = {"grad_accum_steps": 2, "max_steps": 120, "save_interval": 10, "eval_interval": 60,
             "log_interval": 5, "grad_clip": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_pids(tmp: Path) -> dict[int, int]:
    """The training processes of this test (found by their data dir), by RANK."""
    marker = f"MINIGPT_DATA_DIR={tmp / 'data'}".encode()
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if marker in env and rank and b"TORCHELASTIC_RUN_ID=" in b" ".join(env):
            pids[int(rank[0][5:])] = int(proc.name)
    return pids


def _torchrun(tmp: Path, corpus: Path, launch: list[str], agents: int = 1,
              parallel: str = "ddp", kill_at: int = 30) -> list[tuple[int, str]]:
    """Start `agents` torchrun agents on _KILL_RUN, SIGKILL rank 1 once the run has logged
    step `kill_at`, and return each agent's (exit code, output)."""
    raw = tiny_raw(corpus, Path("run"), **_KILL_RUN, parallel=parallel)
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIGPT_DATA_DIR": str(tmp / "data"),
           "MINIGPT_DIST_TIMEOUT": "30"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    procs = [subprocess.Popen([torchrun, *launch, "cfg.yaml"], cwd=tmp, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(agents)]
    deadline, killed = time.monotonic() + 120, None
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            logged = [r.get("step", 0) for r in run_state.read_metrics(tmp / "run")]
            if killed is None and logged and max(logged) >= kill_at:
                killed = _rank_pids(tmp)[1]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
    finally:  # torchrun starts each rank in a session of its own: stop agents and ranks
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for pid in _rank_pids(tmp).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert killed is not None, "the run never reached the step to kill at"
    return [(p.wait(), p.stdout.read()) for p in procs]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process trained straight through on _KILL_RUN: what every rescue must end with."""
    tmp = tmp_path_factory.mktemp("straight")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    _alone(tiny_raw(corpus, tmp / "run", **_KILL_RUN), tmp)
    return tmp / "run"


def test_torchrun_restarts_a_killed_rank_and_ends_uninterrupted(
        tmp_path: Path, corpus_file: Path, uninterrupted: Path) -> None:
    """docs/distributed.md's single-node form (`--max-restarts 1 --rdzv-backend c10d
    --rdzv-endpoint`), with FSDP2: kill -9 of rank 1 mid-run (mid-save, some days); torchrun
    restarts both ranks, they resume from the last DCP checkpoint by themselves, and the
    final weights equal the uninterrupted one-process run's."""
    port = _free_port()
    [(code, out)] = _torchrun(tmp_path, corpus_file, [
        "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "minigpt_cli", "train"], parallel="fsdp")
    assert code == 0, out[-3000:]
    assert re.search(r"resuming run at step [1-9]\d*", out), out[-3000:]
    assert run_state.read_state_json(tmp_path / "run")["weights_file"].endswith(".dcp")
    _close(uninterrupted, tmp_path / "run")


def test_two_agents_as_two_nodes_and_a_rank_dying_without_restarts(
        tmp_path: Path, corpus_file: Path, uninterrupted: Path) -> None:
    """Two torchrun agents on 127.0.0.1 form one job (`--nnodes 2`, one rank each, the
    `minigpt` script path). With no restarts allowed, kill -9 of rank 1 ends both agents with
    an error, leaves no temp file and a resume point that one process finishes exactly."""
    port = _free_port()
    script = str(Path(sys.executable).parent / "minigpt")
    results = _torchrun(tmp_path, corpus_file, [
        "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "0", "--rdzv-id", "job",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", script, "train"],
        agents=2)
    assert all(code != 0 for code, _ in results), [out[-2000:] for _, out in results]
    # The survivor says what happened in one line instead of a collective's traceback.
    said = [ln for _, out in results for ln in out.splitlines() if ln.startswith("error:")]
    assert len(said) == 1 and "rank 0 of 2 lost a peer" in said[0], said
    assert "[rank0]: Traceback" not in "".join(out for _, out in results)
    run = tmp_path / "run"
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.tmp"))
    assert run_state.read_state_json(run)["step"] >= 10  # saved by the two-node group
    _alone(tiny_raw(corpus_file, run, **_KILL_RUN), tmp_path, resume=True)
    _close(uninterrupted, run)
