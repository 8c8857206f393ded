"""`minigpt bench --prompt-lookup N | --draft RUN`: speculative decoding against plain decoding.

A cached decode step streams every weight once whatever rows it computes, so a step that
verifies k draft tokens costs about what a one-token step does, and each token it keeps saves
a whole step. These rows time the same greedy generation plain and speculative, and show that
as bytes: weight bytes streamed per generated token (the model's per step it runs, plus the
draft's per draft step), and the GB/s that implies. Greedy output must equal plain decoding's.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import tiktoken
import torch
from rich.console import Console
from rich.table import Table

from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model.gpt import GPT


@dataclass
class SpecRow:
    mode: str  # plain | prompt lookup N | draft NAME
    tokens_per_s: float  # median over repeats of generated tokens / wall time
    steps_per_token: float  # the model's forward calls per generated token
    acceptance: float | None  # drafts kept / drafts verified
    tokens_per_verify: float | None  # tokens a step gives when it verified drafts
    draft_steps_per_token: float  # the draft model's forward calls per generated token
    weight_bytes_per_token: float  # weights streamed per generated token, draft's included
    gb_per_s: float  # weight_bytes_per_token x tokens_per_s
    same_as_plain: bool  # greedy tokens identical to plain decoding


def weight_bytes(model: GPT) -> int:
    """Bytes one cached step streams: every matrix once, the tied head included; of the
    embeddings only a row each is read (negligible)."""
    embeddings = {id(model.wte.weight)} | ({id(model.wpe.weight)} if model.wpe is not None
                                           else set())
    matrices = sum(p.numel() * p.element_size() for p in model.parameters()
                   if p.dim() == 2 and id(p) not in embeddings)
    return matrices + model.wte.weight.numel() * model.wte.weight.element_size()


def speculative_rows(model: GPT, enc: tiktoken.Encoding, prompts: torch.Tensor, n: int,
                     repeats: int, engine: str, lookup: int, draft: GPT | None,
                     draft_name: str, k: int) -> list[dict]:
    """Greedy generation of n tokens per prompt, plain and speculative, `repeats` times each,
    interleaved so drift on a shared machine hits both alike."""
    greedy = SamplerSettings(temperature=0.0)
    rows = prompts.tolist()
    modes: list[tuple[str, dict]] = [("plain", {})]
    if lookup:
        modes.append((f"prompt lookup {lookup}", {"prompt_lookup": lookup}))
    if draft is not None:
        modes.append((f"draft {draft_name}", {"draft": draft}))
    for _, extra in modes:  # warm-up, not counted
        generate(model, enc, rows, greedy, min(n, 8), engine=engine, draft_k=k, **extra)
    runs: dict[str, list] = {name: [] for name, _ in modes}
    for _ in range(repeats):
        for name, extra in modes:
            runs[name].append(generate(model, enc, rows, greedy, n, engine=engine, draft_k=k,
                                       **extra))
    target_bytes = weight_bytes(model)
    draft_bytes = weight_bytes(draft) if draft is not None else 0
    plain_tokens = [c.tokens for c in runs["plain"][0][0]]
    out = []
    for name, _ in modes:
        completions, timings = runs[name][0]
        tokens = sum(len(c.tokens) for c in completions)
        speed = statistics.median(
            sum(len(c.tokens) for c in cs) / t.total_s for cs, t in runs[name])
        per_token = (target_bytes * timings.steps + draft_bytes * timings.draft_steps) / tokens
        out.append(asdict(SpecRow(
            mode=name, tokens_per_s=speed, steps_per_token=timings.steps / tokens,
            acceptance=timings.acceptance, tokens_per_verify=timings.tokens_per_verify_step,
            draft_steps_per_token=timings.draft_steps / tokens,
            weight_bytes_per_token=per_token, gb_per_s=per_token * speed / 1e9,
            same_as_plain=[c.tokens for c in completions] == plain_tokens)))
    return out


def print_speculative(console: Console, rows: list[dict]) -> None:
    table = Table(title="speculative decoding against plain (greedy, random-token prompts)")
    for col in ("mode", "tok/s", "steps\n/tok", "kept", "tok /\nverify", "draft\nsteps/tok",
                "weight\nMB/tok", "GB/s", "same"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(
            r["mode"], f"{r['tokens_per_s']:,.1f}", f"{r['steps_per_token']:.2f}",
            "" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%",
            "" if r["tokens_per_verify"] is None else f"{r['tokens_per_verify']:.2f}",
            f"{r['draft_steps_per_token']:.2f}", f"{r['weight_bytes_per_token'] / 1e6:,.1f}",
            f"{r['gb_per_s']:.1f}", "[green]✓[/]" if r["same_as_plain"] else "[red]✗[/]")
    console.print(table)
    console.print("[dim]a verify step streams the weights once for all its rows: each kept "
                  "draft saves a step's bytes, each draft step adds the draft's[/]")
