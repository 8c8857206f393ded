"""Score a whole text with a trained model: loss, perplexity and bits per byte.

Training's validation figure samples a few windows and scores every position in them, so a
token near a window's start is predicted from almost no context. `minigpt eval` scores every
token of the text exactly once, in sliding windows: each window is the model's full context,
it advances by `stride` tokens, and only the tokens no earlier window scored are counted, so
each is predicted from at least `window - stride` tokens of context (fewer only at the start).
With stride = window the windows do not overlap and the figure is comparable to training's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from minigpt_cli.device import autocast
from minigpt_cli.model.gpt import GPT


@dataclass
class Window:
    begin: int  # the window feeds tokens[begin:end] ...
    end: int  # ... and predicts tokens[begin + 1:end + 1]
    new: int  # the last `new` of those predictions are scored here


def windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows over n tokens such that every token but the first is scored exactly once."""
    out: list[Window] = []
    scored = 0  # tokens[1:scored + 1] are scored so far
    begin = 0
    while scored < n_tokens - 1:
        end = min(begin + window, n_tokens - 1)
        out.append(Window(begin, end, end - scored))
        scored = end
        begin += stride
    return out


@dataclass
class Score:
    tokens: int  # tokens scored
    nats: float  # their summed negative log-likelihood
    bytes: int  # UTF-8 bytes the scored tokens stand for
    byte_nats: float  # nats of the tokens that stand for bytes (special tokens stand for none)
    # Mean loss by context: by_context[k] is over tokens predicted from k + 1 tokens.
    by_context: list[float] = field(default_factory=list)
    context_counts: list[int] = field(default_factory=list)  # tokens behind each by_context

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bpb(self) -> float:
        return self.byte_nats / math.log(2) / max(self.bytes, 1)


@torch.no_grad()
def score_text(model: GPT, tokens: np.ndarray, token_bytes: list[int], *, stride: int,
               batch_size: int = 8, dtype: torch.dtype = torch.float32,
               on_progress: Callable[[int], None] | None = None) -> Score:
    """Every token after the first, scored once by sliding windows of the model's context."""
    device = next(model.parameters()).device
    window = model.config.block_size
    nbytes = torch.tensor(token_bytes, dtype=torch.float64)
    nats = byte_nats = 0.0
    count = n_bytes = 0
    ctx_sum = torch.zeros(window, dtype=torch.float64)
    ctx_n = torch.zeros(window, dtype=torch.float64)
    plan = windows(len(tokens), window, stride)
    for i in range(0, len(plan), batch_size):
        group = plan[i:i + batch_size]
        # Windows of one length share a forward pass; only the last one can be shorter.
        for length in sorted({w.end - w.begin for w in group}):
            same = [w for w in group if w.end - w.begin == length]
            idx = np.array([np.arange(w.begin, w.end + 1) for w in same])
            chunk = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
            with autocast(device, dtype):
                logits, _ = model(chunk[:, :-1])
            # A row at a time: the log-softmax of a whole batch at GPT-2's vocabulary is
            # gigabytes (8 x 1,024 x 50,257 floats), one row's a few hundred megabytes.
            losses = torch.stack([F.cross_entropy(row.float(), target, reduction="none")
                                  for row, target in zip(logits, chunk[:, 1:], strict=True)]
                                 ).double().cpu()
            targets = chunk[:, 1:].cpu()
            for row, w in enumerate(same):
                keep = losses[row, length - w.new:]
                b = nbytes[targets[row, length - w.new:]]
                nats += keep.sum().item()
                byte_nats += (keep * (b > 0)).sum().item()
                n_bytes += int(b.sum().item())
                count += w.new
                ctx_sum[length - w.new:length] += keep
                ctx_n[length - w.new:length] += 1
        if on_progress:
            on_progress(len(group))
    by_ctx = (ctx_sum / ctx_n.clamp(min=1)).tolist()
    by_ctx = [v if n > 0 else float("nan") for v, n in zip(by_ctx, ctx_n.tolist(), strict=True)]
    return Score(tokens=count, nats=nats, bytes=n_bytes, byte_nats=byte_nats, by_context=by_ctx,
                 context_counts=[int(n) for n in ctx_n.tolist()])
