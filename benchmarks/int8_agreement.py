"""Next-token top-1 agreement between a run's float32 weights and their int8 (or int4) rounding.

Scores the first --windows non-overlapping windows of the run's validation split with both
models and counts the positions where their most likely next token is the same.

    python benchmarks/int8_agreement.py --checkpoint runs/tiny [--windows 200] [--quantize int4]
"""

from __future__ import annotations

import argparse
import copy

import torch

from minigpt_cli.evaluation.eval_cli import eval_tokens
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.model.int8 import quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--quantize", choices=["int8", "int4"], default="int8")
    args = ap.parse_args()
    model, enc, meta, _ = load_for_inference(args.checkpoint, "cpu", "float32")
    rounded = copy.deepcopy(model)
    quantize_model(rounded, kind=args.quantize)
    tokens, where = eval_tokens(meta, enc, None)
    T = model.config.block_size
    windows = torch.tensor(tokens[: len(tokens) // T * T]).view(-1, T)[: args.windows]
    same = 0
    with torch.inference_mode():
        for x in windows:
            same += (model(x[None])[0].argmax(-1) == rounded(x[None])[0].argmax(-1)).sum().item()
    print(f"{where}: {args.quantize}, {len(windows)} windows, {windows.numel():,} positions, "
          "top-1 agreement "
          f"{100 * same / windows.numel():.2f}%")


if __name__ == "__main__":
    main()
