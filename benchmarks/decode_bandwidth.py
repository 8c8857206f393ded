"""How fast a batch-1 decode step can stream a weight matrix, by storage layout.

A decode step multiplies every weight matrix by one vector, so its time is the time to read the
weights from memory. This times `F.linear(x, W)` with W stored [out, in] (nn.Linear's layout)
against `x @ W` with W stored [in, out] (GPT-2's Conv1D layout, which minigpt's Linear uses),
cycling through enough copies that the weights come from DRAM, not cache. Prints ms and GB/s.

    python benchmarks/decode_bandwidth.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

# (in, out): GPT-2 small's MLP up-projection, its output head, and the tiny shape's head with
# GPT-2's vocabulary.
SHAPES = [(768, 3072), (768, 50257), (128, 50257)]


def median_ms(fn, weights: list[torch.Tensor], repeats: int = 30) -> float:
    for w in weights:
        fn(w)
    times = []
    for i in range(repeats):
        w = weights[i % len(weights)]
        t = time.perf_counter()
        fn(w)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'in->out':>12} {'MB':>6} {'[out,in] ms':>12} {'GB/s':>6} {'[in,out] ms':>12} "
          f"{'GB/s':>6} {'ratio':>6}")
    for n_in, n_out in SHAPES:
        mb = n_in * n_out * 4 / 1e6
        copies = max(2, int(400 // mb))  # ~400 MB in rotation: far beyond any CPU cache
        out_in = [torch.randn(n_out, n_in) for _ in range(copies)]
        in_out = [w.t().contiguous() for w in out_in]
        x = torch.randn(1, n_in)
        a = median_ms(lambda w, x=x: F.linear(x, w), out_in)
        b = median_ms(lambda w, x=x: x @ w, in_out)
        print(f"{n_in:>5}->{n_out:<6} {mb:>6.1f} {a:>12.2f} {mb / a:>6.1f} {b:>12.2f} "
              f"{mb / b:>6.1f} {a / b:>5.2f}×")


if __name__ == "__main__":
    main()
