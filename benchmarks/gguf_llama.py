"""minigpt's GGUF files run by llama.cpp itself: same token ids, same greedy tokens, and the
file sizes llama.cpp's own converter gives.

For each run: `minigpt export-gguf` at f32, q8_0 and q4_0; llama-server loads each file
(2 threads, 127.0.0.1) and
- tokenizes a set of texts (`/tokenize`), which must equal minigpt's ids;
- continues each text greedily (`/completion`, temperature 0, the prompt given as ids), which
  is compared token for token with minigpt's float32 greedy continuation (no cache, plain
  forward passes). For q8_0 and q4_0 the count of leading tokens that agree is set beside
  minigpt's own int8 run's count against float32: the agreement a rounding of that size has.
With `--convert`, llama.cpp's convert_hf_to_gguf.py also converts the run's export-hf folder
to q8_0, and the two files' sizes are printed side by side.

    python benchmarks/gguf_llama.py --llama-cpp DIR [--run RUN ...] [--gpt2-124m]
        [--tokens 32] [--convert]

DIR is llama.cpp's source tree with build/bin/llama-server (docs/benchmarks.md shows how to
build it from the llama-cpp-python sdist). `--gpt2-124m` adds a random-weight GPT-2 124M
(transformers makes it, import-hf brings it in), the shape the issue's goals name.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from minigpt_cli import tokenizer as tok
from minigpt_cli.convert.gguf_export import export_gguf
from minigpt_cli.inference.loading import load_for_inference

TEXTS = ["ROMEO: What light through yonder window breaks?",
         "The quick brown fox jumps over the lazy dog 1234567 times;\n\n  indented   spaces.",
         "First Citizen:\nBefore we proceed any further, hear me speak.",
         "don't, can't, WON'T; it's 3.14159 — naïve café résumé!"]


def _post(port: int, route: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{route}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def _serve(server: Path, gguf: Path, port: int, ctx: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(server), "-m", str(gguf), "-t", "2", "-c", str(ctx), "-np", "1",
                             "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("llama-server did not come up in 300 s")


def _greedy(model: torch.nn.Module, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([out[-model.config.block_size:]]))
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids):]


def _agree(a: list[int], b: list[int]) -> int:
    """Leading tokens two continuations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _gpt2_124m(root: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from minigpt_cli.convert.hf import import_hf

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(root / "hf124")
    import_hf(root / "hf124", root / "gpt2-124m")
    return root / "gpt2-124m"


def _converter_size(llama_cpp: Path, run: Path, root: Path) -> int | None:
    from minigpt_cli.convert.hf import export_hf

    folder = export_hf(run, root / f"{run.name}-hf")
    out = root / f"{run.name}-convert-q8_0.gguf"
    env = {**os.environ, "PYTHONPATH": str(llama_cpp / "gguf-py")}
    done = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder),
                           "--outtype", "q8_0", "--outfile", str(out)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        print(f"  convert_hf_to_gguf.py refused: {done.stderr.strip().splitlines()[-1]}")
        return None
    return out.stat().st_size


def check_run(run: Path, args: argparse.Namespace, root: Path) -> dict:
    model, enc, _, _ = load_for_inference(str(run), "cpu", "float32")
    int8 = load_for_inference(str(run), "cpu", "float32", quantize="int8")[0]
    prompts = [tok.encode(enc, t)[: model.config.block_size // 2] for t in TEXTS]
    ref = [_greedy(model, p, args.tokens) for p in prompts]
    ours_int8 = [_agree(_greedy(int8, p, args.tokens), r) for p, r in zip(prompts, ref,
                                                                          strict=True)]
    result = {"run": str(run), "minigpt_int8_agree": ours_int8, "files": {}}
    print(f"{run}: minigpt int8 vs float32, leading tokens that agree: {ours_int8}")
    for kind in ("f32", "q8_0", "q4_0"):
        path = export_gguf(run, root / f"{run.name}-{kind}.gguf", kind)
        proc = _serve(args.llama_cpp / "build/bin/llama-server", path, args.port,
                      model.config.block_size)
        try:
            ids = [_post(args.port, "/tokenize", {"content": t, "parse_special": False})["tokens"]
                   for t in TEXTS]
            got = [_post(args.port, "/completion", {
                "prompt": p, "n_predict": args.tokens, "temperature": 0, "cache_prompt": False,
                "return_tokens": True, "ignore_eos": True})["tokens"] for p in prompts]
        finally:
            proc.terminate()
            proc.wait()
        same_ids = all(a[: len(b)] == b for a, b in zip(ids, prompts, strict=True))
        agree = [_agree(g, r) for g, r in zip(got, ref, strict=True)]
        result["files"][kind] = {"bytes": path.stat().st_size, "same_token_ids": same_ids,
                                 "agree": agree}
        print(f"  {kind:5s} {path.stat().st_size / 1e6:8.1f} MB  tokenizer ids equal: "
              f"{same_ids}  leading greedy tokens equal to minigpt float32: {agree} "
              f"of {args.tokens}")
    if args.convert:
        size = _converter_size(args.llama_cpp, run, root)
        if size:
            ours = result["files"]["q8_0"]["bytes"]
            result["convert_q8_0_bytes"] = size
            print(f"  q8_0: minigpt {ours / 1e6:.2f} MB, convert_hf_to_gguf.py "
                  f"{size / 1e6:.2f} MB ({ours / size - 1:+.2%})")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree, built")
    ap.add_argument("--run", action="append", type=Path, default=[])
    ap.add_argument("--gpt2-124m", action="store_true")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--convert", action="store_true")
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = [*args.run, *([_gpt2_124m(root)] if args.gpt2_124m else [])]
        results = [check_run(run, args, root) for run in runs]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
