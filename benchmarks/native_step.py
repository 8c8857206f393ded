"""One cached decode step: minigpt's fused C step against the model's PyTorch forward.

For the tiny.yaml shape and GPT-2 124M (random weights, batch 1, float32), at 1 and 2 threads,
times the step alone (no sampler, no Python loop around it) at positions 16..16+n and prints
ms per token and the weight bandwidth it implies: a batch-1 step reads every weight once, so
bytes of weights / time is the rate the step streams memory at.

    python benchmarks/native_step.py [--steps 40]
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
PROMPT = 16


def weight_bytes(model: GPT) -> int:
    """Bytes one step reads: every block weight and the [C, V] head; one row of each
    embedding table, which is negligible and left out."""
    blocks = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("h.", "ln_f")))
    cfg = model.config
    return 4 * (blocks + cfg.n_embd * cfg.vocab_size)


def time_steps(model: GPT, n: int, native: bool) -> float:
    """Median seconds per step over n steps after a prefill of PROMPT tokens."""
    cfg = model.config
    cache = KVCache(cfg, 1, cfg.block_size, "cpu", torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(ids, cache=cache, last_only=True)
        step = FusedForward(model) if native else None
        for i in range(n):
            pos = PROMPT + i
            t = time.perf_counter()
            if step is not None:
                step([7], [pos], [0], [pos], cache)
            else:
                model(torch.tensor([[7]]), cache=cache, start_pos=pos, last_only=True)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    print(f"torch {torch.__version__}; median of {args.steps} steps after a {PROMPT}-token prefill")
    print(f"{'shape':>10} {'threads':>7} {'MB':>6} {'torch ms':>9} {'GB/s':>5} "
          f"{'C step ms':>9} {'GB/s':>5} {'C ÷ torch':>9}")
    for name, cfg in SHAPES.items():
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        mb = weight_bytes(model)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            time_steps(model, 3, True), time_steps(model, 3, False)  # warm-up, library build
            t_torch = time_steps(model, args.steps, False)
            t_c = time_steps(model, args.steps, True)
            print(f"{name:>10} {threads:>7} {mb / 1e6:6.1f} {t_torch * 1e3:9.3f} "
                  f"{mb / t_torch / 1e9:5.1f} {t_c * 1e3:9.3f} {mb / t_c / 1e9:5.1f} "
                  f"{t_torch / t_c:8.2f}×")


if __name__ == "__main__":
    main()
