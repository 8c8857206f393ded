"""How often torchrun's restart after a `kill -9` finishes: repeated trials, one launch form.

Each trial trains a tiny model (2 ranks, 300 steps, saves every 20) under `--max-restarts 1`,
SIGKILLs rank 1 once step 50 is logged, and records whether the job finished (exit 0 on every
agent) and whether it resumed from a save.

    python benchmarks/restart_trials.py --launch c10d --trials 6
    python benchmarks/restart_trials.py --launch standalone --trials 4
    python benchmarks/restart_trials.py --launch two-nodes --trials 2 \\
        --env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from serve_load import free_port  # beside this script, so on sys.path

from minigpt_cli.training.data import prepare_shakespeare
from minigpt_cli.training.run_state import read_metrics


def tiny_config(corpus: Path) -> dict:
    """A byte-level 2-layer model on a slice of the built-in corpus: seconds a step, not hours."""
    return {"out_dir": "run", "seed": 7, "device": "cpu", "dtype": "float32",
            "data": {"source": str(corpus), "val_fraction": 0.1}, "tokenizer": {"kind": "byte"},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.1},
            "train": {"batch_size": 8, "grad_accum_steps": 2, "max_steps": 300, "lr": 3e-3,
                      "min_lr": 3e-4, "warmup_steps": 4, "eval_interval": 100, "eval_steps": 2,
                      "save_interval": 20, "log_interval": 10}}


def rank_pids(work: Path) -> dict[int, int]:
    """The training processes of this trial (found by their data dir in /proc), by RANK."""
    marker = f"MINIGPT_DATA_DIR={work / 'data'}".encode()
    pids = {}
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if marker in env and rank and b"TORCHELASTIC_RUN_ID=" in b" ".join(env):
            pids[int(rank[0].split(b"=")[1])] = int(proc.name)
    return pids


def trial(work: Path, launch: str, extra_env: dict[str, str]) -> tuple[bool, bool]:
    corpus = work / "corpus.txt"
    text = prepare_shakespeare().read_text(encoding="utf-8")
    corpus.write_text(text[:200_000], encoding="utf-8")
    raw = tiny_config(corpus)
    (work / "cfg.yaml").write_text(yaml.safe_dump(raw))
    port = free_port()
    torchrun = str(Path(sys.executable).parent / "torchrun")
    forms = {
        "standalone": [["--standalone", "--nproc-per-node", "2"]],
        "c10d": [["--nproc-per-node", "2", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}"]],
        "two-nodes": [["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-id", "t",
                       "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]] * 2,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIGPT_DATA_DIR": str(work / "data"),
           "MINIGPT_DIST_TIMEOUT": "30", **extra_env}
    agents = [subprocess.Popen([torchrun, *form, "--max-restarts", "1", "-m", "minigpt_cli",
                                "train", "cfg.yaml"], cwd=work, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True) for form in forms[launch]]
    deadline, killed = time.monotonic() + 180, False
    while any(a.poll() is None for a in agents) and time.monotonic() < deadline:
        steps = [r.get("step", 0) for r in read_metrics(work / "run")]
        if not killed and steps and max(steps) >= 50 and (pid := rank_pids(work).get(1)):
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    for a in agents:  # a hung trial: stop the agents, then the ranks (each in its own session)
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    for pid in rank_pids(work).values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    outputs = [a.communicate()[0] for a in agents]
    finished = killed and all(a.returncode == 0 for a in agents)
    return finished, any("resuming run at step" in out for out in outputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launch", choices=["standalone", "c10d", "two-nodes"], default="c10d")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for torchrun")
    args = ap.parse_args()
    extra = dict(item.split("=", 1) for item in args.env)
    done = 0
    for i in range(args.trials):
        work = Path(tempfile.mkdtemp(prefix="restart-"))
        try:
            finished, resumed = trial(work, args.launch, extra)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        done += finished
        print(f"trial {i + 1}: {'finished' if finished else 'FAILED'}"
              f"{', resumed from a save' if resumed else ''}", flush=True)
    print(f"{args.launch}: {done} of {args.trials} restarts finished")


if __name__ == "__main__":
    main()
