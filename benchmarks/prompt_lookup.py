"""Prompt lookup against one token a step, interleaved, on a copy-heavy and an open prompt.

Greedy decoding through `generate` (the engine, the C step), each round running both modes on
both prompts; prints decode tokens/s, the ratio, drafts kept and tokens per step. The outputs
are checked equal (they must be: tests/inference/test_speculative.py). `--temperature T` samples
instead (seeded, so still equal): text that does not fall into the loops greedy decoding of a
small model does, the honest case for "open" text.

    python benchmarks/prompt_lookup.py --checkpoint RUN [--rounds 3] [--tokens 128] [--n 2] [--k 4]
        [--temperature 0.8]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from minigpt_cli import tokenizer as tok
from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings

PASSAGE = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to "
           "suffer the slings and arrows of outrageous fortune, or to take arms against a sea "
           "of troubles, and by opposing end them.")
PROMPTS = {
    "copy-heavy": f"{PASSAGE}\n\nThe passage again, word for word:\n\n{PASSAGE[:60]}",
    "open": "The history of the city begins in the early years of the kingdom, when",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, enc, _, _ = load_for_inference(args.checkpoint, "cpu", "float32")
    settings = SamplerSettings(temperature=args.temperature)
    ratios: dict[str, list[float]] = {name: [] for name in PROMPTS}
    for r in range(args.rounds):
        for name, text in PROMPTS.items():
            ids = [tok.encode(enc, text)]
            plain, tp = generate(model, enc, ids, settings, args.tokens, engine="native",
                                 seed=r)
            spec, ts = generate(model, enc, ids, settings, args.tokens, engine="native",
                                prompt_lookup=args.n, draft_k=args.k, seed=r)
            assert spec[0].tokens == plain[0].tokens, "prompt lookup changed the output"
            ratio = ts.decode_tokens_per_s / tp.decode_tokens_per_s
            ratios[name].append(ratio)
            n = len(spec[0].tokens)
            print(f"round {r + 1} {name:10s}: one a step {tp.decode_tokens_per_s:7.1f} tok/s, "
                  f"lookup {ts.decode_tokens_per_s:7.1f} tok/s ({ratio:.2f}x); "
                  f"{ts.accepted}/{ts.drafted} drafts kept, {n / ts.steps:.2f} tokens a step")
    for name, rs in ratios.items():
        print(f"{name}: median {statistics.median(rs):.2f}x [{min(rs):.2f}-{max(rs):.2f}]")


if __name__ == "__main__":
    main()
