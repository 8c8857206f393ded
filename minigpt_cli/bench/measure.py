"""What `minigpt bench` measures: one greedy run timed, cached against uncached, the KV
cache's bytes, peak memory; the pieces the report and its satellites share."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from minigpt_cli.device import synchronize
from minigpt_cli.inference.generate import Decoder
from minigpt_cli.model.gpt import GPT


def kv_cache_bytes(n_layer: int, n_head: int, seq_len: int, head_dim: int, batch: int,
                   bytes_per_element: int) -> int:
    """2 (K and V) x layers x heads x seq_len x head_dim x bytes, per sequence in the batch."""
    return 2 * n_layer * n_head * seq_len * head_dim * bytes_per_element * batch


@dataclass
class ModeResult:
    total_s: float
    tokens_per_s: float
    ms_per_token: list[float]  # median over repeats, one value per generated position
    positions_computed: int  # token-forwards actually run (prompt included)
    tokens: list[list[int]] = field(repr=False)


@dataclass
class LengthResult:
    n: int
    cached: ModeResult
    uncached: ModeResult
    speedup: float
    forwards_cached: int  # token-forwards the work model counts: n with the cache ...
    forwards_uncached: int  # ... against n(n+1)/2 without
    work_ratio: float  # their quotient, the speedup if a step cost only its positions
    kv_bytes_allocated: int
    kv_bytes_formula: int
    tokens_match: bool
    max_logit_diff: float  # cached vs uncached logits, same inputs, every step
    ok: bool  # tokens identical and logits within tolerance


def timed_greedy(model: GPT, prompts: torch.Tensor, n: int, use_cache: bool,
                 device: torch.device, engine: str = "auto"
                 ) -> tuple[list[list[int]], list[float], int]:
    """Greedy-decode n tokens; per-step wall times (synchronised) and positions computed."""
    decoder = Decoder(model, prompts.tolist(), use_cache=use_cache, engine=engine)
    times: list[float] = []
    positions = 0
    out: list[list[int]] = [[] for _ in range(prompts.size(0))]
    for _ in range(n):
        synchronize(device)
        t = time.perf_counter()
        next_ids = decoder.logits().argmax(-1).tolist()
        synchronize(device)
        times.append(time.perf_counter() - t)
        positions += decoder.last_positions * prompts.size(0)
        for row, tok in enumerate(next_ids):
            out[row].append(tok)
        decoder.append(next_ids)
    return out, times, positions


@torch.inference_mode()
def max_logit_difference(model: GPT, prompts: torch.Tensor, n: int, engine: str = "auto"
                         ) -> float:
    """Step both decoders in lock-step on the same tokens; the largest logit disagreement."""
    cached = Decoder(model, prompts.tolist(), use_cache=True, engine=engine)
    naive = Decoder(model, prompts.tolist(), use_cache=False)
    worst = 0.0
    for _ in range(n):
        a, b = cached.logits().float(), naive.logits().float()
        worst = max(worst, (a - b).abs().max().item())
        next_ids = a.argmax(-1).tolist()
        cached.append(next_ids)
        naive.append(next_ids)
    return worst


def measure_mode(model: GPT, prompts: torch.Tensor, n: int, use_cache: bool, repeats: int,
                 device: torch.device, engine: str = "auto") -> ModeResult:
    timed_greedy(model, prompts, min(n, 8), use_cache, device, engine)  # warm-up, not counted
    runs = [timed_greedy(model, prompts, n, use_cache, device, engine) for _ in range(repeats)]
    totals = [sum(times) for _, times, _ in runs]
    median_run = runs[totals.index(statistics.median_low(totals))]
    per_pos = [statistics.median(r[1][i] for r in runs) * 1e3 for i in range(n)]
    total = statistics.median(totals)
    return ModeResult(total_s=total, tokens_per_s=prompts.size(0) * n / total,
                      ms_per_token=per_pos, positions_computed=median_run[2],
                      tokens=median_run[0])


def allocated_kv_bytes(model: GPT, prompts: torch.Tensor, engine: str = "auto") -> int:
    """Bytes of the key and value buffers a cached decoder for these prompts holds."""
    cache = Decoder(model, prompts.tolist(), use_cache=True, engine=engine).runner.cache
    assert cache is not None
    return cache.k.nbytes + cache.v.nbytes


def measure_length(model: GPT, prompts: torch.Tensor, n: int, repeats: int,
                   device: torch.device, engine: str = "auto") -> LengthResult:
    cfg = model.config
    cached = measure_mode(model, prompts, n, True, repeats, device, engine)
    uncached = measure_mode(model, prompts, n, False, repeats, device)
    elem = next(model.parameters()).element_size()
    B, P = prompts.shape
    diff = max_logit_difference(model, prompts, n, engine)
    tolerance = 1e-3 if elem == 4 else 0.1  # float reassociation only; half precision is coarser
    same = cached.tokens == uncached.tokens
    return LengthResult(
        n=n, cached=cached, uncached=uncached, speedup=uncached.total_s / cached.total_s,
        forwards_cached=n, forwards_uncached=n * (n + 1) // 2, work_ratio=(n + 1) / 2,
        # Measured on the cache a decoder really allocates: once for the whole context
        # window, not grown per token.
        kv_bytes_allocated=allocated_kv_bytes(model, prompts, engine),
        kv_bytes_formula=kv_cache_bytes(cfg.n_layer, cfg.n_head, P + n, cfg.head_dim, B, elem),
        tokens_match=same, max_logit_diff=diff, ok=same and diff <= tolerance,
    )


def peak_memory(device: torch.device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"process_peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}
    if device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def mb(b: int) -> str:
    return f"{b / 1e6:.2f}"
