"""Do GRPO's rollouts sample the model's own distribution? For each prompt, the probability
of the exact right answer (and the end-of-turn token) by teacher forcing, against the share of
`--samples` completions drawn the way GRPO draws them (inference/answers.py, temperature 1, no
top-p, one seed per completion) that are exactly that answer, in standard errors.

    python benchmarks/rollout_distribution.py --checkpoint RUN --prompts RL.jsonl [--n 6]
        [--samples 1024]

RL.jsonl: lines of {"prompt": ..., "answer": ...}, as benchmarks/trl_grpo_peer.py writes them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from minigpt_cli.inference import answers
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.tokenizer import chat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, enc, meta, _ = load_for_inference(args.checkpoint, "cpu", "float32")
    template = chat.ChatTemplate.from_dict(meta["tokenizer"].get("chat"))
    [end] = sorted(chat.stop_ids(enc, template))
    lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(x) for x in lines[:args.n]]
    settings = SamplerSettings(temperature=1.0, top_p=1.0)
    for row in rows:
        prompt = answers.prompt_ids(enc, template, row["prompt"])
        target = [*enc.encode(row["answer"]), end]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logits, _ = model(ids[:, :-1])
        logp = F.log_softmax(logits.float(), -1)[0, len(prompt) - 1:]
        want = math.exp(float(logp.gather(1, ids[0, len(prompt):, None]).sum()))
        drawn = answers.answer(model, enc, template, [prompt] * args.samples, settings,
                               args.max_new_tokens, list(range(args.samples)))
        got = sum(tokens == target for tokens, _ in drawn) / args.samples
        se = math.sqrt(want * (1 - want) / args.samples) or 1.0
        print(f"{row['prompt']!r}: P(answer) {want:.3f}, sampled {got:.3f} "
              f"({(got - want) / se:+.1f} se)")


if __name__ == "__main__":
    main()
