"""Chat fine-tuning, minigpt against TRL's SFTTrainer, side by side: the same initial weights,
the same conversations, the same optimizer settings, the loss on the answers only in both.

The model is a 2 x 48 Llama with bytes as tokens and minigpt's chat tokens and template. Its
initial weights are exported with `export-hf`, so TRL trains the very same numbers as
LlamaForCausalLM (conversational prompt-completion data: TRL renders it through the exported
chat template and counts the completion's tokens only). Each round trains minigpt, then TRL
(`--trl-python`: an interpreter with trl installed; it is not a minigpt dependency), each
timed around its training call alone; the TRL model comes back with `import-hf` and both are
scored with `minigpt eval --task reverse` on the same held-out prompts.

    python benchmarks/trl_sft_peer.py --trl-python VENV/bin/python [--steps 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt_cli import tasks  # noqa: E402
from minigpt_cli import tokenizer as tok  # noqa: E402
from minigpt_cli.config import Config, ModelConfig, TokenizerConfig  # noqa: E402
from minigpt_cli.model import store  # noqa: E402
from minigpt_cli.model.gpt import GPT, GPTConfig  # noqa: E402
from minigpt_cli.tokenizer import chat  # noqa: E402

MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 48, "block_size": 32, "dropout": 0.0,
         "bias": False, "norm": "rmsnorm", "position": "rotary", "mlp": "swiglu"}

TRL_SCRIPT = r"""
import json, sys, time
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
hf, data, out = sys.argv[1:4]
steps, seed = int(sys.argv[4]), int(sys.argv[5])
rows = [json.loads(x) for x in open(data)]
dataset = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]}
                             for r in rows])
model = AutoModelForCausalLM.from_pretrained(hf)
tokenizer = AutoTokenizer.from_pretrained(hf)
args = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=32,
                 learning_rate=float(sys.argv[6]), lr_scheduler_type="cosine", warmup_steps=0,
                 weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0,
                 max_length=32, logging_steps=50, save_strategy="no", report_to=[],
                 seed=seed, use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0,
                 completion_only_loss=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
began = time.perf_counter()
trainer.train()
print("TRAIN_S", time.perf_counter() - began)
trainer.save_model(out)
tokenizer.save_pretrained(out)
"""


def minigpt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "minigpt_cli", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def initial_run(out: Path, seed: int) -> None:
    """A run at step 0: random weights, bytes plus the chat tokens, the default template."""
    enc = tok.with_tokens(tok.byte_encoding(), chat.CHAT_TOKENS)
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=enc.n_vocab, **MODEL)
    model = GPT(cfg)
    desc = tok.describe(enc, "byte", chat.default_template(tok.EOT).to_dict())
    config = Config(out_dir=str(out), tokenizer=TokenizerConfig(kind="byte"),
                    model=ModelConfig(**MODEL))
    out.mkdir(parents=True, exist_ok=True)
    (out / store.CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict()))
    store.save_model(out / store.MODEL_FILE, model, {
        "model_config": vars(cfg), "tokenizer": desc, "step": 0, "val_loss": None,
        "config": config.to_dict()})


def training_seconds(metrics: Path, steps: int) -> float:
    """The training loop's own time for `steps` steps, from its log: the time between the
    first and the last logged step, per step, times the steps (start-up, tokenizing and the
    evaluation at the end left out, as TRL's train() leaves out its tokenizing)."""
    log = [json.loads(x) for x in metrics.read_text().splitlines()]
    timed = [r for r in log if "elapsed_s" in r]
    first, last = timed[0], timed[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"]) * steps


def score(run: Path, held: Path, out: Path) -> dict:
    minigpt("eval", "--checkpoint", str(run), "--task", "reverse", "--prompts", str(held),
            "--samples", "4", "--max-new-tokens", "10", "--json", str(out))
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trl-python", required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/trl-peer"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    pool = {p.text: p for p in tasks.make("reverse", 24000, 0)}.values()
    prompts = list(pool)
    held, train = prompts[:200], prompts[200:]
    data = out / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": p.text},
        {"role": "assistant", "content": p.fields["answer"]}]}) + "\n" for p in train))
    held_path = out / "held.jsonl"
    held_path.write_text("".join(json.dumps({"prompt": p.text, **p.fields}) + "\n"
                                 for p in held))
    rows = []
    for r in range(args.rounds):
        init = out / f"init{r}"
        if not init.exists():
            initial_run(init, seed=r)
            minigpt("export-hf", str(init), str(out / f"init{r}-hf"))
        cfg = {"out_dir": str(out / f"minigpt{r}"), "seed": r, "device": "cpu",
               "dtype": "float32",
               "data": {"source": str(data), "format": "chat", "val_fraction": 0.01},
               "train": {"init_from": str(init), "batch_size": 32, "max_steps": args.steps,
                         "lr": args.lr, "min_lr": 0.0, "warmup_steps": 0, "weight_decay": 0.1,
                         "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0, "optimizer": "adamw",
                         "eval_interval": args.steps, "eval_steps": 1,
                         "save_interval": args.steps, "log_interval": 50}}
        (out / f"minigpt{r}.yaml").write_text(yaml.safe_dump(cfg))
        minigpt("train", str(out / f"minigpt{r}.yaml"))
        ours_s = training_seconds(out / f"minigpt{r}" / "metrics.jsonl", args.steps)
        trl = subprocess.run([args.trl_python, "-c", TRL_SCRIPT, str(out / f"init{r}-hf"),
                              str(data), str(out / f"trl{r}"), str(args.steps), str(r),
                              str(args.lr)],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        trl_s = float(trl.stdout.split("TRAIN_S")[-1].split()[0])
        minigpt("import-hf", str(out / f"trl{r}"), str(out / f"trl{r}-run"))
        rows.append({"round": r, "minigpt_s": ours_s, "trl_train_s": trl_s,
                     "minigpt": score(out / f"minigpt{r}", held_path, out / f"m{r}.json"),
                     "trl": score(out / f"trl{r}-run", held_path, out / f"t{r}.json")})
        x = rows[-1]
        print(f"round {r}: minigpt {ours_s:.1f} s (its training loop) greedy "
              f"{x['minigpt']['greedy_mean_reward']:.3f} sampled "
              f"{x['minigpt']['sampled_mean_reward']:.3f} | TRL {trl_s:.1f} s (train() "
              f"alone) greedy {x['trl']['greedy_mean_reward']:.3f} sampled "
              f"{x['trl']['sampled_mean_reward']:.3f}", flush=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
