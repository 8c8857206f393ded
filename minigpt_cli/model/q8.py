"""The int8 product, llama.cpp's Q8_0 arithmetic, as the reference every engine computes.

An int8 (or int4) matrix is integers in groups of GROUP input rows with one scale (a float16
value) per group and output column (model/int8.py makes them). Its product's input rows are
rounded the same way just before it, per row and group (scale max |x| / 127), so each
group's part of the product is a sum of integer products, exact, times the two scales; the
groups' parts are added in ascending order, as the C step adds them. Layers call
`q8_product` where a matrix has been rounded (layers.Linear, GPT.head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP = 32


def quantize_rows(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, n_in] -> (integer values as float32 [N, groups, group], scales [N, groups]), each
    row's groups of `group` values rounded as the weights are (scale max |x| / 127; the last
    group padded with zeros). Values are float32 holding integers, for exact products."""
    n, n_in = x.shape
    blocks = F.pad(x.float(), (0, (-n_in) % group)).view(n, -1, group)
    scales = blocks.abs().amax(dim=2) / 127.0
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    return torch.round(blocks * inverse[:, :, None]), scales


def q8_product(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
               bias: torch.Tensor | None = None, group: int = GROUP) -> torch.Tensor:
    """x [..., n_in] @ the int8 matrix q [n_in, n_out] (scales [groups, n_out]) with x's rows
    rounded to int8 too: sum over groups of (x_int . w_int) * x_scale * w_scale. A group's
    integer sum is at most 32 * 127 * 127, exact in float32."""
    flat = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows(flat, group)
    n_in, n_out = q.shape
    wq = F.pad(q.float(), (0, 0, 0, (-n_in) % group)).view(-1, group, n_out).to(xq.device)
    ws = scales.to(xq.device)
    y = bias.float().expand(len(flat), n_out).clone() if bias is not None else \
        torch.zeros(len(flat), n_out, device=xq.device)
    for g in range(wq.shape[0]):  # groups in ascending order, as the C step adds them
        y += (xq[:, g] @ wq[g]) * (ws[g][None, :] * xs[:, g, None])
    return y.to(x.dtype).view(*x.shape[:-1], n_out)
