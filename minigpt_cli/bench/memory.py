"""`minigpt bench --quantize int8`: the memory wall, measured.

A cached decode step reads every weight once whatever the batch, so at small batches its time
is the weight bytes divided by the memory bandwidth the step achieves. These rows time the same
cached greedy decode with the float32 weights and with their int8 rounding, and print the bytes
one step streams (the product weights; the embedding rows and norms it reads are negligible)
beside the bandwidth that implies, so the gain is visible as bytes, not only as speed.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table

from minigpt_cli.model.gpt import GPT
from minigpt_cli.model.int8 import quantize_model


@dataclass
class WallRow:
    weights: str  # "float32", "int8" or "int4"
    ms_per_step: float  # median over the generated positions and repeats
    tokens_per_s: float
    bytes_per_step: int  # weight bytes one step streams
    gb_per_s: float  # bytes_per_step / step time
    tokens_match_float32: float  # share of greedy tokens equal to the float32 run's


def memory_wall(model: GPT, prompts: torch.Tensor, n: int, repeats: int, device: torch.device,
                engine: str, kind: str = "int8") -> list[dict]:
    """Time n cached greedy steps with float32 and with `kind` (int8 or int4) weights, same
    prompts."""
    from minigpt_cli.bench.measure import measure_mode

    rounded = copy.deepcopy(model)
    report = quantize_model(rounded, kind=kind)
    rows, reference = [], None
    for name, m, nbytes in (("float32", model, report.float_bytes),
                            (kind, rounded, report.int8_bytes)):
        r = measure_mode(m, prompts, n, True, repeats, device, engine)
        step_s = statistics.median(r.ms_per_token) / 1e3
        tokens = [t for row in r.tokens for t in row]
        reference = reference or tokens
        same = sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(tokens)
        rows.append(asdict(WallRow(name, step_s * 1e3, r.tokens_per_s, nbytes,
                                   nbytes / step_s / 1e9, same)))
    return rows


def print_wall(console: Console, rows: list[dict]) -> None:
    table = Table(title="the memory wall: one cached step streams every weight once")
    for col in ("weights", "ms / step", "tok/s", "weight MB / step", "GB/s",
                "greedy = float32"):
        table.add_column(col, justify="left" if col == "weights" else "right")
    for r in rows:
        table.add_row(r["weights"], f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:,.1f}",
                      f"{r['bytes_per_step'] / 1e6:,.1f}", f"{r['gb_per_s']:.1f}",
                      f"{100 * r['tokens_match_float32']:.0f}%")
    console.print(table)
