"""The `eval` command: which text, which model, a progress bar, a table, JSON and a plot.

Without --data the text is the run's own validation split, tokenized exactly as training
tokenized it, so the result reads next to the training log's val bits/byte.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from minigpt_cli import tokenizer as tok
from minigpt_cli.config import config_from_dict
from minigpt_cli.device import resolve_device, resolve_dtype
from minigpt_cli.errors import UserError
from minigpt_cli.evaluation.scoring import score_text
from minigpt_cli.evaluation.scoring import windows as plan_windows
from minigpt_cli.files import check_output_paths
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.training import data as D
from minigpt_cli.training.run_state import read_metrics


def eval_tokens(meta: dict[str, Any], enc, data: str | None) -> tuple[np.ndarray, str]:
    """The token stream to score and a description of where it came from."""
    if data is None:
        if "config" not in meta:
            raise UserError("this checkpoint records no training config, so it has no "
                            "validation split: give --data SOURCE")
        cfg = config_from_dict(meta["config"])
        if cfg.data.format == "chat":
            return _chat_tokens(meta, enc, cfg), (f"validation conversations of "
                                                  f"{cfg.data.source}, rendered whole")
        corpus = D.load_corpus(cfg.data.source, cfg.data.val_fraction)
        tokens = D.encode_documents(enc, corpus.val)  # as training did; eval writes no cache
        where = f"validation split of {cfg.data.source} (val_fraction {cfg.data.val_fraction})"
    else:
        try:
            docs = D.whole_documents(data)
        except UserError as e:  # the message names the config key; here it is a flag
            raise UserError(str(e).replace("data.source", "--data", 1)) from None
        tokens = D.encode_documents(enc, docs)
        where = data
    return tokens, where


def _chat_tokens(meta: dict[str, Any], enc, cfg) -> np.ndarray:
    """A chat run's held-out conversations through its template, each after the last: the
    whole text scored, turns of every role (training's loss counted only the answers)."""
    from minigpt_cli.tokenizer import chat
    from minigpt_cli.training import chat_data

    template = chat.ChatTemplate.from_dict(meta["tokenizer"].get("chat"))
    if template is None:
        raise UserError("this chat run records no chat template: give --data SOURCE")
    convs = chat_data.read_conversations(cfg.data.source, cfg.data.val_fraction,
                                         cfg.data.bad_records == "skip")
    ids = [chat.encode(enc, chat.render(template, c)) for c in convs.val]
    return np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])


def run_eval(*, checkpoint: str | None, data: str | None, stride: int | None, batch_size: int,
             json_path: Path | None, plot_path: Path | None, device: str, dtype: str,
             console: Console, exposure: bool = False, oracle: str | None = None,
             context: int = 32, length: int = 64, samples: int = 4, windows: int = 64,
             seed: int = 0, quantize: str = "none") -> dict[str, Any]:
    """Score the text (or, with `exposure`, measure exposure bias on it), print the table,
    write JSON and the plot; returns the JSON record."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if oracle and not exposure:
        raise UserError("--oracle is for --exposure: add --exposure")
    check_output_paths(json=json_path, plot=plot_path)
    dt = resolve_dtype(dtype, resolve_device(device))
    model, enc, meta, path = load_for_inference(checkpoint, device, "float32", quantize)
    window = model.config.block_size
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise UserError(f"--stride must be in 1..{window} (the model's context), got {stride}")
    tokens, where = eval_tokens(meta, enc, data)
    if exposure:
        from minigpt_cli.evaluation.exposure_cli import run_exposure

        return run_exposure(model=model, enc=enc, meta=meta, path=path, tokens=tokens,
                            where=where, oracle=oracle, context=context, length=length,
                            samples=samples, n_windows=windows, seed=seed, json_path=json_path,
                            plot_path=plot_path, console=console)
    if len(tokens) < 2:
        raise UserError(f"{where} is too short to score: it holds {len(tokens)} token(s)")
    kind = meta["tokenizer"].get("kind", "?")
    plan = plan_windows(len(tokens), window, stride)
    progress = Progress(TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("windows"), TimeRemainingColumn(), console=console,
                        transient=True)
    with progress:
        task = progress.add_task("score", total=len(plan))
        score = score_text(model, tokens, tok.token_byte_lengths(enc), stride=stride,
                           batch_size=batch_size, dtype=dt,
                           on_progress=lambda n: progress.advance(task, n))
    record = {
        "checkpoint": str(path), "data": where, "tokenizer": kind, "tokens": score.tokens,
        "bytes": score.bytes, "window": window, "stride": stride, "windows": len(plan),
        "dtype": str(dt).removeprefix("torch."), "quantize": meta.get("quantize", "none"),
        "loss": score.loss,
        "perplexity": score.perplexity, "bits_per_byte": score.bpb,
        # JSON has no NaN: a context length no token was scored at is null.
        "loss_by_context": [None if math.isnan(v) else v for v in score.by_context],
        "context_counts": score.context_counts,
        "train_log_val_bpb": _logged_val_bpb(path, meta) if data is None else None,
    }
    _print(console, record)
    from minigpt_cli.evaluation.plot import plot_context, write_outputs

    write_outputs(record, json_path, plot_path, plot_context)
    return record


def _logged_val_bpb(path: Path, meta: dict[str, Any]) -> float | None:
    """The training log's last val bits/byte, for comparison (it samples windows)."""
    logged = [r["val_bpb"] for r in read_metrics(path.parent)
              if "val_bpb" in r and r.get("step") == meta.get("step")]
    return logged[-1] if logged else None


def _print(console: Console, r: dict[str, Any]) -> None:
    table = Table(title=f"minigpt eval · {r['checkpoint']}", show_header=False)
    rows = [("text", r["data"]), ("tokens scored", f"{r['tokens']:,} ({r['bytes']:,} bytes)"),
            ("windows", f"{r['windows']:,} of {r['window']} tokens, stride {r['stride']}"),
            ("loss", f"{r['loss']:.4f} nats/token"), ("perplexity", f"{r['perplexity']:.2f}"),
            ("bits per byte", f"{r['bits_per_byte']:.4f}")]
    if r.get("quantize", "none") != "none":
        rows.append(("weights", r["quantize"]))
    if r.get("train_log_val_bpb") is not None:
        rows.append(("training log's val bpb", f"{r['train_log_val_bpb']:.4f} (sampled "
                     "windows, every position: less context on average)"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
