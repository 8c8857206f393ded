"""minigpt serve against llama.cpp's llama-server and Hugging Face `transformers serve`, on
the same weights, under the same load, in the same run.

Every round starts each server in turn on 127.0.0.1, warms it up, and measures one stream
alone and N concurrent streams (benchmarks/serve_load.py: greedy, fixed output length, a
different prompt per request), then stops it. Rounds interleave the servers so machine
noise falls on all of them; the table reports the median and the range. By default the
prompts differ only in a number at their end, so a prefix cache (llama-server's, minigpt's)
skips most of each; `--prompt "{n} The quick brown fox jumps over the lazy dog"` puts the
number first and leaves nothing to reuse.

    python benchmarks/serve_peers.py --run RUN --hf HF_DIR --gguf MODEL.gguf \\
        --llama-server PATH [--rounds 3] [--streams 8] [--tokens 48]

RUN is a minigpt run (e.g. `minigpt import-hf` of a random-weight GPT-2 124M), HF_DIR its
`minigpt export-hf` folder, MODEL.gguf that folder converted by llama.cpp's
convert_hf_to_gguf.py (--outtype f32). docs/benchmarks.md has the exact commands.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_load import free_port, run_level  # beside this script, so on sys.path


def wait_ready(port: int, proc: subprocess.Popen, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server never became ready")


def servers(args: argparse.Namespace) -> dict[str, tuple[list[str], str, str | None]]:
    """name -> (command with {port}, readiness path, model name to send)."""
    py = sys.executable
    n = str(args.streams)
    mine = [py, "-m", "minigpt_cli", "serve", "--checkpoint", args.run, "--port", "{port}",
            "--quantize", args.quantize]
    out = {
        f"minigpt --max-batch {n}": ([*mine, "--max-batch", n], "/health", None),
        f"minigpt --max-batch {n} --prefill-first": ([*mine, "--max-batch", n,
                                                      "--prefill-first"], "/health", None),
        f"minigpt --max-batch {n} --no-prefix-cache": ([*mine, "--max-batch", n,
                                                        "--no-prefix-cache"], "/health", None),
        f"minigpt --max-batch {n} --no-join-mid-step": ([*mine, "--max-batch", n,
                                                         "--no-join-mid-step"], "/health", None),
        "minigpt --max-batch 1": ([*mine, "--max-batch", "1"], "/health", None),
    }
    if args.llama_server:
        out[f"llama-server -np {n}"] = (
            [args.llama_server, "-m", args.gguf, "-t", str(args.threads), "-tb",
             str(args.threads), "-np", n, "-c", str(int(n) * 1024), "--host", "127.0.0.1",
             "--port", "{port}", "--no-webui"], "/health", None)
    if args.hf:
        for cb in ("--no-continuous-batching", "--continuous-batching"):
            out[f"transformers serve {cb}"] = (
                [str(Path(py).with_name("transformers")), "serve", args.hf, cb, "--port",
                 "{port}"], "/health", args.hf)
    return out


def measure(name: str, cmd: list[str], ready: str, model: str | None, env: dict,
            args: argparse.Namespace, prompt: str) -> tuple[dict, dict]:
    """Start one server, measure one stream alone and args.streams at once, stop it."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([c.replace("{port}", str(port)) for c in cmd], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                wait_ready(port, proc, ready)
            except RuntimeError:
                log.seek(0)
                sys.exit(f"{name}: {log.read().decode(errors='replace')[-2000:]}")
            run_level(port, 1, 2, 8, prompt, model)  # warm-up
            alone = run_level(port, 1, args.requests_per_client, args.tokens, prompt, model)
            loaded = run_level(port, args.streams, args.streams * args.requests_per_client,
                               args.tokens, prompt, model)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return alone, loaded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--hf", default=None)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated server names to run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quantize", default="none",
                    help="minigpt's --quantize (int8 beside a Q8_0 GGUF for llama-server)")
    ap.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog",
                    help='request n sends this with n after it, or in place of "{n}"')
    args = ap.parse_args()
    table = servers(args)
    if args.only:
        keep = args.only.split(",")
        # An exact name picks that row alone; otherwise a name's beginning picks every row
        # it begins ("minigpt --max-batch 8" alone, not its --prefill-first variant too).
        table = {k: v for k, v in table.items()
                 if any(k == x or (x not in table and k.startswith(x)) for x in keep)}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, list[dict]] = {name: [] for name in table}
    prompt = args.prompt
    for r in range(args.rounds):
        for name, (cmd, ready, model) in table.items():
            alone, loaded = measure(name, cmd, ready, model, env, args, prompt)
            results[name].append({"alone": alone, "loaded": loaded})
            print(f"round {r + 1} {name:38s} alone {alone['output_tok_per_s']:6.1f} tok/s  "
                  f"{args.streams} streams {loaded['output_tok_per_s']:6.1f} tok/s  "
                  f"TTFT p50 {loaded['ttft_p50_ms']:6.1f} ms  tokens "
                  f"{loaded['mean_tokens']:.1f}  failed {loaded['failed']}", flush=True)

    def med(name: str, key: str, level: str = "loaded") -> tuple[float, float, float]:
        v = [x[level][key] for x in results[name]]
        return statistics.median(v), min(v), max(v)

    print(f"\nmedian [min–max] over {args.rounds} rounds, {args.tokens} tokens per request")
    print(f"{'server':38s} {'1 stream':>18} {f'{args.streams} streams':>20} {'× alone':>6} "
          f"{'TTFT p50 ms':>18} {'ITL p50 ms':>10}")
    for name in table:
        a, l_, t = med(name, "output_tok_per_s", "alone"), med(name, "output_tok_per_s"), \
            med(name, "ttft_p50_ms")
        itl = med(name, "itl_p50_ms")
        print(f"{name:38s} {a[0]:6.1f} [{a[1]:5.1f}–{a[2]:5.1f}] {l_[0]:7.1f} "
              f"[{l_[1]:5.1f}–{l_[2]:5.1f}] {l_[0] / a[0]:5.2f}× {t[0]:6.1f} "
              f"[{t[1]:5.1f}–{t[2]:5.1f}] {itl[0]:10.2f}")
    ours = f"minigpt --max-batch {args.streams}"
    for name in table:
        if name != ours:
            ratios = [o["loaded"]["output_tok_per_s"] / p["loaded"]["output_tok_per_s"]
                      for o, p in zip(results[ours], results[name], strict=True)]
            print(f"minigpt ÷ {name}: {statistics.median(ratios):.2f}× "
                  f"[{min(ratios):.2f}–{max(ratios):.2f}] at {args.streams} streams, per round")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
