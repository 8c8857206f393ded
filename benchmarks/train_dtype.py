"""When bf16 autocast trains faster than float32 on this CPU: the measurement behind
`dtype: auto`'s rule (minigpt_cli/device.py, BF16_MIN_SHAPES).

One step = forward, backward and AdamW on minigpt's model with configs/tiny.yaml's
architecture (RMSNorm, rotary, SwiGLU, no biases, 4 layers), at a grid of widths, contexts and
batches. The float32 step and the bf16 step alternate, five steps each, `--rounds` times in
one process, so the machine's noise falls on both; the table gives the median speed-up of
bf16 and its spread, and whether the rule picks bf16 there. Prints the CPU's model and its
bf16 flags first: the answer belongs to that CPU.

    python benchmarks/train_dtype.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minigpt_cli.device import autocast, bf16_pays_off, cpu_bf16_flags
from minigpt_cli.model.gpt import GPT, GPTConfig

LLAMA = {"norm": "rmsnorm", "position": "rotary", "mlp": "swiglu", "bias": False}
# (width, context, batch, vocabulary): nanoGPT's CPU recipe, tiny.yaml, small.yaml's width,
# and the points in between that place the rule's edges.
SHAPES = [(32, 32, 8, 257), (64, 256, 8, 2048), (96, 256, 8, 2048), (128, 64, 12, 65),
          (128, 64, 32, 65), (128, 128, 12, 2048), (128, 256, 4, 2048), (128, 256, 8, 2048),
          (256, 64, 16, 2048), (256, 256, 8, 2048)]


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                "unknown CPU")


def make_step(width: int, context: int, batch: int, vocab: int, dtype: torch.dtype
              ) -> Callable[[], None]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=context, n_layer=4,
                          n_head=max(2, width // 32), n_embd=width, **LLAMA)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, vocab, (2, batch, context))
    cpu = torch.device("cpu")

    def step() -> None:
        with autocast(cpu, dtype):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def seconds(step: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}; native bf16: {'/'.join(cpu_bf16_flags()) or 'none'}; "
          f"torch {torch.__version__}, {args.threads} threads")
    print(f"{'width':>5} {'context':>7} {'batch':>5}  bf16 speed-up [spread]   rule picks")
    for width, context, batch, vocab in SHAPES:
        f32 = make_step(width, context, batch, vocab, torch.float32)
        bf16 = make_step(width, context, batch, vocab, torch.bfloat16)
        seconds(f32, 3), seconds(bf16, 3)  # warm-up: optimizer state, kernel choice
        ratios = [seconds(f32, 5) / seconds(bf16, 5) for _ in range(args.rounds)]
        pick = "bf16" if bf16_pays_off(width, context) else "float32"
        print(f"{width:5d} {context:7d} {batch:5d}  {statistics.median(ratios):5.2f}x "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]        {pick}", flush=True)


if __name__ == "__main__":
    main()
