"""`minigpt bench --train`: one training step over a full block against generating as many
tokens with the same model: forward passes per sequence, tokens/s and the memory each holds
(gradients, optimizer state, activations saved for backward, against a KV cache)."""

from __future__ import annotations

import math
import time

import torch
from rich.console import Console
from rich.table import Table

from minigpt_cli.bench.measure import kv_cache_bytes, mb, timed_greedy
from minigpt_cli.device import synchronize
from minigpt_cli.model.gpt import GPT


def measure_training(model: GPT, batch: int, device: torch.device, dtype: torch.dtype,
                     engine: str = "auto") -> dict:
    """One training step over a full block against generating the same number of tokens."""
    from minigpt_cli.device import autocast

    cfg = model.config
    T = cfg.block_size
    x = torch.randint(0, cfg.vocab_size, (batch, T + 1), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    # Training means dropout on. A model configured without it (tiny.yaml) is timed at 0.1,
    # GPT-2's rate, and reported as such; its own rate is restored for generation.
    own_dropout = cfg.dropout
    dropout = own_dropout if own_dropout > 0 else 0.1
    model.set_dropout(dropout)
    model.train()
    for _ in range(2):  # the first step allocates optimizer state; time the second
        saved = 0
        synchronize(device)
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, dtype):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        synchronize(device)
        train_s = time.perf_counter() - t0
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    opt_state = sum(v.numel() * v.element_size() for s in opt.state.values()
                    for v in s.values() if torch.is_tensor(v))
    model.eval()
    model.set_dropout(own_dropout)
    # The same block scored in one forward pass, no gradients: what prefill does for a prompt.
    with torch.inference_mode():
        model(x[:, :-1])
        synchronize(device)
        t0 = time.perf_counter()
        model(x[:, :-1])
        synchronize(device)
        score_s = time.perf_counter() - t0
    prompt = x[:, :1]
    _, gen_times, _ = timed_greedy(model, prompt, T - 1, True, device, engine)
    gen_s = sum(gen_times)
    return {
        "tokens": batch * T,
        "training": {"forward_passes_per_sequence": 1, "seconds": train_s, "dropout": dropout,
                     "tokens_per_s": batch * T / train_s,
                     "memory_bytes": {"weights": params, "gradients": params,
                                      "optimizer_state": opt_state,
                                      "activations_saved_for_backward": saved}},
        "scoring": {"forward_passes_per_sequence": 1, "seconds": score_s,
                    "tokens_per_s": batch * T / score_s,
                    "memory_bytes": {"weights": params}},
        "generation": {"forward_passes_per_sequence": T - 1, "seconds": gen_s,
                       "tokens_per_s": batch * (T - 1) / gen_s,
                       "memory_bytes": {"weights": params,
                                        "kv_cache": kv_cache_bytes(cfg.n_layer, cfg.n_head, T,
                                                                   cfg.head_dim, batch,
                                                                   next(model.parameters())
                                                                   .element_size())}},
    }


def print_training(console: Console, r: dict) -> None:
    table = Table(title=f"Training vs inference, {r['tokens']:,} tokens (same model)")
    for col in ("", "forward passes\nper sequence", "tokens/s", "memory MB"):
        table.add_column(col, justify="right")
    names = {"training": f"training\n(dropout {r['training']['dropout']:g})",
             "scoring": "scoring\n(no grad)", "generation": "generation\n(KV cache)"}
    for name in ("training", "scoring", "generation"):
        m = r[name]
        mem = "\n".join(f"{k.replace('_', ' ')} {mb(v)}" for k, v in m["memory_bytes"].items())
        table.add_row(names[name], str(m["forward_passes_per_sequence"]),
                      f"{m['tokens_per_s']:,.0f}", mem, end_section=True)
    console.print(table)
    gen = r["generation"]["tokens_per_s"]
    train, score = r["training"]["tokens_per_s"] / gen, r["scoring"]["tokens_per_s"] / gen
    if math.isfinite(train) and math.isfinite(score):
        console.print(f"[dim]one parallel pass over every position (teacher forcing) runs at "
                      f"{score:.1f}× the tokens/s of generating them one by one; {train:.1f}× "
                      "with backward and the optimizer step included (training)[/]")
