"""minigpt generate against Hugging Face transformers' generate, same weights, one process.

Both models hold the same random weights (ours exported with `minigpt export-hf`, loaded by
`GPT2LMHeadModel.from_pretrained`), decode greedily at batch 1 with a KV cache on the same
threads, and must produce identical tokens. minigpt runs twice: with its default engine (the
fused C decode step) and with `engine="torch"` (the model's PyTorch forward), so the table
shows what each part buys. Printed: tokens/s of each and the ratios to HF.

    TIKTOKEN_CACHE_DIR=DIR python benchmarks/hf_peer.py [--new-tokens 200]   # DIR: tiktoken's files

Needs the dev extra (transformers). Shapes: configs/tiny.yaml's model (4 layers, 4 heads, width
128, context 256, its 2,048-token BPE vocabulary) and GPT-2 124M (12, 12, 768, context 1024,
GPT-2's 50,257 tokens). Random weights: speed and equality do not depend on what was learned.
The tiny shape's tokenizer is a fixed synthetic BPE table of the same size (256 bytes plus
two-byte merges), so no training run is needed first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import tiktoken
import torch
from transformers import GPT2LMHeadModel

from minigpt_cli import tokenizer as tok
from minigpt_cli.convert.hf import export_hf
from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPT, GPTConfig

SHAPES = {"tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
          "gpt2-124M": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)}


def synthetic_bpe(n_vocab: int) -> tiktoken.Encoding:
    """A valid BPE table of n_vocab tokens: the 256 bytes, then two-byte printable merges."""
    ranks = {bytes([i]): i for i in range(256)}
    printable = [bytes([c]) for c in range(32, 127)]
    for a, b in itertools.product(printable, printable):
        if len(ranks) == n_vocab - 1:  # the last id is <|endoftext|>
            break
        ranks[a + b] = len(ranks)
    return tiktoken.Encoding("synthetic", pat_str=tok.SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={tok.EOT: len(ranks)})


def compare(shape: str, new_tokens: int, repeats: int, workdir: Path) -> dict:
    enc = tok.build("gpt2") if shape == "gpt2-124M" else synthetic_bpe(2048)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=enc.n_vocab, dropout=0.0, **SHAPES[shape])
    ours = GPT(cfg).eval()
    run = workdir / shape
    store.save_model(run / store.MODEL_FILE, ours, {"model_config": vars(cfg),
                                                  "tokenizer": {"kind": "synthetic"}})
    export_hf(run, workdir / f"{shape}-hf")
    hf = GPT2LMHeadModel.from_pretrained(workdir / f"{shape}-hf").eval()
    prompt = tok.encode(enc, "ROMEO: But soft, what light through yonder window breaks?")
    greedy = SamplerSettings(temperature=0.0)

    def run_ours(engine: str) -> tuple[list[int], float]:
        t = time.perf_counter()
        out, timings = generate(ours, enc, [prompt], greedy, new_tokens, engine=engine)
        assert timings.engine == engine
        return out[0].tokens, time.perf_counter() - t

    def run_hf() -> tuple[list[int], float]:
        ids = torch.tensor([prompt])
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                              pad_token_id=enc.eot_token)
        return out[0, len(prompt):].tolist(), time.perf_counter() - t

    contestants = {"native": lambda: run_ours("native"), "torch": lambda: run_ours("torch"),
                   "hf": run_hf}
    runs: dict[str, list[tuple[list[int], float]]] = {k: [] for k in contestants}
    for fn in contestants.values():
        fn()  # warm-up
    for _ in range(repeats):  # interleaved, so a noisy neighbour slows all three alike
        for name, fn in contestants.items():
            runs[name].append(fn())
    tps = {k: len(v[0][0]) / statistics.median(t for _, t in v) for k, v in runs.items()}
    hf_tokens = runs["hf"][0][0]
    n = min(len(v[0][0]) for v in runs.values())  # all stop at <|endoftext|> if it wins
    return {"shape": shape, "params": ours.num_params(non_embedding=False), "new_tokens": n,
            "minigpt_tok_s": tps["native"], "minigpt_torch_engine_tok_s": tps["torch"],
            "hf_tok_s": tps["hf"], "ratio": tps["native"] / tps["hf"],
            "torch_engine_ratio": tps["torch"] / tps["hf"],
            "tokens_identical": all(v[0][0][:n] == hf_tokens[:n] for v in runs.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default="tiny,gpt2-124M")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, greedy, batch 1, {args.new_tokens} new tokens")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            r = compare(shape, args.new_tokens, args.repeats, Path(tmp))
            rows.append(r)
            print(f"{r['shape']:>10} ({r['params'] / 1e6:6.1f}M): minigpt {r['minigpt_tok_s']:8.1f}"
                  f" tok/s ({r['ratio']:5.2f}× HF) · minigpt --engine torch "
                  f"{r['minigpt_torch_engine_tok_s']:8.1f} tok/s ({r['torch_engine_ratio']:5.2f}×)"
                  f" · HF {r['hf_tok_s']:7.1f} tok/s · same tokens: "
                  f"{'yes' if r['tokens_identical'] else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not all(r["tokens_identical"] for r in rows):
        raise SystemExit("greedy tokens differ between minigpt and transformers")


if __name__ == "__main__":
    main()
