"""RL fine-tuning, minigpt's GRPO against TRL's GRPOTrainer, side by side: the same starting
weights, prompts, reward and settings.

The start is a 2 x 48 chat run fine-tuned for `--sft-steps` on "reverse WORD" (partial
accuracy), exported with `export-hf` for TRL. Both then run `--steps` GRPO steps: 16 prompts x
8 samples at temperature 1, at most 10 new tokens, AdamW at `--lr` (constant), no KL, on-policy
(one update per batch of samples), advantages centred on the group mean and not divided by its
spread (TRL: scale_rewards "none"), the loss normalised over all sampled tokens (TRL's default
"dapo"). The TRL model comes back with `import-hf`; both are scored with `minigpt eval --task
reverse` on the same held-out prompts.

    python benchmarks/trl_grpo_peer.py --trl-python VENV/bin/python [--steps 60] [--rounds 2]
        [--seeds 1]

`--seeds K` runs K GRPO seeds from each round's start, on both sides (seed r + rounds * k for
round r's k-th; k = 0 is the round's own seed), so the spread of outcomes from one start is
measured, not only the spread between starts; `--round R` (repeatable) runs only those
rounds' starts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from trl_sft_peer import MODEL, minigpt, score, training_seconds  # beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt_cli import tasks  # noqa: E402

TRL_SCRIPT = r"""
import json, sys, time
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
hf, prompts, out = sys.argv[1:4]
steps, seed, lr = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
rows = [json.loads(x) for x in open(prompts)]
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                              "answer": r["answer"]} for r in rows])

def reverse(prompts, completions, answer, **kwargs):
    return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]

model = AutoModelForCausalLM.from_pretrained(hf)
tokenizer = AutoTokenizer.from_pretrained(hf)
tokenizer.pad_token = tokenizer.bos_token
args = GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=128,
                  num_generations=8, max_completion_length=10, temperature=1.0, top_p=1.0,
                  learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                  weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0,
                  beta=0.0, scale_rewards="none", loss_type="dapo", num_iterations=1,
                  logging_steps=10, save_strategy="no", report_to=[], seed=seed,
                  use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0)
trainer = GRPOTrainer(model=model, reward_funcs=reverse, args=args, train_dataset=dataset,
                      processing_class=tokenizer)
began = time.perf_counter()
trainer.train()
print("TRAIN_S", time.perf_counter() - began)
rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
print("REWARDS", json.dumps(rewards))
trainer.save_model(out)
tokenizer.save_pretrained(out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-python", required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/trl-grpo-peer"))
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--round", type=int, action="append", default=[])
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    unique = list({p.text: p for p in tasks.make("reverse", 24000, 0)}.values())
    held, rl, sft = unique[:200], unique[200:2200], unique[2200:]
    data = out / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p.text},
        {"role": "assistant", "content": p.fields["answer"]}]}) + "\n" for p in sft))
    held_path, rl_path = out / "held.jsonl", out / "rl.jsonl"
    for path, items in ((held_path, held), (rl_path, rl)):
        path.write_text("".join(json.dumps({"prompt": p.text, **p.fields}) + "\n"
                                for p in items))
    rows = []
    for r in args.round or range(args.rounds):
        start = out / f"sft{r}"
        base = {"seed": r, "device": "cpu", "dtype": "float32",
                "data": {"source": str(data), "format": "chat", "val_fraction": 0.01},
                "tokenizer": {"kind": "byte"}}
        if not start.exists():
            sft_cfg = {**base, "out_dir": str(start), "model": MODEL,
                       "train": {"batch_size": 32, "max_steps": args.sft_steps, "lr": 1e-2,
                                 "min_lr": 1e-3, "warmup_steps": 10, "optimizer": "muon",
                                 "eval_interval": args.sft_steps, "eval_steps": 1,
                                 "save_interval": args.sft_steps}}
            (out / f"sft{r}.yaml").write_text(yaml.safe_dump(sft_cfg))
            minigpt("train", str(out / f"sft{r}.yaml"))
            minigpt("export-hf", str(start), str(out / f"sft{r}-hf"))
        for k in range(args.seeds):
            rows.append(grpo_pair(args, out, r, r + args.rounds * k, base, start, held_path,
                                  rl_path))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    summarise(rows)


def grpo_pair(args: argparse.Namespace, out: Path, r: int, seed: int, base: dict, start: Path,
              held_path: Path, rl_path: Path) -> dict:
    """One GRPO seed from round r's start, minigpt's then TRL's, both scored."""
    tag = f"{r}" if seed == r else f"{r}s{seed}"
    base = {**base, "seed": seed}
    grpo = {**base, "out_dir": str(out / f"grpo{tag}"),
            "train": {"init_from": str(start), "objective": "grpo", "optimizer": "adamw",
                      "lr": args.lr, "min_lr": args.lr, "warmup_steps": 0,
                      "weight_decay": 0.1, "beta2": 0.99, "grad_clip": 1.0,
                      "max_steps": args.steps, "eval_interval": args.steps,
                      "eval_steps": 1, "save_interval": args.steps, "log_interval": 10},
            "rl": {"prompts": str(rl_path), "reward": "reverse", "group_size": 8,
                   "prompts_per_step": 16, "max_new_tokens": 10}}
    (out / f"grpo{tag}.yaml").write_text(yaml.safe_dump(grpo))
    minigpt("train", str(out / f"grpo{tag}.yaml"))
    ours_s = training_seconds(out / f"grpo{tag}" / "metrics.jsonl", args.steps)
    trl = subprocess.run([args.trl_python, "-c", TRL_SCRIPT, str(out / f"sft{r}-hf"),
                          str(rl_path), str(out / f"trl{tag}"), str(args.steps), str(seed),
                          str(args.lr)], capture_output=True, text=True, cwd=ROOT, check=True)
    trl_s = float(trl.stdout.split("TRAIN_S")[-1].split()[0])
    minigpt("import-hf", str(out / f"trl{tag}"), str(out / f"trl{tag}-run"))
    x = {"round": r, "seed": seed, "minigpt_s": ours_s, "trl_train_s": trl_s,
         "minigpt_rewards": logged_rewards(out / f"grpo{tag}" / "metrics.jsonl"),
         "trl_rewards": json.loads(trl.stdout.split("REWARDS")[-1].splitlines()[0]),
         "start": score(start, held_path, out / f"s{r}.json"),
         "minigpt": score(out / f"grpo{tag}", held_path, out / f"m{tag}.json"),
         "trl": score(out / f"trl{tag}-run", held_path, out / f"t{tag}.json")}
    print(f"round {r} seed {seed}: start sampled {x['start']['sampled_mean_reward']:.3f} | "
          f"minigpt {ours_s:.1f} s, sampled {x['minigpt']['sampled_mean_reward']:.3f} greedy "
          f"{x['minigpt']['greedy_mean_reward']:.3f} | TRL {trl_s:.1f} s, sampled "
          f"{x['trl']['sampled_mean_reward']:.3f} greedy "
          f"{x['trl']['greedy_mean_reward']:.3f}", flush=True)
    return x


def logged_rewards(metrics: Path) -> list[float]:
    """The mean reward of every logged step (log_interval 10, as TRL's logging_steps)."""
    log = [json.loads(x) for x in metrics.read_text().splitlines()]
    return [r["reward_mean"] for r in log if "reward_mean" in r]


def summarise(rows: list[dict]) -> None:
    """Per side: the median held-out sampled accuracy, how many seeds ended below their start's
    (the run got worse, not better) and how many at 0 (0.001 or less: nothing left to learn
    from)."""
    for side in ("minigpt", "trl"):
        acc = sorted(x[side]["sampled_mean_reward"] for x in rows)
        worse = sum(x[side]["sampled_mean_reward"] < x["start"]["sampled_mean_reward"]
                    for x in rows)
        print(f"{side}: sampled accuracy median {statistics.median(acc):.3f} "
              f"[{acc[0]:.3f}-{acc[-1]:.3f}], {worse} of {len(rows)} ended below their start, "
              f"{sum(a <= 0.001 for a in acc)} at 0")


if __name__ == "__main__":
    main()
