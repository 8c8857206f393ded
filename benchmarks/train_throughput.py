"""Training throughput of minigpt's step on nanoGPT's CPU recipe shape.

Shape: 4 layers, 4 heads, width 128, context 64, dropout 0, character-level vocabulary (65
symbols in nanoGPT's tiny-shakespeare; we use 65 too). One step = forward over every position,
backward, gradient clip, AdamW. The reference, 55 ms per step of 12 x 64 tokens, is nanoGPT's
eager CPU loop as measured on this project's 2-core machine (issue #2); nanoGPT is not a pip
package, so it cannot run beside ours here and its figure is quoted, not re-measured.

    python benchmarks/train_throughput.py [--steps 30] [--batch-sizes 12,32,64]

`--tiny` times configs/tiny.yaml's step instead (context 256, vocabulary 2,048, batch 16) with
dropout 0 and 0.1, which is how tiny.yaml's choice of dropout 0 was priced.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minigpt_cli.model import GPT, GPTConfig

NANOGPT_MS_PER_STEP = 55.0  # batch 12 x context 64, eager, 2 CPU cores (issue #2)
NANOGPT_TOKENS_PER_S = 12 * 64 / (NANOGPT_MS_PER_STEP / 1e3)


def time_steps(batch: int, steps: int, vocab: int = 65, block: int = 64,
               dropout: float = 0.0) -> list[float]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=4, n_head=4, n_embd=128,
                          dropout=dropout)).train()
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.99))
    data = torch.randint(0, vocab, (steps + 5, batch, block + 1))
    times = []
    for i in range(steps + 5):
        t = time.perf_counter()
        _, loss = model(data[i, :, :-1], data[i, :, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 5:  # the first steps allocate optimizer state and warm caches
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-sizes", default="12,32,64")
    ap.add_argument("--tiny", action="store_true", help="tiny.yaml's step, dropout 0 vs 0.1")
    args = ap.parse_args()
    if args.tiny:
        ms = {p: statistics.median(time_steps(16, args.steps, 2048, 256, p)) * 1e3
              for p in (0.0, 0.1)}
        print(f"tiny.yaml step (16 x 256 tokens, vocab 2048): dropout 0: {ms[0.0]:.1f} ms, "
              f"dropout 0.1: {ms[0.1]:.1f} ms ({ms[0.1] / ms[0.0] - 1:+.0%})")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; nanoGPT reference "
          f"{NANOGPT_MS_PER_STEP:.0f} ms/step at 12x64 = {NANOGPT_TOKENS_PER_S:,.0f} tok/s")
    print(f"{'batch':>5} {'ms/step':>9} {'tok/s':>9} {'vs nanoGPT':>11}")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        ms = statistics.median(time_steps(b, args.steps)) * 1e3
        tps = b * 64 / (ms / 1e3)
        print(f"{b:>5} {ms:>9.1f} {tps:>9,.0f} {tps / NANOGPT_TOKENS_PER_S:>10.2f}×")


if __name__ == "__main__":
    main()
