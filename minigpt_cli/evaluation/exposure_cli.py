"""`minigpt eval --exposure`: continuations, per-step errors, the table, JSON and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.evaluation import exposure as X
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.model.gpt import GPT

KINDS = ("data", "greedy", "sampled")


def _load_oracle(oracle: str, model: GPT, enc, meta: dict[str, Any]) -> GPT:
    device = next(model.parameters()).device.type  # beside the model: one input, both
    o_model, o_enc, o_meta, _ = load_for_inference(oracle, device, "float32")
    kind, o_kind = meta["tokenizer"].get("kind", ""), o_meta["tokenizer"].get("kind", "")
    if tok.fingerprint(enc, kind) != tok.fingerprint(o_enc, o_kind):
        raise UserError(f"--oracle {oracle} has another tokenizer ({o_kind}, {o_enc.n_vocab} "
                        f"tokens) than the model ({kind}, {enc.n_vocab}): KL needs one vocabulary")
    return o_model


def run_exposure(*, model: GPT, enc, meta: dict[str, Any], path: Path, tokens: np.ndarray,
                 where: str, oracle: str | None, context: int, length: int, samples: int,
                 n_windows: int, seed: int, json_path: Path | None, plot_path: Path | None,
                 console: Console) -> dict[str, Any]:
    span = context + length
    if context < 1 or length < 2:
        raise UserError(f"--context must be at least 1 and --length at least 2, got {context} "
                        f"and {length}")
    if samples < 1 or n_windows < 2:
        raise UserError(f"--samples must be at least 1 and --windows at least 2, got "
                        f"{samples} and {n_windows}")
    o_model = _load_oracle(oracle, model, enc, meta) if oracle else None
    limit = min([model.config.block_size] + ([o_model.config.block_size] if o_model else []))
    if span > limit:
        raise UserError(f"--context {context} + --length {length} = {span} tokens, more than "
                        f"the context window ({limit}): lower one of them")
    starts = X.window_starts(len(tokens), span, n_windows)
    if len(tokens) < span or len(starts) < 2:
        raise UserError(f"{where} is too short: {len(tokens)} tokens, and two windows of "
                        f"{span} (--context + --length) are needed")
    idx = np.array(starts)[:, None]
    ctx = tokens[idx + np.arange(context)]
    conts = {"data": [tokens[idx + context + np.arange(length)]],
             "greedy": [X.continue_contexts(model, ctx, length, 0.0, seed)],
             "sampled": [X.continue_contexts(model, ctx, length, 1.0, seed + 1 + k)
                         for k in range(samples)]}
    entropy: dict[str, np.ndarray] = {}
    error: dict[str, np.ndarray] = {}
    for kind, rows in conts.items():
        stats = [X.step_errors(model, o_model, ctx, c) for c in rows]
        entropy[kind] = np.mean([s[0] for s in stats], axis=0)  # mean over samples: [N, L]
        if o_model is not None:
            error[kind] = np.mean([s[1] for s in stats], axis=0)
    levels = X.table_levels(length)
    record: dict[str, Any] = {
        "checkpoint": str(path), "oracle": oracle, "data": where, "context": context,
        "length": length, "samples": samples, "windows": len(starts), "seed": seed,
        "levels": levels,
        "entropy_by_position": {k: v.mean(axis=0).tolist() for k, v in entropy.items()},
        "repetition": {k: {str(lv): {"seq_rep_4": X.seq_rep(np.concatenate(conts[k]), 4, lv),
                                     "distinct_2": X.distinct(np.concatenate(conts[k]), 2, lv)}
                           for lv in levels} for k in KINDS},
    }
    if o_model is not None:
        r = {k: X.accumulated(v) for k, v in error.items()}
        record["R"] = {k: v.tolist() for k, v in r.items()}
        for kind in ("greedy", "sampled"):
            ci = X.bootstrap_ex_acc_err(error[kind], error["data"], levels, seed=seed)
            record[f"ex_acc_err_{kind}"] = {
                str(lv): {"value": X.ex_acc_err(r[kind], r["data"])[lv - 1],
                          "ci95": ci[lv]} for lv in levels}
    _print(console, record)
    from minigpt_cli.evaluation.plot import plot_exposure, write_outputs

    write_outputs(record, json_path, plot_path, plot_exposure)
    return record


def _pct(cell: dict[str, Any]) -> str:
    if cell["value"] is None:
        return "undefined (R_D = 0: the model is the oracle)"
    lo_hi = cell["ci95"]
    return f"{cell['value']:+.1f}%" + (f" [{lo_hi[0]:+.1f}, {lo_hi[1]:+.1f}]" if lo_hi else "")


def _print(console: Console, r: dict[str, Any]) -> None:
    head = (f"{r['windows']} held-out windows of {r['data']}: {r['context']} tokens of context, "
            f"then {r['length']} continued by the data, by the model (greedy), and by the model "
            f"sampling at temperature 1 ({r['samples']} each)")
    console.print(head)
    if "R" in r:
        t = Table(title=f"accumulated error against the oracle {r['oracle']}")
        for col in ("l", "R_D (data prefixes)", "R_M greedy", "R_M sampled",
                    "%ExAccErr greedy [95% CI]", "%ExAccErr sampled [95% CI]"):
            t.add_column(col, justify="right")
        for lv in r["levels"]:
            t.add_row(str(lv), f"{r['R']['data'][lv - 1]:.3f}", f"{r['R']['greedy'][lv - 1]:.3f}",
                      f"{r['R']['sampled'][lv - 1]:.3f}", _pct(r["ex_acc_err_greedy"][str(lv)]),
                      _pct(r["ex_acc_err_sampled"][str(lv)]))
        console.print(t)
    else:
        console.print("[yellow]no --oracle:[/] %ExAccErr compares the model with the true "
                      "distribution of the text, which only a stronger model of it (an oracle) "
                      "can stand in for; without one it cannot be identified. What can be "
                      "measured without one:")
    names = {"data": "held-out text", "greedy": "greedy", "sampled": "sampled T=1"}
    t = Table(title="next-token entropy (nats) at position l, by whose prefix")
    t.add_column("l", justify="right")
    for k in KINDS:
        t.add_column(names[k], justify="right")
    for lv in r["levels"]:
        t.add_row(str(lv), *(f"{r['entropy_by_position'][k][lv - 1]:.2f}" for k in KINDS))
    console.print(t)
    t = Table(title="repetition over the first l tokens: seq-rep-4 (0 = none) / distinct-2")
    t.add_column("l", justify="right")
    for k in KINDS:
        t.add_column(names[k], justify="right")
    for lv in r["levels"]:
        t.add_row(str(lv), *(f"{r['repetition'][k][str(lv)]['seq_rep_4']:.3f} / "
                             f"{r['repetition'][k][str(lv)]['distinct_2']:.3f}" for k in KINDS))
    console.print(t)
