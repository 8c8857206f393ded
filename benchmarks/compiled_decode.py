"""Does torch.compile remove the per-step overhead of batch-1 decoding on a CPU?

Decodes 200 tokens greedily through the KV cache on a random model of configs/tiny.yaml's shape
(4 layers, width 128, vocabulary 2,048): eager, then `torch.compile(dynamic=True)`, then
minigpt's fused C step (minigpt_cli/inference/native/), and prints ms per token for each plus the
one-off compile time.

    python benchmarks/compiled_decode.py
"""

from __future__ import annotations

import time

import torch

from minigpt_cli.inference.native import FusedForward
from minigpt_cli.model.gpt import GPT, GPTConfig, KVCache


def ms_per_token(model: torch.nn.Module, cfg: GPTConfig, fused: bool = False, n: int = 200,
                 prompt: int = 16) -> float:
    """Prefill `prompt` tokens, then time n greedy steps through `model`, or through the fused
    C step when `fused` (the prefill stays in PyTorch either way)."""
    cache = KVCache(cfg, 1, cfg.block_size, "cpu", torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        native = FusedForward(model) if fused else None

        def step(tok: int, pos: int) -> torch.Tensor:
            if native is not None:
                return native([tok], [pos], [0], [pos], cache)[0]
            out, _ = model(torch.tensor([[tok]]), cache=cache, start_pos=pos, last_only=True)
            return out[0, -1]

        logits, _ = model(ids, cache=cache, last_only=True)
        tok = int(logits[0, -1].argmax())
        t = time.perf_counter()
        for i in range(n):
            tok = int(step(tok, prompt + i).argmax())
        return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg).eval()
    ms_per_token(model, cfg)  # warm-up
    eager = min(ms_per_token(model, cfg) for _ in range(3))
    compiled = torch.compile(model, dynamic=True)
    t = time.perf_counter()
    ms_per_token(compiled, cfg)
    compile_s = time.perf_counter() - t
    fast = min(ms_per_token(compiled, cfg) for _ in range(3))
    ms_per_token(model, cfg, fused=True)  # builds the library on first use
    fused = min(ms_per_token(model, cfg, fused=True) for _ in range(3))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"eager {eager:.3f} ms/token · compiled {fast:.3f} ms/token ({eager / fast:.2f}×) · "
          f"first compiled run {compile_s:.1f} s · fused C step {fused:.3f} ms/token "
          f"({eager / fused:.2f}×)")


if __name__ == "__main__":
    main()
