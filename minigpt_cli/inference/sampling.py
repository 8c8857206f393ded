"""Pure functions on logits: how the next token is chosen. No model needed to test them.

Order of processors (each sees the previous one's output):
  1. repetition penalty over the last `repeat_last_n` tokens
  2. temperature (0 means greedy: argmax, no division)
  3. top-k   4. top-p (nucleus)   5. min-p
  6. sample from the softmax (or argmax when temperature is 0)

No finite setting breaks them. `SamplerSettings.validate` is the one place that decides what
is allowed (every number finite, each in its range) and names the field it refuses. Within
those ranges every processor keeps each row's most likely token and never makes a NaN or a
+inf: the penalty's result is clamped to float32's range, the temperature divides the
distance from the row's top logit in float64 (so 5e-324 is a temperature like any other: the
top logit stays at 0, the rest go to -inf), and top-p keeps the top token even when p rounds
to 0 in float32. So any row with one finite logit gives a token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minigpt_cli.errors import UserError

FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplerSettings:
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages repeats
    repeat_last_n: int = 64

    def validate(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise UserError(f"--{name.replace('_', '-')} must be a finite number, "
                                f"got {value}")
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise UserError(f"--min-p must be in [0, 1) (0 turns it off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise UserError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if self.repeat_last_n < 0:
            raise UserError(f"--repeat-last-n must be >= 0, got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float
                             ) -> torch.Tensor:
    """CTRL-style: a seen token's logit is divided by `penalty` if positive, multiplied if not.

    `history` [B, L] holds recent token ids, -1 for none.
    """
    if penalty == 1.0 or history.numel() == 0:
        return logits
    vocab = logits.size(-1)
    # Empty slots (-1) go to a spare column, so they can never unmark a real token.
    seen = torch.zeros(logits.size(0), vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, torch.where(history >= 0, history, vocab), True)
    seen = seen[:, :vocab]
    wide = logits.double()  # a penalty of 5e-324 is 0 in float32, and x / 0 is inf
    penalised = torch.where(wide > 0, wide / penalty, wide * penalty)
    penalised = penalised.clamp(-FLOAT32_MAX, FLOAT32_MAX).to(logits.dtype)
    return torch.where(seen & logits.isfinite(), penalised, logits)  # a -inf stays masked


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by T: <1 sharpens, >1 flattens. T=0 leaves logits alone (greedy takes argmax).
    What is divided is each logit's distance below its row's top, in float64: the same
    distribution as logits / T, but the top stays at 0 and nothing overflows to +inf, however
    small T is."""
    if temperature in (0.0, 1.0):
        return logits
    top = logits.max(dim=-1, keepdim=True).values
    return ((logits - top).double() / temperature).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits per row; k=0 or k >= vocab keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p  # the token that crosses p is kept; the top token always is
    drop_sorted[..., 0] = False  # (also when p is below float32's smallest number, so 0 here)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def recent(context: list[int], s: SamplerSettings, device: torch.device, ahead: int = 0
           ) -> torch.Tensor | None:
    """The repetition penalty's history [1, repeat_last_n]: the context's last tokens but the
    `ahead` at its very end (drafts not yet checked); None when the penalty is off."""
    if s.repetition_penalty == 1 or s.repeat_last_n <= 0:
        return None
    end = len(context) - ahead
    return torch.tensor([context[max(0, end - s.repeat_last_n):end]], device=device)


def process(logits: torch.Tensor, s: SamplerSettings, history: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Every filter in the documented order; returns logits with dropped tokens at -inf."""
    logits = logits.float()
    if history is not None:
        logits = apply_repetition_penalty(logits, history, s.repetition_penalty)
    if s.greedy:
        return logits
    logits = apply_temperature(logits, s.temperature)
    logits = top_k_filter(logits, s.top_k)
    logits = top_p_filter(logits, s.top_p)
    return min_p_filter(logits, s.min_p)


def choose(processed: torch.Tensor, s: SamplerSettings, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Next token ids [B] from processed logits: argmax when greedy, else a draw."""
    if s.greedy:
        return processed.argmax(dim=-1)
    probs = torch.softmax(processed, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int,
                       generator: torch.Generator | None = None) -> int:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): `token` was drawn from
    the draft's distribution q; keep it with probability min(1, p[token] / q[token]), else
    draw from the normalised positive part of p - q. Whatever q is, the token returned is
    distributed exactly as p, the target's distribution: so a draft model changes speed, never
    what is sampled. p and q are probability vectors [V] after the same sampler filters."""
    u = torch.rand((), generator=generator, device=p.device)
    if float(u) * float(q[token]) < float(p[token]):  # u < p/q, with q[token] > 0
        return token
    residual = (p - q).clamp(min=0)
    if not float(residual.sum()) > 0:  # p == q up to rounding: nothing to correct
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator))
