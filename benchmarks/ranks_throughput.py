"""Training tokens/s: one process against 2 ranks of DDP and of FSDP2 under torchrun, interleaved.

Each round runs the three launches one after another on the same config; the figure for a run is
the median of its metrics.jsonl windows, less the first and last (warm-up, and the final save).

    python benchmarks/ranks_throughput.py --rounds 3 [--config configs/tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = ["train.max_steps=40", "train.eval_interval=1000", "train.save_interval=1000",
            "train.log_interval=5", "train.grad_accum_steps=2", "train.batch_size=8"]


def _tokens_per_s(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:-1]
    return statistics.median(windows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", default="configs/tiny.yaml")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    launches = {
        "1 process": [str(bin_dir / "minigpt"), "train"],
        "2 ranks DDP": [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2",
                        "-m", "minigpt_cli", "train"],
        "2 ranks FSDP2": [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2",
                          "-m", "minigpt_cli", "train", "--set", "train.parallel=fsdp"],
    }
    results: dict[str, list[float]] = {name: [] for name in launches}
    work = Path(tempfile.mkdtemp(prefix="ranks-"))
    try:
        for r in range(args.rounds):
            for name, cmd in launches.items():
                run = work / f"{r}-{name.replace(' ', '_')}"
                sets = [x for s in [*SETTINGS, f"out_dir={run}"] for x in ("--set", s)]
                # one intra-op thread per rank, two for the single process: both fill 2 cores
                env = {**os.environ, "OMP_NUM_THREADS": "2" if name == "1 process" else "1"}
                subprocess.run([*cmd, args.config, *sets], check=True, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                results[name].append(_tokens_per_s(run))
                print(f"round {r + 1} {name}: {results[name][-1]:,.0f} tok/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["1 process"]
    print("\n| round | " + " | ".join(launches) + " |")
    print("|---|" + "---:|" * len(launches))
    for r in range(args.rounds):
        cells = [f"{results[n][r]:,.0f}" + ("" if n == "1 process" else
                                            f" ({results[n][r] / base[r]:.2f}×)")
                 for n in launches]
        print(f"| {r + 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
