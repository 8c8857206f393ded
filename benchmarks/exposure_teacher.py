"""Exposure bias where the oracle is exact, and scheduled sampling measured against it.

1. A "teacher" minigpt (byte tokenizer) is trained on the built-in corpus, then frozen.
2. It writes a synthetic corpus by sampling at temperature 1: the text's true distribution is
   then the teacher's own, so the teacher is an exact oracle for it.
3. Smaller "students" are trained on that corpus, with and without scheduled sampling, at
   equal compute: a scheduled-sampling step adds a no-grad forward and a sample at every
   position, so its runs take fewer steps, in the ratio of the two recipes' training
   throughputs measured by short probe runs first. Several seeds each.
4. `minigpt eval --exposure --oracle TEACHER` on each student's held-out split: the
   accumulated KL on data prefixes (R_D) against model prefixes (R_M), %ExAccErr with bootstrap
   intervals; and the teacher-forced val bits per byte.

    python benchmarks/exposure_teacher.py [--out runs/exposure-demo] [--seeds 3]

Everything lands in OUT (runs, corpus, summary.json); a second call reuses what exists.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from minigpt_cli import tokenizer as tok
from minigpt_cli.config import config_from_dict
from minigpt_cli.evaluation.eval_cli import run_eval
from minigpt_cli.evaluation.exposure import continue_contexts
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.training.loop import train


def _train(out: Path, data: str, model: dict, steps: int, seed: int, **train_extra) -> float:
    """Train unless done; returns the wall time (0 when reused)."""
    if (out / "model.safetensors").exists():
        return 0.0
    raw = {"out_dir": str(out), "seed": seed, "device": "cpu",
           "data": {"source": data, "val_fraction": 0.1}, "tokenizer": {"kind": "byte"},
           "model": model,
           "train": {"batch_size": 16, "max_steps": steps, "lr": 2e-3, "min_lr": 2e-4,
                     "warmup_steps": 30, "eval_interval": steps, "eval_steps": 20,
                     "save_interval": steps, "log_interval": 50, **train_extra}}
    t0 = time.perf_counter()
    train(config_from_dict(raw), console=Console(stderr=True, quiet=True))
    return time.perf_counter() - t0


def _step_rate(out: Path, data: str, model: dict, **train_extra) -> float:
    """Median training tokens/s of a 60-step probe (evaluations excluded by the log)."""
    _train(out, data, model, 60, seed=99, log_interval=10, **train_extra)
    rates = [json.loads(x)["tokens_per_s"] for x in (out / "metrics.jsonl").read_text()
             .splitlines() if '"tokens_per_s"' in x]
    return statistics.median(rates[1:])


def write_corpus(teacher: Path, path: Path, docs: int, doc_tokens: int) -> int:
    """Sample `docs` documents of `doc_tokens` bytes from the teacher at temperature 1; keep
    those that are valid UTF-8 (a byte model can emit a broken character)."""
    model, enc, _, _ = load_for_inference(str(teacher), "cpu", "float32")
    texts: list[str] = []
    for batch in range(0, docs, 64):
        n = min(64, docs - batch)
        starts = np.full((n, 1), enc.eot_token)
        rows = continue_contexts(model, starts, doc_tokens, 1.0, seed=batch)
        for row in rows.tolist():
            ids = [t for t in row if t != enc.eot_token]
            try:
                texts.append(enc.decode_bytes(ids).decode("utf-8"))
            except UnicodeDecodeError:
                continue
    path.write_text(tok.EOT.join(texts), encoding="utf-8")
    return len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/exposure-demo"))
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student-steps", type=int, default=1200)
    ap.add_argument("--docs", type=int, default=1024)
    ap.add_argument("--doc-tokens", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ss-max-prob", type=float, default=0.25)
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    teacher = out / "teacher"
    t = _train(teacher, "shakespeare", {"n_layer": 4, "n_head": 4, "n_embd": 128,
                                        "block_size": 256, "dropout": 0.0},
               args.teacher_steps, seed=1)
    print(f"teacher: {teacher} ({t:.0f} s)")
    corpus = out / "synthetic.txt"
    if not corpus.exists():
        kept = write_corpus(teacher, corpus, args.docs, args.doc_tokens)
        print(f"corpus: {kept} documents sampled from the teacher, {corpus.stat().st_size:,} "
              "bytes")

    student = {"n_layer": 3, "n_head": 3, "n_embd": 96, "block_size": 128, "dropout": 0.0}
    ss = {"max_prob": args.ss_max_prob, "schedule": "linear", "ramp_steps": 1}
    tf_rate = _step_rate(out / "probe-tf", str(corpus), student)
    ss_rate = _step_rate(out / "probe-ss", str(corpus), student, scheduled_sampling=ss)
    ss_steps = round(args.student_steps * ss_rate / tf_rate)
    ss["ramp_steps"] = max(1, ss_steps * 3 // 4)
    print(f"probe: {tf_rate:,.0f} tok/s teacher forcing, {ss_rate:,.0f} with scheduled "
          f"sampling: {args.student_steps} against {ss_steps} steps")
    rows = []
    for seed in range(1, args.seeds + 1):
        for name, steps, extra in (("teacher forcing", args.student_steps, {}),
                                   ("scheduled sampling", ss_steps,
                                    {"scheduled_sampling": ss})):
            run = out / f"student-{'ss' if extra else 'tf'}-seed{seed}"
            wall = _train(run, str(corpus), student, steps, seed, **extra)
            quiet = Console(file=io.StringIO())
            plain = run_eval(checkpoint=str(run), data=None, stride=128, batch_size=8,
                             json_path=None, plot_path=None, device="cpu", dtype="float32",
                             console=quiet)
            exp = run_eval(checkpoint=str(run), data=None, stride=None, batch_size=8,
                           json_path=out / f"{run.name}-exposure.json", plot_path=None,
                           device="cpu", dtype="float32", console=quiet, exposure=True,
                           oracle=str(teacher), context=32, length=64, samples=4,
                           windows=args.windows, seed=seed)
            cell = exp["ex_acc_err_sampled"]["64"]
            greedy = exp["ex_acc_err_greedy"]["64"]
            rows.append({"run": run.name, "recipe": name, "seed": seed, "steps": steps,
                         "train_s": round(wall, 1), "val_bpb": plain["bits_per_byte"],
                         "R_D_64": exp["R"]["data"][63], "R_M_sampled_64": exp["R"]["sampled"][63],
                         "ex_acc_err_sampled_64": cell["value"], "ci95_sampled": cell["ci95"],
                         "ex_acc_err_greedy_64": greedy["value"], "ci95_greedy": greedy["ci95"]})
            r = rows[-1]
            print(f"{name:>18} seed {seed}: val {r['val_bpb']:.4f} bpb · %ExAccErr(64) sampled "
                  f"{r['ex_acc_err_sampled_64']:+.1f} {r['ci95_sampled']} · greedy "
                  f"{r['ex_acc_err_greedy_64']:+.1f} {r['ci95_greedy']} · {wall:.0f} s")
    floor = run_eval(checkpoint=str(teacher), data=str(corpus), stride=None, batch_size=8,
                     json_path=None, plot_path=None, device="cpu", dtype="float32",
                     console=Console(file=io.StringIO()))["bits_per_byte"]
    print(f"the floor: the teacher scores its own corpus at {floor:.4f} bits per byte")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
               "teacher_on_its_corpus_bpb": floor, "steps": [args.student_steps, ss_steps]}
    for name in ("teacher forcing", "scheduled sampling"):
        sel = [r for r in rows if r["recipe"] == name]
        summary[name] = {k: (statistics.mean(r[k] for r in sel), min(r[k] for r in sel),
                             max(r[k] for r in sel))
                         for k in ("val_bpb", "ex_acc_err_sampled_64", "ex_acc_err_greedy_64",
                                   "R_D_64")}
        print(f"{name}: " + ", ".join(f"{k} mean {v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]"
                                      for k, v in summary[name].items()))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
