"""Chat fine-tuning on a task no one tuned for: answer "reverse WORD" with WORD spelled
backwards, WORD a random string of letters. Writes the conversations, trains a run on them with
`data.format: chat` (the loss on the answers only), serves it, and asks
`/v1/chat/completions` about held-out words no training conversation contains, greedy: the
share answered exactly, and how many answers ended at the end-of-turn token.

    python benchmarks/chat_sft.py [--out runs/chat-sft] [--steps 600] [--held-out 200]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml
from serve_load import free_port, wait_healthy  # beside this script, so on sys.path

ROOT = Path(__file__).resolve().parents[1]


def words(n: int, rng: random.Random, avoid: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        if w not in avoid:
            avoid.add(w)
            out.append(w)
    return out


def conversation(word: str) -> dict:
    return {"messages": [{"role": "user", "content": f"reverse {word}"},
                         {"role": "assistant", "content": word[::-1]}]}


def config(out: Path, data: Path, steps: int, seed: int) -> dict:
    """tiny.yaml's recipe at a size that learns this in minutes on 2 cores, bytes as tokens."""
    return {"out_dir": str(out), "seed": seed, "device": "cpu", "dtype": "float32",
            "data": {"source": str(data), "format": "chat", "val_fraction": 0.05},
            "tokenizer": {"kind": "byte"},
            "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 32,
                      "dropout": 0.0, "bias": False, "norm": "rmsnorm", "position": "rotary",
                      "mlp": "swiglu"},
            "train": {"batch_size": 32, "max_steps": steps, "lr": 1e-2, "min_lr": 1e-3,
                      "warmup_steps": 30, "optimizer": "muon", "eval_interval": steps,
                      "eval_steps": 4, "save_interval": steps, "log_interval": 50}}


def ask(port: int, word: str) -> tuple[str, str]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"messages": [{"role": "user", "content": f"reverse {word}"}], "temperature": 0,
            "max_tokens": 16}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})
    reply = json.loads(conn.getresponse().read())
    conn.close()
    choice = reply["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/chat-sft")
    ap.add_argument("--train", type=int, default=20000, help="training conversations")
    ap.add_argument("--held-out", type=int, default=200)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng, seen = random.Random(args.seed), set()
    held = words(args.held_out, rng, seen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out.parent / f"{out.name}.jsonl"
    data.write_text("".join(json.dumps(conversation(w)) + "\n"
                            for w in words(args.train, rng, seen)))
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump(config(out / "run", data, args.steps, args.seed)))
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minigpt_cli", "train", str(cfg)], check=True,
                   cwd=ROOT)
    trained = time.perf_counter() - began
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "minigpt_cli", "serve", "--checkpoint",
                               str(out / "run"), "--port", str(port)], cwd=ROOT,
                              stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port)
        answers = [ask(port, w) for w in held]
    finally:
        server.terminate()
        server.wait(timeout=30)
    right = sum(a == w[::-1] for (a, _), w in zip(answers, held, strict=True))
    ended = sum(reason == "stop" for _, reason in answers)
    print(f"training: {trained:.0f} s for {args.steps} steps; held-out words answered exactly: "
          f"{right}/{len(held)} ({100 * right / len(held):.1f}%); answers that ended at the "
          f"end-of-turn token: {ended}/{len(held)}")
    for (a, _), w in list(zip(answers, held, strict=True))[:5]:
        print(f"  reverse {w} -> {a!r}")


if __name__ == "__main__":
    main()
