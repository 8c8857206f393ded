"""RL fine-tuning against an SFT-only control at the same compute, on a checkable task.

For each seed: chat fine-tune a small run from scratch on "reverse WORD" conversations for a
few steps, to partial accuracy; then, from that run, (a) GRPO on fresh prompts with the
`reverse` reward for `--rl-steps` steps, and (b) more of the same supervised fine-tuning for
as many steps as fit in (a)'s wall time. Each of the three runs is scored on 200 held-out
prompts with `minigpt eval --task reverse` (greedy accuracy, sampled accuracy at T=1, pass@4),
and with `minigpt eval --exposure` on the run's held-out conversations.

    python benchmarks/chat_rl.py [--seeds 0,1,2] [--sft-steps 200] [--rl-steps 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt_cli import tasks  # noqa: E402


def minigpt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "minigpt_cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_config(out: Path, data: Path, steps: int, seed: int) -> dict:
    return {"out_dir": str(out), "seed": seed, "device": "cpu", "dtype": "float32",
            "data": {"source": str(data), "format": "chat", "val_fraction": 0.05},
            "tokenizer": {"kind": "byte"},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 48, "block_size": 32,
                      "dropout": 0.0, "bias": False, "norm": "rmsnorm", "position": "rotary",
                      "mlp": "swiglu"},
            "train": {"batch_size": 32, "max_steps": steps, "lr": 1e-2, "min_lr": 1e-3,
                      "warmup_steps": 10, "optimizer": "muon", "eval_interval": steps,
                      "eval_steps": 4, "save_interval": steps, "log_interval": 10}}


def train(cfg: dict, path: Path) -> float:
    path.write_text(yaml.safe_dump(cfg))
    began = time.perf_counter()
    minigpt("train", str(path))
    return time.perf_counter() - began


def score(run: Path, held: Path, out: Path) -> dict:
    minigpt("eval", "--checkpoint", str(run), "--task", "reverse", "--prompts", str(held),
            "--samples", "4", "--max-new-tokens", "10", "--json", str(out))
    task = json.loads(out.read_text())
    exposure = out.with_suffix(".exposure.json")
    minigpt("eval", "--checkpoint", str(run), "--exposure", "--context", "8", "--length", "16",
            "--windows", "32", "--json", str(exposure))
    return {"greedy": task["greedy_mean_reward"], "sampled": task["sampled_mean_reward"],
            "pass@4": task["pass@4"], "exposure": json.loads(exposure.read_text())}


def one_seed(root: Path, seed: int, sft_steps: int, rl_steps: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    pool = tasks.make("reverse", 24000, seed)
    seen, unique = set(), []
    for p in pool:
        if p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    held, rl_prompts, sft = unique[:200], unique[200:2200], unique[2200:]
    data = write(root / "chat.jsonl", [{"messages": [
        {"role": "user", "content": p.text},
        {"role": "assistant", "content": p.fields["answer"]}]} for p in sft])
    held_path = write(root / "held.jsonl", [{"prompt": p.text, **p.fields} for p in held])
    rl_path = write(root / "rl.jsonl", [{"prompt": p.text, **p.fields} for p in rl_prompts])
    start = base_config(root / "sft", data, sft_steps, seed)
    sft_s = train(start, root / "sft.yaml")
    rl = base_config(root / "rl", data, rl_steps, seed)
    del rl["model"]
    rl["train"].update(init_from=str(root / "sft"), objective="grpo", lr=1e-3, min_lr=1e-3,
                       warmup_steps=0, log_interval=5)
    rl["rl"] = {"prompts": str(rl_path), "reward": "reverse", "group_size": 8,
                "prompts_per_step": 16, "max_new_tokens": 10}
    rl_s = train(rl, root / "rl.yaml")
    per_step = sft_s / sft_steps
    control_steps = max(1, round(rl_s / per_step))
    control = base_config(root / "control", data, control_steps, seed)
    del control["model"]
    control["train"].update(init_from=str(root / "sft"), warmup_steps=0)
    control_s = train(control, root / "control.yaml")
    metrics = [json.loads(x) for x in (root / "rl" / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward_mean"] for m in metrics if "reward_mean" in m]
    return {"seed": seed, "sft_s": sft_s, "rl_s": rl_s, "control_steps": control_steps,
            "control_s": control_s, "rl_reward_first_last": (rewards[0], rewards[-1]),
            "start": score(root / "sft", held_path, root / "start.json"),
            "rl": score(root / "rl", held_path, root / "rl.json"),
            "control": score(root / "control", held_path, root / "control.json")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/chat-rl")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--rl-steps", type=int, default=60)
    args = ap.parse_args()
    results = [one_seed(Path(args.out) / f"seed{s}", int(s), args.sft_steps, args.rl_steps)
               for s in args.seeds.split(",")]
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    for r in results:
        print(f"seed {r['seed']}: SFT {r['sft_s']:.0f} s; GRPO {r['rl_s']:.0f} s (log's mean "
              f"reward {r['rl_reward_first_last'][0]:.2f} -> {r['rl_reward_first_last'][1]:.2f}); "
              f"control {r['control_steps']} SFT steps, {r['control_s']:.0f} s")
        for name in ("start", "rl", "control"):
            x = r[name]
            e = x["exposure"]
            print(f"  {name:8s} greedy {x['greedy']:.3f}  sampled {x['sampled']:.3f}  "
                  f"pass@4 {x['pass@4']:.3f}  exposure: {json.dumps(_exposure(e))}")


def _exposure(e: dict) -> dict:
    """Without an oracle: how often 4-grams repeat at the last length, and the mean entropy,
    on the held-out text and on the run's own greedy and sampled continuations."""
    last = str(e["levels"][-1])
    out = {}
    for kind in ("data", "greedy", "sampled"):
        ent = e["entropy_by_position"][kind]
        out[kind] = {"seq_rep_4": round(e["repetition"][kind][last]["seq_rep_4"], 3),
                     "entropy": round(sum(ent) / len(ent), 3)}
    return out


if __name__ == "__main__":
    main()
