"""Does a draft model pay on a 2-core CPU? Its costs at GPT-2 124M, and its acceptance on a
trained pair, measured; the speed-up they imply, and the one measured end to end.

Part 1, the costs (random weights, GPT-2 124M shape; the draft a small model with GPT-2's
vocabulary): the C step's time for one row (plain decoding), for 1 + k rows of one sequence
(a verify step with k drafts), and the draft's one-row step. A verify step keeps on average
E = (1 - a^(k+1)) / (1 - a) tokens when each draft is kept with probability a, and costs the
verify step plus k draft steps, so the speed-up over plain decoding is
E * t_plain / (t_verify(k) + k * t_draft). The break-even a is where that is 1.

Part 2, acceptance on a trained pair with one tokenizer (--target RUN --draft RUN): greedy
generation of each prompt alone (batch 1) with and without the draft, interleaved, outputs
checked equal, acceptance and tokens per verify step from the engine's own counters.

`--draft truncate:L` drafts with the target's own first L blocks (for a target nobody trained
here, such as random GPT-2 weights).

    python benchmarks/draft_model.py [--rounds 3] [--target RUN --draft RUN|truncate:L] [--k 2,4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minigpt_cli import tokenizer as tok
from minigpt_cli.inference.engine.runner import ModelRunner
from minigpt_cli.inference.generate import Timings, generate
from minigpt_cli.inference.loading import load_draft, load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model.gpt import GPT, GPTConfig

PROMPTS = ["ROMEO:\nWhat say you", "KING HENRY:\nNow, lords,", "First Citizen:\nWe are",
           "JULIET:\nO, swear not", "HAMLET:\nThere is"]


def step_ms(model: GPT, rows: int, repeats: int) -> float:
    """Median time of the C step for one sequence's next token plus rows - 1 guesses."""
    runner = ModelRunner(model, 1, engine="native")
    runner.run([(0, list(range(16)))], [], [])
    times = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        runner.run([], [0], [5], [[7] * (rows - 1)])
        times.append(time.perf_counter() - t)
        runner.truncate(0, rows)  # the window back where it was
    return statistics.median(times[2:]) * 1e3


def costs(rounds: int, ks: list[int], draft_shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12,
                           n_embd=768)).eval()
    layers, width = draft_shape
    draft = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=layers,
                          n_head=max(1, width // 64), n_embd=width)).eval()
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        row = {"plain": step_ms(target, 1, 20), "draft": step_ms(draft, 1, 40)}
        for k in ks:
            row[f"verify {k}"] = step_ms(target, 1 + k, 20)
        per_round.append(row)
        print(f"round {r + 1}: " + ", ".join(f"{n} {v:.2f} ms" for n, v in row.items()))
    med = {n: statistics.median(r[n] for r in per_round) for n in per_round[0]}
    spread = {n: (min(r[n] for r in per_round), max(r[n] for r in per_round)) for n in med}
    print(f"\nGPT-2 124M target, draft {layers} layers x {width} (GPT-2 vocabulary), medians "
          "[min-max] over rounds:")
    for n, v in med.items():
        print(f"  {n:9s} {v:6.2f} ms [{spread[n][0]:.2f}-{spread[n][1]:.2f}]"
              + (f"  = {v / med['plain']:.2f} x plain" if n != "plain" else ""))
    print("\npredicted speed-up E * t_plain / (t_verify(k) + k * t_draft) by acceptance a:")
    alphas = [0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
    print("  k   " + "  ".join(f"a={a:.1f}" for a in alphas) + "  break-even a")
    for k in ks:
        cost = med[f"verify {k}"] + k * med["draft"]
        gains = [(1 - a ** (k + 1)) / (1 - a) * med["plain"] / cost for a in alphas]
        lo, hi = 0.0, 1.0 - 1e-9  # bisect E(a) * t_plain = cost
        for _ in range(60):
            mid = (lo + hi) / 2
            if (1 - mid ** (k + 1)) / (1 - mid) * med["plain"] < cost:
                lo = mid
            else:
                hi = mid
        print(f"  {k:<3d} " + "  ".join(f"{g:5.2f}x" for g in gains) + f"  {hi:.2f}")


def truncated(model: GPT, layers: int) -> GPT:
    """The model's first `layers` blocks with its embeddings, final norm and head: a draft
    that needs no training (LayerSkip-style early exit), for a model nobody trained here."""
    cfg = GPTConfig(**{**vars(model.config), "n_layer": layers})
    draft = GPT(cfg).eval()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("h.") or int(k.split(".")[1]) < layers}
    draft.load_state_dict(state)
    return draft


def acceptance(target_run: str, draft_run: str, rounds: int, ks: list[int], tokens: int
               ) -> None:
    model, enc, _, _ = load_for_inference(target_run, "cpu", "float32")
    if draft_run.startswith("truncate:"):
        draft = truncated(model, int(draft_run.removeprefix("truncate:")))
    else:
        draft = load_draft(draft_run, model, enc, "cpu", "float32")
    greedy = SamplerSettings(temperature=0.0)
    ids = [tok.encode(enc, p) for p in PROMPTS]
    ratios: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(rounds):
        generate(model, enc, ids[:1], greedy, 8, engine="native")  # warm-up
        for k in ks:
            tp, ts = Timings(), Timings()
            for one in ids:  # batch 1: where decoding is bound by the weights' bytes
                plain, a = generate(model, enc, [one], greedy, tokens, engine="native")
                spec, b = generate(model, enc, [one], greedy, tokens, engine="native",
                                   draft=draft, draft_k=k)
                assert spec[0].tokens == plain[0].tokens, "the draft changed the output"
                for total, t in ((tp, a), (ts, b)):
                    for name in ("total_s", "steps", "drafted", "accepted", "verify_steps",
                                 "draft_steps"):
                        setattr(total, name, getattr(total, name) + getattr(t, name))
            ratio = tp.total_s / ts.total_s
            ratios[k].append(ratio)
            print(f"round {r + 1} k={k}: plain {tp.total_s * 1e3:.0f} ms, draft "
                  f"{ts.total_s * 1e3:.0f} ms ({ratio:.2f}x); kept {ts.accepted}/{ts.drafted}"
                  f" = {ts.accepted / max(1, ts.drafted):.2f}, "
                  f"{1 + ts.accepted / max(1, ts.verify_steps):.2f} tokens a verify step, "
                  f"{ts.draft_steps} draft steps for {ts.steps} model steps")
    for k, rs in ratios.items():
        print(f"k={k}: median {statistics.median(rs):.2f}x [{min(rs):.2f}-{max(rs):.2f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--k", default="1,2,4")
    ap.add_argument("--draft-shape", default="2,256", help="layers,width of the part-1 draft")
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    layers, width = (int(v) for v in args.draft_shape.split(","))
    costs(args.rounds, ks, (layers, width))
    if args.target and args.draft:
        print()
        acceptance(args.target, args.draft, args.rounds, ks, args.tokens)


if __name__ == "__main__":
    main()
