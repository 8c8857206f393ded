"""The model's building blocks, with the architecture options a config can switch on.

GPT-2's own parts are the defaults: learned positions, LayerNorm, a GELU MLP. The options are
what current small-model recipes use instead (the Llama family and the nanoGPT speedruns):
rotary positions (`position: rotary`), RMSNorm (`norm: rmsnorm`), a SwiGLU or ReLU² MLP (`mlp`),
and RMSNorm on each head's queries and keys (`qk_norm`). Rotary + RMSNorm + SwiGLU without
biases is the Llama architecture, which `export-hf` writes as a `LlamaForCausalLM` folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.model.q8 import q8_product

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
MLPS = ("gelu", "swiglu", "relu2")


class Linear(nn.Module):
    """y = x @ W + b with W stored [in, out], GPT-2's own `Conv1D` layout.

    Decoding multiplies each weight by a single vector, so it is bound by memory bandwidth; on
    the CPU we measured, this layout streams 1.5-3x faster than nn.Linear's [out, in]
    (benchmarks/decode_bandwidth.py, docs/benchmarks.md). It also makes GPT-2 checkpoints load
    without transposes.
    """

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "int8", None) is not None:  # rounded by model/int8.py
            return q8_product(x, *self.int8, self.bias)
        flat = x.reshape(-1, x.size(-1))
        y = (torch.addmm(self.bias, flat, self.weight) if self.bias is not None
             else flat @ self.weight)
        return y.view(*x.shape[:-1], y.size(-1))


def norm(kind: str, width: int, bias: bool, eps: float = 1e-5) -> nn.Module:
    """LayerNorm (GPT-2) or RMSNorm (no centring, no bias: cheaper, what Llama uses)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(width, eps=eps)
    return nn.LayerNorm(width, eps=eps, bias=bias)


def mlp_hidden(kind: str, width: int, hidden: int = 0) -> int:
    """`hidden` when set (an imported model's own), else GPT-2's 4x width; SwiGLU's three
    matrices get 8/3x (rounded up to a multiple of 32), so the parameter count stays about
    the same."""
    if hidden:
        return hidden
    if kind == "swiglu":
        return -(-8 * width // 3 // 32) * 32
    return 4 * width


class MLP(nn.Module):
    """Two matrices around a non-linearity: GELU (tanh form, as GPT-2 was trained: imported
    weights stay exact), ReLU², or SwiGLU (c_fc makes the gate and the up projection at once:
    one matrix product, split after)."""

    def __init__(self, kind: str, width: int, bias: bool, dropout: float, hidden: int = 0
                 ) -> None:
        super().__init__()
        self.kind = kind
        hidden = mlp_hidden(kind, width, hidden)
        self.c_fc = Linear(width, 2 * hidden if kind == "swiglu" else hidden, bias=bias)
        self.c_proj = Linear(hidden, width, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B|1, 1, T, head_dim] for positions [B|1, T], computed in float32 (a
    low-precision frequency table drifts at long positions) and cast for the product."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device,
                                       dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (i, i + head_dim/2) of x [B, H, T, head_dim] by its position's angle
    (the "rotate half" layout Hugging Face's Llama uses, so exported weights need no
    permutation). Queries and keys rotated this way score by relative position only."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
