"""The fused C step with several rows: what continuous batching buys per step.

Each row is one sequence in its own cache slot at its own position (different lengths, as in
a server). A batch-1 step streams every weight once and is bound by memory bandwidth; more
rows reuse each weight while it is in cache, so aggregate tokens/s should grow almost
linearly until arithmetic, not memory, sets the pace.

    python benchmarks/batched_step.py [--steps 30] [--rows 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import time

import torch

from minigpt_cli.inference.native import FusedForward
from minigpt_cli.model.gpt import GPT, GPTConfig, KVCache

SHAPES = {"tiny": GPTConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128),
          "gpt2-124M": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12,
                                 n_embd=768)}


def time_rows(model: GPT, rows: int, steps: int) -> float:
    """Median seconds per step for `rows` slots at positions 20, 27, 34, ... (mod 150)"""
    cfg = model.config
    cache = KVCache(cfg, rows, cfg.block_size, "cpu", torch.float32)
    step = FusedForward(model)
    start = [20 + (7 * r) % 150 for r in range(rows)]
    times = []
    with torch.inference_mode():
        for i in range(steps):
            cols = [s + i for s in start]
            t = time.perf_counter()
            step([7] * rows, cols, list(range(rows)), cols, cache)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", default="1,2,4,8,16")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.steps} steps")
    print(f"{'shape':>10} {'rows':>4} {'ms/step':>8} {'tok/s':>8} {'× 1 row':>7} {'GFLOP/s':>8}")
    for name, cfg in SHAPES.items():
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        flops = 2 * (sum(p.numel() for n, p in model.named_parameters()
                         if n.startswith("h.") and p.dim() == 2) + cfg.n_embd * cfg.vocab_size)
        time_rows(model, 1, 3)  # warm-up, library build
        base = None
        for rows in (int(r) for r in args.rows.split(",")):
            t = time_rows(model, rows, args.steps)
            base = base or rows / t
            print(f"{name:>10} {rows:>4} {t * 1e3:8.3f} {rows / t:8.0f} {rows / t / base:6.2f}× "
                  f"{rows * flops / t / 1e9:8.1f}")


if __name__ == "__main__":
    main()
