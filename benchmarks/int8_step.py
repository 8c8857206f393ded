"""The C decode step reading float32 weights against int8 ones, batch 1, interleaved.

GPT-2 124M's shape with random weights: one copy as it is, one rounded by quantize.py (the
step then streams int8 strips and their scales). Each round times both at positions 16..16+n
and prints ms per token, tokens/s and the weight bytes streamed per second, so the memory wall
is visible: a batch-1 step reads every weight once.

    python benchmarks/int8_step.py [--rounds 3] [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from minigpt_cli.model import GPT, GPTConfig, KVCache
from minigpt_cli.native import NativeStep
from minigpt_cli.quantize import quantize_model

SHAPE = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = GPT(SHAPE).eval()
    rounded = copy.deepcopy(base)
    report = quantize_model(rounded)
    print(report.describe())
    # bytes one step streams: every product's weights (the embedding rows read are negligible)
    streamed = {"float32": report.float_bytes, "int8": report.int8_bytes}
    steps = {"float32": NativeStep(base), "int8": NativeStep(rounded)}
    cache = KVCache(SHAPE, 1, SHAPE.block_size, "cpu", torch.float32)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            for p in range(8):  # warm-up
                step([1], [p], [0], [p], cache)
            t0 = time.perf_counter()
            for p in range(16, 16 + args.steps):
                step([p], [p], [0], [p], cache)
            dt = (time.perf_counter() - t0) / args.steps
            times[name].append(dt)
            print(f"round {r + 1} {name:7s}: {dt * 1e3:6.2f} ms/token  {1 / dt:6.1f} tok/s  "
                  f"{streamed[name] / dt / 1e9:5.1f} GB/s")
    ratios = [f / q for f, q in zip(times["float32"], times["int8"], strict=True)]
    print(f"int8 / float32 speed: median {statistics.median(ratios):.2f}x "
          f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
