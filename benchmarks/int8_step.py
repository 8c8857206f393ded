"""The C decode step reading float32 weights against int8 and int4 ones, batch 1, interleaved,
and llama.cpp's `llama-bench` on the same weights in the same rounds.

GPT-2 124M (random weights, or `--run` an imported one): one copy as it is, one rounded to
int8 and one to int4 by model/int8.py (the step then streams their packed bytes and scales).
Each round times all three at positions 16..16+n and prints ms per token, tokens/s and the
weight bytes streamed per second, so the memory wall is visible: a batch-1 step reads every
weight once. With `--llama-bench`, each round also runs `llama-bench -p 0 -n 64` on each
given GGUF (e.g. the F32, Q8_0 and Q4_0 files `minigpt export-gguf` writes from the same run),
and every minigpt step's speed is printed against each.
Each round also measures the ceiling: the read bandwidth the machine gives the same threads
(PyTorch summing 1 GiB of float32), and each step's bytes per second is printed as a share of
it (llama.cpp's as its file size per token): a step at the ceiling cannot go faster without
streaming fewer bytes.

    python benchmarks/int8_step.py [--rounds 3] [--steps 64] [--threads 2] [--run RUN]
        [--llama-bench BIN --gguf F32.gguf --gguf Q8_0.gguf --gguf Q4_0.gguf]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from minigpt_cli.inference.native import FusedForward
from minigpt_cli.model.gpt import GPT, GPTConfig, KVCache
from minigpt_cli.model.int8 import quantize_model

SHAPE = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", help="a minigpt run (e.g. an import-hf of GPT-2) instead of "
                                  "random weights")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench binary")
    ap.add_argument("--gguf", action="append", default=[], help="a GGUF for llama-bench")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.run:
        from minigpt_cli.inference.loading import load_for_inference

        base = load_for_inference(args.run, "cpu", "float32")[0]
    else:
        base = GPT(SHAPE).eval()
    shape = base.config
    steps, streamed = {"float32": FusedForward(base)}, {}
    for kind in ("int8", "int4"):
        rounded = copy.deepcopy(base)
        report = quantize_model(rounded, kind=kind)
        print(report.describe())
        # bytes one step streams: every product's weights (the embedding rows read are few)
        streamed["float32"], streamed[kind] = report.float_bytes, report.int8_bytes
        steps[kind] = FusedForward(rounded)
    cache = KVCache(shape, 1, shape.block_size, "cpu", torch.float32)
    times: dict[str, list[float]] = {name: [] for name in steps}
    peers = {f"llama.cpp {Path(g).stem}": g for g in args.gguf} if args.llama_bench else {}
    for name in peers:
        times[name] = []
    ceiling, sink = [], torch.ones(2**28)  # 1 GiB
    for r in range(args.rounds):
        ceiling.append(read_bandwidth(sink))
        print(f"round {r + 1} read bandwidth (1 GiB sum): {ceiling[-1] / 1e9:5.1f} GB/s")
        for name, gguf in peers.items():
            out = subprocess.run([args.llama_bench, "-m", gguf, "-t", str(args.threads), "-p",
                                  "0", "-n", str(args.steps), "-r", "1", "-o", "json"],
                                 check=True, capture_output=True, text=True).stdout
            dt = 1 / json.loads(out)[0]["avg_ts"]
            times[name].append(dt)
            share = Path(gguf).stat().st_size / dt / ceiling[-1]
            print(f"round {r + 1} {name}: {dt * 1e3:6.2f} ms/token  {1 / dt:6.1f} tok/s  "
                  f"{share:4.0%} of the read bandwidth")
        for name, step in steps.items():
            for p in range(8):  # warm-up
                step([1], [p], [0], [p], cache)
            t0 = time.perf_counter()
            for p in range(16, 16 + args.steps):
                step([p], [p], [0], [p], cache)
            dt = (time.perf_counter() - t0) / args.steps
            times[name].append(dt)
            print(f"round {r + 1} {name:7s}: {dt * 1e3:6.2f} ms/token  {1 / dt:6.1f} tok/s  "
                  f"{streamed[name] / dt / 1e9:5.1f} GB/s, "
                  f"{streamed[name] / dt / ceiling[-1]:4.0%} of the read bandwidth")
    for kind in ("float32", "int8", "int4"):
        for name in [n for n in ("float32", *peers) if n != kind]:
            ratios = [other / q for other, q in zip(times[name], times[kind], strict=True)]
            print(f"minigpt {kind} / {name} speed: median {statistics.median(ratios):.2f}x "
                  f"[{min(ratios):.2f}-{max(ratios):.2f}]")


def read_bandwidth(sink: torch.Tensor) -> float:
    """Bytes per second of the fastest of three sums over `sink` (far larger than the caches):
    what streaming memory can give this many threads now."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        sink.sum()
        best = min(best, time.perf_counter() - t0)
    return sink.numel() * sink.element_size() / best


if __name__ == "__main__":
    main()
