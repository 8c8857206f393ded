"""int8 products in llama.cpp's Q8_0 style: what they do to a model's numbers.

Every matrix a product reads (the four per block, and the tied embedding that is also the
output head) is split into groups of GROUP consecutive input rows; each group of each output
column keeps one scale, max |w| / 127, stored as float16 as Q8_0 stores it, and 8-bit
integers round(w / scale) (rounded by the exact scale, before the scale itself is). A
product's input rows are rounded the same way just before it, per row and group of GROUP
values, so each group's part of the product is a sum of integer products, exact, times the
two scales (q8.py). Biases, norms, attention and the KV cache stay float32.

This module is the reference for the weights: `quantize` and `dequantize` (and `quantize4`,
llama.cpp's Q4_0) define their format, and `quantize_model` puts the dequantized values into a
model in place (so the embedding lookup reads them) and marks its products rounded; q8.py's
`q8_product` is what a rounded product computes, on any device. The speed comes from the C
step, which multiplies the bytes themselves with integer dot-product instructions (decoding
one token is bound by the bytes of weight it streams) and is checked against this reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minigpt_cli.model.q8 import GROUP

MODES = ("none", "int8", "int4")


def check_mode(mode: str) -> None:
    """Refuse an unknown --quantize before anything is loaded."""
    if mode not in MODES:
        from minigpt_cli.errors import UserError

        raise UserError(f"--quantize must be one of {', '.join(MODES)}, got '{mode}'")


def half_scales(scales: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """Scales as llama.cpp keeps them, float16 (34 bytes a group of 32 int8 weights rather
    than 36, 18 rather than 20 for int4: decoding streams every byte), held as float32 values
    here so every product reads the same numbers. A scale past float16's range (a weight over
    65504 x `levels`, the largest integer: from a run that diverged) is refused rather than
    rounded to infinity."""
    half = scales.to(torch.float16)
    if not torch.isfinite(half).all() and torch.isfinite(scales).all():
        from minigpt_cli.errors import UserError

        raise UserError(f"a weight of {float(scales.abs().max()) * levels:.3g} is past what "
                        f"this rounding keeps (float16 scales: |w| up to {65504 * levels:.3g})")
    return half.float()


def quantize(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [in, out] -> (q int8 [in, out], scales [ceil(in / group), out], float16 values as
    float32). A group that is all zeros gets scale 0 and zeros, never a division by zero."""
    n_in, n_out = w.shape
    pad = (-n_in) % group
    blocks = F.pad(w.detach().float(), (0, 0, 0, pad)).view(-1, group, n_out)
    scales = blocks.abs().amax(dim=1) / 127.0
    inverse = torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.round(blocks * inverse[:, None, :]).clamp_(-127, 127).to(torch.int8)
    return q.view(-1, n_out)[:n_in].contiguous(), half_scales(scales)


def quantize4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's Q4_0: w [in, out] -> (q int8 values in [-8, 7], scales [groups, out]). Each
    group's scale is its largest-magnitude weight m over -8, so m maps to -8 exactly and the
    rest round half up into [-8, 7]; the scale is then kept as float16, as int8's. Dequantized
    as dequantize does: q times its scale."""
    n_in, n_out = w.shape
    pad = (-n_in) % group
    blocks = F.pad(w.detach().float(), (0, 0, 0, pad)).view(-1, group, n_out)
    at = blocks.abs().argmax(dim=1, keepdim=True)
    scales = blocks.gather(1, at)[:, 0, :] / -8.0
    inverse = torch.where(scales != 0, 1.0 / scales, torch.zeros_like(scales))
    q = torch.floor(blocks * inverse[:, None, :] + 8.5).clamp_(0, 15) - 8
    return q.to(torch.int8).view(-1, n_out)[:n_in].contiguous(), half_scales(scales, 8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """The float32 matrix an int8 product multiplies by: q times its group's scale."""
    return q.float() * scales.repeat_interleave(group, dim=0)[: q.shape[0]]


@dataclass
class QuantizeReport:
    matrices: int
    float_bytes: int  # what the quantized matrices take in float32
    int8_bytes: int  # the same rounded, with their scales
    kind: str = "int8"

    def describe(self) -> str:
        head = " (the head int8)" if self.kind == "int4" else ""
        return (f"{self.kind} weights{head}: {self.matrices} matrices, "
                f"{self.float_bytes / 1e6:.1f} MB as float32 -> {self.int8_bytes / 1e6:.1f} MB "
                "rounded + scales")


@torch.no_grad()
def quantize_model(model: torch.nn.Module, group: int = GROUP, kind: str = "int8"
                   ) -> QuantizeReport:
    """Round every product's weight to its int8 (or, kind "int4", Q4_0) value in place. The
    tied embedding, stored [vocab, C], is grouped along C (the head's input), and stays int8
    with int4: it is the output head too, and llama.cpp's own quantizer also keeps that
    matrix at a higher precision than Q4_0."""
    from minigpt_cli.model.gpt import Linear

    matrices = float_bytes = int8_bytes = 0

    def round_in_place(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal matrices, float_bytes, int8_bytes
        q, scales = (quantize4 if bits == 4 else quantize)(w, group)
        w.copy_(dequantize(q, scales, group).to(w.dtype))
        matrices += 1
        float_bytes += w.numel() * 4
        int8_bytes += q.numel() * bits // 8 + scales.numel() * 2
        return q, scales

    # The rounded values stay beside the weights (plain attributes, so no state dict changes)
    # for the C step, which multiplies by them directly (inference/native); `int4` marks the
    # matrices whose values fit 4 bits, which it packs two to a byte.
    bits = 4 if kind == "int4" else 8
    for module in model.modules():
        if isinstance(module, Linear):
            module.int8 = round_in_place(module.weight, bits)
            module.int4 = bits == 4
    model.head_int8 = round_in_place(model.wte.weight.t(), 8)  # a view: lands in the embedding
    return QuantizeReport(matrices, float_bytes, int8_bytes, kind)


def int8_pairs(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The int8 values quantize_model left beside the weights, by weight name. The tied
    embedding's pair is the head's orientation, [C, vocab]."""
    pairs = {f"{name}.weight": module.int8 for name, module in model.named_modules()
             if getattr(module, "int8", None) is not None}
    if getattr(model, "head_int8", None) is not None:
        pairs["wte.weight"] = model.head_int8
    return pairs


def pack(tensors: dict[str, torch.Tensor], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
         int4: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """A state dict to save with each rounded matrix as NAME.int8 + NAME.scale (float16;
    safetensors holds int8 as it is): a quarter of the float32 bytes. A matrix named in
    `int4` is saved as NAME.int4 instead, two values a byte (input rows 2i and 2i + 1 of a
    column as the low and high nibble, each plus 8): an eighth."""
    out = {k: v for k, v in tensors.items() if k not in pairs}
    for name, (q, scales) in pairs.items():
        if name in int4:
            nib = F.pad(q.to(torch.int16) + 8, (0, 0, 0, q.shape[0] % 2))
            out[f"{name}.int4"] = (nib[0::2] | (nib[1::2] << 4)).to(torch.uint8).contiguous()
        else:
            out[f"{name}.int8"] = q.contiguous()
        out[f"{name}.scale"] = scales.to(torch.float16).contiguous()
    return out


def _values(key: str, q: torch.Tensor, n_in: int) -> torch.Tensor:
    if key.endswith(".int8"):
        if q.dtype != torch.int8:
            raise ValueError(f"{key} is {q.dtype}, not int8")
        return q
    if q.dtype != torch.uint8:
        raise ValueError(f"{key} is {q.dtype}, not packed uint8")
    low, high = (q & 15).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=1).reshape(-1, q.shape[1])[:n_in]


def unpack(tensors: dict[str, torch.Tensor], group: int
           ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The inverse of pack: float tensors (the rounded ones dequantized) and the pairs of
    values and scales (int4 ones unpacked to int8 values in [-8, 7]; scales as float16
    values, whatever type a file holds them in, so every product reads the same numbers)."""
    out, pairs = dict(tensors), {}
    for key in [k for k in tensors if k.endswith((".int8", ".int4"))]:
        name = key.rsplit(".", 1)[0]
        packed, scales = out.pop(key), out.pop(f"{name}.scale", None)
        if scales is None:
            raise ValueError(f"{key} has no float scales beside it")
        q = _values(key, packed, min(scales.shape[0] * group, 2 * packed.shape[0]))
        if q.shape[0] > scales.shape[0] * group or q.shape[1] != scales.shape[1]:
            raise ValueError(f"{key} does not match its scales' shape")
        pairs[name] = (q, half_scales(scales))
        w = dequantize(q, pairs[name][1], group)
        out[name] = w.t().contiguous() if name == "wte.weight" else w
    return out, pairs


def attach(model: torch.nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give a model loaded from a rounded file its values back, for the C step (a matrix whose
    values all fit 4 bits is packed as int4 there: the same numbers)."""
    for name, pair in pairs.items():
        if name == "wte.weight":
            model.head_int8 = pair
        else:
            module = model.get_submodule(name.removesuffix(".weight"))
            module.int8 = pair
            module.int4 = bool(pair[0].min() >= -8 and pair[0].max() <= 7)
