"""Prefilling prompts: as rows of the fused C step (what the engine does) against one PyTorch
forward over the same tokens, GPT-2 124M shape, random weights, float32.

One prompt of 11 tokens, and 8 prompts of 11 tokens in 8 slots (88 rows, the burst a server
sees when 8 clients start together). Median of --repeats after a warm-up.

    python benchmarks/prefill_paths.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minigpt_cli.inference.engine import ModelRunner
from minigpt_cli.model.gpt import GPT, GPTConfig


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12,
                          n_embd=768)).eval()
    runner = ModelRunner(model, 8, engine="native")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for prompts in (1, 8):
        ids = torch.randint(0, 50257, (prompts, 11), generator=torch.Generator().manual_seed(1))
        jobs = [(s, ids[s].tolist()) for s in range(prompts)]
        flat = ids.reshape(1, -1)
        with torch.inference_mode():
            t_torch = median_ms(lambda f=flat: model(f, last_only=True), args.repeats)
        t_c = median_ms(lambda j=jobs: runner.run(j, [], []), args.repeats)
        print(f"{prompts} x 11 tokens: C step rows {t_c:7.1f} ms · one PyTorch forward over "
              f"[1, {flat.size(1)}] {t_torch:7.1f} ms")


if __name__ == "__main__":
    main()
