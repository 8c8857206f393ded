"""Ablations at equal wall time: each recipe change's effect on validation bits per byte.

Each variant is a base config plus `--set` overrides. Its step time is measured first (the
same model, optimizer and clipping `minigpt train` runs, on random tokens of the config's
shape, 2 threads), and its step count is set so that the steps take `--budget` seconds; the
schedule (warmup, cosine) scales with it. Then `minigpt train` runs it for real, and `minigpt
eval` scores the whole validation split (the same text for every variant, whatever its batch
size); that figure and the real wall time are reported. Variants run one after another, never
side by side: two at once would share the two cores.

    python benchmarks/ablations.py --budget 120 [--base configs/tiny-gpt2.yaml] [--source FILE]
        [--variants baseline,llama,...] [--set key=value ...] [--out /tmp/ablations]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from minigpt_cli.config import Config, load_config
from minigpt_cli.model.gpt import GPT, GPTConfig
from minigpt_cli.training import optim

LLAMA = ["model.norm=rmsnorm", "model.position=rotary", "model.mlp=swiglu", "model.bias=false"]
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "rmsnorm": ["model.norm=rmsnorm"],
    "rotary": ["model.position=rotary"],
    "swiglu": ["model.mlp=swiglu"],
    "relu2": ["model.mlp=relu2"],
    "qk_norm": ["model.qk_norm=true"],
    "muon": ["train.optimizer=muon"],
    "llama": LLAMA,
    "llama+muon": [*LLAMA, "train.optimizer=muon"],
    "llama+muon+lr": [*LLAMA, "train.optimizer=muon", "train.lr=1e-2", "train.min_lr=1e-3"],
    # tiny.yaml's recipe: all of the above, at batch 8
    "recipe": [*LLAMA, "train.optimizer=muon", "train.lr=1e-2", "train.min_lr=1e-3",
               "train.batch_size=8"],
}


def step_seconds(cfg: Config, vocab: int, steps: int = 8) -> float:
    """One optimizer step of this config (forward, backward, clip, update): the median."""
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab, **vars(m)))
    opt = optim.build(model, t, torch.device("cpu"))
    x = torch.randint(0, vocab, (t.batch_size, m.block_size + 1))
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        for _ in range(t.grad_accum_steps):
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sorted(times[3:])[len(times[3:]) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=200.0, help="seconds of training steps")
    ap.add_argument("--base", default="configs/tiny-gpt2.yaml")
    ap.add_argument("--source", help="data.source for every variant (default: the base's)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], help="extra override, every variant")
    ap.add_argument("--out", default="/tmp/ablations")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(args.base)
    rows = []
    for name in args.variants.split(","):
        sets = [*args.set, *VARIANTS[name]] + ([f"data.source={args.source}"] if args.source
                                               else [])
        variant = load_config(args.base, sets)
        vocab = {"bpe": variant.tokenizer.vocab_size, "byte": 257}.get(variant.tokenizer.kind,
                                                                      50257)
        per_step = step_seconds(variant, vocab)
        steps = max(10, int(args.budget / per_step))
        warmup = max(1, steps * base.train.warmup_steps // base.train.max_steps)
        out = Path(args.out) / name
        cmd = [sys.executable, "-m", "minigpt_cli", "train", args.base,
               *[f"--set={s}" for s in sets], f"--set=out_dir={out}",
               f"--set=train.max_steps={steps}", f"--set=train.warmup_steps={warmup}",
               f"--set=train.eval_interval={steps}", f"--set=train.save_interval={steps}"]
        subprocess.run(["rm", "-rf", str(out)], check=True)
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        wall = time.perf_counter() - start
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}")
            continue
        bpb = whole_val_bpb(out, variant.model.block_size)
        rows.append((name, per_step, steps, wall, bpb))
        print(f"{name:12s} {per_step * 1e3:6.0f} ms/step  {steps:5d} steps  {wall:6.1f} s  "
              f"val {bpb:.4f} bpb", flush=True)
    print("\n| variant | ms / step | steps | wall s | val bits/byte | vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = next((r[4] for r in rows if r[0] == "baseline"), None)
    for name, per_step, steps, wall, bpb in rows:
        delta = f"{bpb - ref:+.4f}" if ref is not None else ""
        print(f"| {name} | {per_step * 1e3:.0f} | {steps} | {wall:.0f} | {bpb:.4f} | {delta} |")


def whole_val_bpb(run: Path, context: int) -> float:
    """`minigpt eval` on the run's whole validation split, windows side by side (stride = the
    context, as training's evaluation scores them): the same text for every variant, whatever
    batch size its training evaluated with."""
    report = run / "eval.json"
    done = subprocess.run([sys.executable, "-m", "minigpt_cli", "eval", "--checkpoint", str(run),
                           "--stride", str(context), "--json", str(report)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"eval of {run} failed: {done.stderr[-500:]}")
    return json.loads(report.read_text())["bits_per_byte"]


if __name__ == "__main__":
    main()
