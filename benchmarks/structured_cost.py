"""What a grammar's token mask costs per token: decode tok/s with and without a JSON schema,
same run, same prompts, interleaved rounds.

The schema forces a long answer (an array of 24 short strings), so each request decodes
~150+ tokens under the mask; without it the same prompts decode the same number of tokens
(max_tokens, end-of-text not sampled). Each round runs both, in alternating order, on one
batch of `--batch` prompts; the figure is decode tokens per second (first token excluded).

    python benchmarks/structured_cost.py --run runs/tiny [--rounds 5] [--batch 1]

It first prints how many of the batch's answers (sampled at temperature 1) parse and follow
the schema.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from minigpt_cli import tokenizer as tok
from minigpt_cli.inference.constraints import Grammar
from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings

SCHEMA = {"type": "array", "minItems": 24, "maxItems": 24,
          "items": {"type": "string", "minLength": 3, "maxLength": 8}}


def _valid(text: str) -> bool:
    import jsonschema_rs  # (schemathesis brings it: the dev extra)

    try:
        return jsonschema_rs.validator_for(SCHEMA).is_valid(json.loads(text))
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--engine", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, enc, _, _ = load_for_inference(args.run, "cpu", "float32")
    prompts = [tok.encode(enc, "ROMEO:")] * args.batch
    settings = SamplerSettings(temperature=1.0)
    grammar = Grammar("json_schema", SCHEMA)
    # The constrained answers' length sets the unconstrained ones' (same token count).
    probe, _ = generate(model, enc, prompts, settings, 400, seed=0, grammar=grammar,
                        engine=args.engine)
    n = max(len(c.tokens) for c in probe)
    print(f"constrained answers: {n} tokens, e.g. {probe[0].text[:80]}...")
    print(f"schema-valid: {sum(_valid(c.text) for c in probe)} of {len(probe)}")
    rates: dict[str, list[float]] = {"plain": [], "grammar": []}
    for r in range(args.rounds):
        order = ("plain", "grammar") if r % 2 == 0 else ("grammar", "plain")
        for name in order:
            g = grammar if name == "grammar" else None
            out, t = generate(model, enc, prompts, settings, n, seed=r, grammar=g,
                              engine=args.engine)
            rates[name].append(t.decode_tokens_per_s)
            print(f"round {r + 1} {name:8s} {t.decode_tokens_per_s:8.1f} tok/s  "
                  f"({sum(len(c.tokens) for c in out)} tokens, {t.engine})")
    ratios = [g / p for g, p in zip(rates["grammar"], rates["plain"], strict=True)]
    for name, xs in rates.items():
        print(f"{name:8s} median {statistics.median(xs):8.1f} tok/s  "
              f"[{min(xs):.1f}-{max(xs):.1f}]")
    print(f"grammar / plain per round: median {statistics.median(ratios):.3f} "
          f"[{min(ratios):.3f}-{max(ratios):.3f}]")


if __name__ == "__main__":
    main()
