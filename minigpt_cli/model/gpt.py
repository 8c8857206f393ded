"""GPT-2-shaped decoder, shared by training and inference.

Training calls `model(idx, targets)`: one pass over every position under a causal mask.
Inference calls `model(idx, cache=..., start_pos=...)`: the prompt once (prefill), then one token
per step, reading earlier keys and values from a pre-allocated `KVCache` instead of recomputing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minigpt_cli.model.layers import MLP, Linear, apply_rotary, norm, rotary_tables
from minigpt_cli.model.q8 import q8_product

__all__ = ["GPT", "GPTConfig", "KVCache", "Linear", "RowsView"]


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    # Architecture options (layers.py); the defaults are GPT-2's.
    norm: str = "layernorm"  # layernorm | rmsnorm
    position: str = "learned"  # learned | rotary
    mlp: str = "gelu"  # gelu | swiglu | relu2
    qk_norm: bool = False  # RMSNorm on each head's queries and keys
    rope_theta: float = 10000.0  # rotary: the longest wavelength's base
    mlp_hidden: int = 0  # the MLP's inner width; 0: the rule in layers.mlp_hidden
    norm_eps: float = 1e-5  # every norm's epsilon (GPT-2's and most Llamas'; some use 1e-6)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_gpt2(self) -> bool:
        """GPT-2's architecture exactly (what the fused C step and a GPT-2 export take)."""
        return (self.norm, self.position, self.mlp, self.qk_norm) == (
            "layernorm", "learned", "gelu", False) and self.mlp_hidden in (0, 4 * self.n_embd)


class KVCache:
    """Static per-layer key/value buffers [layers, slots, heads, max_len, head_dim].

    Pre-allocated once so decode steps never reallocate. Each slot (batch row) holds one
    sequence: its position `p` is written at column `p`, and attention reads columns `[:p + 1]`.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.head_dim)
        # Zeroed, not left uninitialised: a step over slots of different lengths reads past a
        # short slot's end (masked to weight 0), and 0 x NaN garbage would still be NaN.
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self._views()

    def _views(self) -> None:
        # Per-layer views made once: a decode step is ~10 tiny ops per layer, so indexing
        # the 5-D buffers on every call would be a noticeable share of it.
        self._k, self._v = self.k.unbind(0), self.v.unbind(0)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write to {end}")
        keys, values = self._k[layer], self._v[layer]
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def slot(self, index: int) -> KVCache:
        """One slot as a batch-1 cache sharing this one's memory: a prompt is prefilled into
        its slot alone, exactly as it would be with no other sequence present."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, index:index + 1], self.v[:, index:index + 1]
        view.max_len = self.max_len
        view._views()
        return view

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Slot dst's first n columns become slot src's (prefix reuse: the engine's runner)."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: batch row i becomes a copy of row rows[i]."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        self._views()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class RowsView:
    """A decode step's view of a `KVCache`: row i writes its new key and value at column
    cols[i] of slot slots[i] and attends over that slot's columns [:cols[i] + 1], so sequences
    of different lengths share one forward pass with no padding (continuous batching)."""

    def __init__(self, cache: KVCache, slots: list[int], cols: list[int]) -> None:
        device = cache.k.device
        self.cache = cache
        self.slots = torch.tensor(slots, device=device)
        self.cols = torch.tensor(cols, device=device)
        self.span = max(cols) + 1
        # Slots 0..B-1 in order read the buffers through views; any other set is gathered.
        self.prefix = slots == list(range(len(slots)))
        seen = torch.arange(self.span, device=device)[None, :] <= self.cols[:, None]
        self.mask = seen[:, None, None, :]  # [B, 1, 1, span] for one query per row

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache._k[layer], self.cache._v[layer]
        keys[self.slots, :, self.cols] = k[:, :, 0]
        values[self.slots, :, self.cols] = v[:, :, 0]
        if self.prefix:
            n = self.slots.numel()
            return keys[:n, :, :self.span], values[:n, :, :self.span]
        return keys[self.slots, :, :self.span], values[self.slots, :, :self.span]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, cache: KVCache | RowsView | None, start_pos: int,
                mask: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, head_dim]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # keys are cached rotated: their positions never change
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, start_pos, k, v)
        # Without an explicit mask: causal when queries and keys are the same span (training,
        # prefill from 0); a single new token against the cache may see every key.
        is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        self.mlp = MLP(cfg.mlp, cfg.n_embd, cfg.bias, cfg.dropout, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, cache: KVCache | RowsView | None, start_pos: int,
                mask: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start_pos, mask, rope)
        return x + self.mlp(self.ln_2(x))


def attention_mask(T: int, start_pos: int, key_valid: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
    """Boolean mask [B|1, 1, T, start_pos+T]: query i sees key j iff j <= start_pos+i and j is
    not padding. Each query always sees itself, so a padding row is never all-masked (NaN)."""
    S = start_pos + T
    q_pos = torch.arange(start_pos, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = k_pos <= q_pos
    if key_valid is not None:
        allowed = allowed[None] & key_valid[:, None, :S]
        allowed = allowed | (k_pos == q_pos)[None]
        return allowed[:, None]
    return allowed[None, None]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # Learned positions: a row per position. Rotary positions have no parameters.
        self.wpe = (nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned"
                    else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = norm(cfg.norm, cfg.n_embd, cfg.bias, cfg.norm_eps)
        # The output head is tied to the token embedding, as in GPT-2 (see `head`).
        self.apply(self._init_weights)
        # GPT-2 scales residual projections by 1/sqrt(2 * n_layer) so depth doesn't blow up.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def head(self, x: torch.Tensor, head_t: torch.Tensor | None = None) -> torch.Tensor:
        """Logits through the tied embedding: x times wte [V, C] transposed, read afresh on
        every call, so no weight change can leave it behind. An inference session
        (`ModelRunner`) passes `head_t`, its own contiguous [C, V] copy from `head_copy`: the
        layout a matrix-vector product streams fastest (one GPT-2 row: 5.8 ms against 9.8 ms,
        2 threads); the weights cannot change while it runs."""
        if getattr(self, "head_int8", None) is not None:  # rounded by model/int8.py
            return q8_product(x, *self.head_int8)
        if head_t is not None:
            return x @ head_t
        return F.linear(x, self.wte.weight)

    def head_copy(self) -> torch.Tensor:
        """The tied output matrix as a contiguous [C, V] copy (154 MB for GPT-2 124M), made
        once per inference session."""
        return self.wte.weight.detach().t().contiguous()

    @torch.no_grad()
    def grow_vocab(self, n_vocab: int) -> None:
        """Give tokens added to the tokenizer (chat's role and end-of-turn tokens) embedding
        rows of their own, each the mean of the existing rows: a new token then starts out
        predicted about as likely as an average one, not as a random direction the tied head
        could score arbitrarily high."""
        old = self.wte.weight
        if n_vocab <= old.shape[0]:
            return
        rows = old.mean(dim=0, keepdim=True).expand(n_vocab - old.shape[0], -1)
        self.wte = nn.Embedding(n_vocab, old.shape[1], device=old.device, dtype=old.dtype)
        self.wte.weight.copy_(torch.cat([old, rows]))
        self.config.vocab_size = n_vocab

    def set_dropout(self, p: float) -> None:
        """Change every dropout rate in place: `bench --train` times a training step with
        dropout on even when the model was built (or trained) without it."""
        self.config.dropout = p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            if isinstance(m, CausalSelfAttention):
                m.attn_dropout = p

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | RowsView | None = None,
        start_pos: int = 0,
        pos_ids: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        last_only: bool = False,
        head_t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for `idx` [B, T] placed at positions start_pos.. (or `pos_ids` [B, T]).

        `key_valid` [B, S] marks real tokens (False = left padding) over every position so far.
        With a `RowsView` cache each row is one new token at its own slot and column.
        With `targets`, also the mean cross-entropy over all positions (-1 is ignored).
        `head_t`: see `head`.
        """
        T = idx.size(1)
        if start_pos + T > self.config.block_size:
            raise ValueError(f"positions up to {start_pos + T} exceed block_size "
                             f"{self.config.block_size}")
        if pos_ids is None:
            pos_ids = torch.arange(start_pos, start_pos + T, device=idx.device)[None]
        x = self.wte(idx)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos_ids)
        else:
            rope = rotary_tables(pos_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        x = self.drop(x)
        mask = cache.mask if isinstance(cache, RowsView) else None
        if key_valid is not None or (cache is not None and start_pos > 0 and T > 1):
            mask = attention_mask(T, start_pos, key_valid, idx.device)
        for block in self.h:
            x = block(x, cache, start_pos, mask, rope)
        x = self.ln_f(x)
        if targets is not None:
            logits = self.head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
            return logits, loss
        if last_only:
            x = x[:, -1:]
        return self.head(x, head_t), None

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Decay 2-D weights (matmuls, embeddings) only; biases and LayerNorm gains stay free."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
