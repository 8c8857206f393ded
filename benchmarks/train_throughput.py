"""Training throughput of minigpt's step against Hugging Face GPT-2's, side by side.

One step = forward over every position, backward, gradient clip at 1.0, AdamW (betas 0.9/0.99,
weight decay on 2-D weights), on the same shape, batch, data and threads for both:
`GPT2LMHeadModel` (transformers, a dev extra) built to minigpt's config, eager attention
forced to SDPA as minigpt uses. The two models alternate step by step in one process, so the
machine's noise falls on both; the script repeats the whole measurement `--rounds` times and
reports the median ratio and its spread.

Shapes: nanoGPT's CPU recipe (4 layers, 4 heads, width 128, context 64, 65 symbols, batch 12)
and configs/tiny.yaml's (context 256, vocabulary 2,048, batch 16), dropout 0 as tiny.yaml has.
`--arch llama` sets tiny.yaml's architecture (RMSNorm, rotary, SwiGLU, no biases) against
`LlamaForCausalLM` built the same way, instead of GPT-2 against `GPT2LMHeadModel`.

    python benchmarks/train_throughput.py [--steps 20] [--rounds 3] [--shape nanogpt|tiny|both]
        [--arch gpt2|llama]

`--dropout-cost` prices dropout 0.1 on tiny.yaml's step instead (minigpt only); `--compile`
sets minigpt's eager step against the same step under torch.compile (what `compile: true`
does), the first, compiling call timed apart. `--profile` splits each eager step, minigpt's
and the peer's, by operator kind (torch.profiler, self CPU time): what torch.compile can fuse
on a CPU (the elementwise rest) against what it hands to the same kernels (products,
attention).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from minigpt_cli.model.gpt import GPT, GPTConfig

SHAPES = {"nanogpt": {"vocab": 65, "block": 64, "batch": 12},
          "tiny": {"vocab": 2048, "block": 256, "batch": 16}}
# minigpt's architecture options for each peer: GPT-2's own, or tiny.yaml's (a Llama).
ARCHS = {"gpt2": {}, "llama": {"norm": "rmsnorm", "position": "rotary", "mlp": "swiglu",
                               "bias": False}}


def minigpt_step(vocab: int, block: int, dropout: float = 0.0, compiled: bool = False,
                 arch: str = "gpt2") -> Callable:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=4, n_head=4, n_embd=128,
                          dropout=dropout, **ARCHS[arch])).train()
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.99))
    forward = torch.compile(model) if compiled else model  # what `compile: true` does

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step(vocab: int, block: int, arch: str = "gpt2") -> Callable:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from minigpt_cli.model.layers import mlp_hidden

    torch.manual_seed(0)
    if arch == "llama":  # tiny.yaml's architecture: the same widths, tied head, no biases
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=128, intermediate_size=mlp_hidden("swiglu", 128),
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=block, rms_norm_eps=1e-5, tie_word_embeddings=True,
            bos_token_id=vocab - 1, eos_token_id=vocab - 1,
            attn_implementation="sdpa")).train()
    else:
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_positions=block, n_embd=128, n_layer=4, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1,
            eos_token_id=vocab - 1, attn_implementation="sdpa")).train()
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        logits = model(x).logits  # the same loss as minigpt's: targets given, not shifted here
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(steps: dict[str, Callable], shape: dict, n: int) -> dict[str, float]:
    """Median seconds per step of each, alternating step by step after 5 warm-up steps."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, shape["vocab"], (n + 5, shape["batch"], shape["block"] + 1),
                         generator=g)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(n + 5):
        x, y = data[i, :, :-1], data[i, :, 1:]
        for name, step in steps.items():
            t = time.perf_counter()
            step(x, y)
            if i >= 5:  # the first steps allocate optimizer state and warm caches
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


KINDS = (("products", ("mm", "addmm", "bmm", "linear", "matmul", "mkldnn")),
         ("attention", ("scaled_dot_product", "flash_attention")),
         ("optimizer", ("adam", "_foreach", "vector_norm", "optimizer")))


def profile(shape: dict, steps: int, step: Callable) -> None:
    """Self CPU time of an eager step by operator kind, over `steps` steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(5):
        step(*_batch(shape))
    batches = [_batch(shape) for _ in range(steps)]
    start = time.perf_counter()
    for x, y in batches:
        step(x, y)
    wall = (time.perf_counter() - start) / steps  # without the profiler's own cost
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in batches:
            step(x, y)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for k, keys in KINDS if any(w in name for w in keys)), "elementwise")
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e6 / steps
    print(f"  {wall * 1e3:.1f} ms a step; inside operators, per step (self CPU time):")
    for kind, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:12s} {t * 1e3:7.2f} ms  {t / wall:6.1%} of the step")
    print(f"  between operators (Python, dispatch) {wall - sum(totals.values()):+.4f} s")
    # torch.compile fuses elementwise work and drops dispatch; products and attention run the
    # same CPU kernels, and the optimizer step is not compiled at all.
    floor = sum(t for k, t in totals.items() if k != "elementwise")
    print(f"  compiling can make this step at most {wall / floor:.2f}x faster")


def _batch(shape: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, shape["vocab"], (shape["batch"], shape["block"] + 1))
    return x[:, :-1], x[:, 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shape", choices=["nanogpt", "tiny", "both"], default="both")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="gpt2",
                    help="gpt2: against GPT2LMHeadModel; llama: tiny.yaml's architecture "
                         "against LlamaForCausalLM")
    ap.add_argument("--dropout-cost", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="minigpt eager against minigpt under torch.compile instead")
    ap.add_argument("--profile", action="store_true",
                    help="each eager step split by operator kind instead")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.profile:
        for name in (["nanogpt", "tiny"] if args.shape == "both" else [args.shape]):
            s = SHAPES[name]
            print(f"{name}, minigpt:")
            profile(s, args.steps, minigpt_step(s["vocab"], s["block"], arch=args.arch))
            print(f"{name}, Hugging Face:")
            profile(s, args.steps, hf_step(s["vocab"], s["block"], args.arch))
        return
    if args.compile:
        for name in (["nanogpt", "tiny"] if args.shape == "both" else [args.shape]):
            s = SHAPES[name]
            gains = []
            for r in range(args.rounds):
                steps = {c: minigpt_step(s["vocab"], s["block"], compiled=c)
                         for c in (False, True)}
                start = time.perf_counter()
                steps[True](*_batch(s))  # compiling happens here, timed apart
                first = time.perf_counter() - start
                ms = interleaved(steps, s, args.steps)
                gains.append(ms[False] / ms[True])
                print(f"{name} round {r + 1}: eager {ms[False] * 1e3:.1f} ms, compiled "
                      f"{ms[True] * 1e3:.1f} ms ({gains[-1]:.2f}×; first call {first:.0f} s)")
            print(f"{name}: compiled is {statistics.median(gains):.2f}× eager "
                  f"[{min(gains):.2f}–{max(gains):.2f}]")
        return
    if args.dropout_cost:
        s = SHAPES["tiny"]
        ms = interleaved({p: minigpt_step(s["vocab"], s["block"], p) for p in (0.0, 0.1)},
                         s, args.steps)
        print(f"tiny.yaml step: dropout 0: {ms[0.0] * 1e3:.1f} ms, dropout 0.1: "
              f"{ms[0.1] * 1e3:.1f} ms ({ms[0.1] / ms[0.0] - 1:+.0%})")
        return
    for name in (["nanogpt", "tiny"] if args.shape == "both" else [args.shape]):
        s = SHAPES[name]
        tokens = s["batch"] * s["block"]
        ratios, rows = [], []
        for r in range(args.rounds):
            ms = interleaved({"minigpt": minigpt_step(s["vocab"], s["block"], arch=args.arch),
                              "hf": hf_step(s["vocab"], s["block"], args.arch)}, s, args.steps)
            ratios.append(ms["hf"] / ms["minigpt"])
            rows.append(ms)
            peer = "HF Llama" if args.arch == "llama" else "HF GPT-2"
            print(f"{name} round {r + 1}: minigpt {ms['minigpt'] * 1e3:.1f} ms "
                  f"({tokens / ms['minigpt']:,.0f} tok/s) · {peer} {ms['hf'] * 1e3:.1f} ms "
                  f"({tokens / ms['hf']:,.0f} tok/s) · {ratios[-1]:.2f}×")
        print(f"{name} ({s['batch']} x {s['block']} tokens, vocab {s['vocab']}): minigpt is "
              f"{statistics.median(ratios):.2f}× HF's step [{min(ratios):.2f}–{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
