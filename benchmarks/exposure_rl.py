"""Does RL fine-tuning change exposure bias, as the literature says it should? Measured where
the oracle is exact.

Uses benchmarks/exposure_teacher.py's teacher, synthetic corpus and teacher-forced students
(run that first, into the same --out). From each student, GRPO runs `--steps` steps on
32-token prefixes of the student's training text, continuing each 64 tokens, with the
teacher's mean log-probability of a continuation as its reward
(benchmarks/exposure_reward.py). Then `minigpt eval --exposure --oracle TEACHER` scores the
student before and after on the same held-out windows and seed: %ExAccErr(64), R_D and R_M,
and the teacher-forced val bits per byte.

    python benchmarks/exposure_teacher.py --out runs/exposure-demo --seeds 1
    python benchmarks/exposure_rl.py --out runs/exposure-demo --seeds 1 [--steps 60]
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

from rich.console import Console

from minigpt_cli.config import config_from_dict
from minigpt_cli.evaluation.eval_cli import run_eval
from minigpt_cli.rl.grpo import GRPO
from minigpt_cli.training.loop import train

HERE = Path(__file__).resolve().parent


def prompts(corpus: Path, out: Path, n: int = 2000, chars: int = 32) -> Path:
    """`n` prefixes of the corpus's documents (the training heads, not the held-out tails)."""
    docs = [d for d in corpus.read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()]
    heads = [d[: int(len(d) * 0.9)] for d in docs]
    rows = []
    for i in range(n):
        d = heads[i % len(heads)]
        start = (i * 37) % max(1, len(d) - chars)
        rows.append({"prompt": d[start:start + chars]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def exposure(run: Path, teacher: Path, seed: int, windows: int) -> dict:
    quiet = Console(file=io.StringIO())
    plain = run_eval(checkpoint=str(run), data=None, stride=128, batch_size=8, json_path=None,
                     plot_path=None, device="cpu", dtype="float32", console=quiet)
    exp = run_eval(checkpoint=str(run), data=None, stride=None, batch_size=8, json_path=None,
                   plot_path=None, device="cpu", dtype="float32", console=quiet,
                   exposure=True, oracle=str(teacher), context=32, length=64, samples=4,
                   windows=windows, seed=seed)
    return {"val_bpb": plain["bits_per_byte"], "R_D_64": exp["R"]["data"][63],
            "R_M_sampled_64": exp["R"]["sampled"][63], "R_M_greedy_64": exp["R"]["greedy"][63],
            "ex_acc_err_sampled_64": exp["ex_acc_err_sampled"]["64"],
            "ex_acc_err_greedy_64": exp["ex_acc_err_greedy"]["64"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/exposure-demo"))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--kl", type=float, default=0.0, help="rl.kl: penalty to the student")
    args = ap.parse_args()
    teacher, corpus = args.out / "teacher", args.out / "synthetic.txt"
    os.environ["MINIGPT_TEACHER"] = str(teacher)
    prompt_file = prompts(corpus, args.out / "rl-prompts.jsonl")
    results = []
    for seed in range(1, args.seeds + 1):
        student = args.out / f"student-tf-seed{seed}"
        rl = args.out / (f"student-rl-seed{seed}" + (f"-kl{args.kl:g}" if args.kl else ""))
        raw = {"out_dir": str(rl), "seed": seed, "device": "cpu", "dtype": "float32",
               "data": {"source": str(corpus), "val_fraction": 0.1},
               "train": {"init_from": str(student), "objective": "grpo",
                         "max_steps": args.steps, "lr": args.lr, "min_lr": args.lr,
                         "warmup_steps": 0, "eval_interval": args.steps, "eval_steps": 20,
                         "save_interval": args.steps, "log_interval": 5, "batch_size": 16},
               "rl": {"prompts": str(prompt_file),
                      "reward": f"{HERE / 'exposure_reward.py'}:teacher_logprob",
                      "group_size": 8, "prompts_per_step": 16, "max_new_tokens": 64,
                      "kl": args.kl}}
        if not (rl / "model.safetensors").exists():
            cfg = config_from_dict(raw)
            train(cfg, console=Console(stderr=True, quiet=True), objective=GRPO(cfg))
        log = [json.loads(x) for x in (rl / "metrics.jsonl").read_text().splitlines()]
        rewards = [r["reward_mean"] for r in log if "reward_mean" in r]
        row = {"seed": seed, "reward_first_last": (rewards[0], rewards[-1]),
               "before": exposure(student, teacher, seed, args.windows),
               "after": exposure(rl, teacher, seed, args.windows)}
        results.append(row)
        print(json.dumps(row, indent=1))
    name = "rl-summary.json" if not args.kl else f"rl-kl{args.kl:g}-summary.json"
    (args.out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
