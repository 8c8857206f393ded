"""`minigpt train`'s tokens/s with glibc keeping freed memory (what training does on
the CPU, device.keep_freed_memory) against glibc's own policy, side by side.

glibc gives each block of 32 MiB or more its own mmap and unmaps it when freed, so a step
that makes such tensors page-faults them in again every step. Each run is a fresh `minigpt
train` process (the policy is process-wide): "kept" as minigpt sets it, "glibc" with that
call skipped, so glibc's default policy stands (setting one of its MALLOC_* variables instead
would not do: any of them also turns off glibc's adaptive mmap threshold). The two
alternate, `--rounds` times, on tiny.yaml as it is and on shapes with larger logits.
Reported: the last logged window's tokens/s, minor page faults per step (over the whole
`train` call, set-up included), and peak resident memory.

    python benchmarks/train_malloc.py [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CASES = {
    "tiny.yaml as is (8 x 256 tokens, vocab 2,048)": [],
    "tiny.yaml, batch 16 (logits 32 MiB)": ["train.batch_size=16"],
    "tiny.yaml, gpt2 tokenizer, batch 4 (vocab 50,257: logits 196 MiB)": [
        "tokenizer.kind=gpt2", "train.batch_size=4"],
}
MODES = ("kept", "glibc")
CHILD = """
import json, resource, sys
import minigpt_cli.training.loop as T
from minigpt_cli.config import load_config
from minigpt_cli.training.loop import train
if sys.argv[1] == "glibc":  # glibc's default policy: the call that changes it is skipped
    T.keep_freed_memory = lambda: ""
cfg = load_config("configs/tiny.yaml", sys.argv[2:])
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
s = train(cfg)
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"tok_s": s.tokens_per_s, "faults": r.ru_minflt - before,
                  "rss_mb": r.ru_maxrss / 1024, "steps": s.step}))
"""


def run(sets: list[str], mode: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = [f"out_dir={out}/run", f"train.max_steps={steps}", "train.eval_interval=100000",
                "train.eval_steps=1", "train.save_interval=100000", "train.log_interval=10",
                "device=cpu", *sets]
        done = subprocess.run([sys.executable, "-c", CHILD, mode, *args], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            sys.exit(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for case, sets in CASES.items():
        res: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in MODES:
                res[mode].append(run(sets, mode, args.steps))
                x = res[mode][-1]
                print(f"{case} · round {r + 1} · {mode}: {x['tok_s']:,.0f} tok/s, "
                      f"{x['faults'] / x['steps']:,.0f} faults/step, {x['rss_mb']:,.0f} MB peak",
                      flush=True)
        ratios = [k["tok_s"] / g["tok_s"] for k, g in zip(res["kept"], res["glibc"], strict=True)]
        print(f"{case}: kept ÷ glibc {statistics.median(ratios):.2f}× "
              f"[{min(ratios):.2f}–{max(ratios):.2f}] per round\n", flush=True)


if __name__ == "__main__":
    main()
