"""The arithmetic of training, apart from the loop's bookkeeping: the learning-rate schedule,
one optimizer step's gradient (accumulation, clipping), and evaluation.

Kept apart so each can be tested against an independent computation (tests/training/test_loop.py):
accumulation over k micro-batches against one batch k times larger, clipping against the
global-norm bound, bits per byte against uniform logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt_cli.config import TrainConfig
from minigpt_cli.device import autocast
from minigpt_cli.training.distributed import Ranks, all_sum, no_sync


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


@dataclass
class EvalResult:
    loss: float
    bpb: float


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list, token_bytes: torch.Tensor,
             device: torch.device, dtype: torch.dtype, ranks: Ranks = Ranks()) -> EvalResult:
    """Mean loss per scored token and bits per byte (summed nats / ln 2 / UTF-8 bytes), eval
    mode.
    Over several ranks each scores its share of the batches and the sums are all-reduced, so
    every rank takes part and all get the single-process figure. Every rank runs the same
    number of forwards (FSDP2 gathers weights in each): a short share repeats a batch and
    discards it."""
    was_training = model.training
    model.eval()
    nats = bytes_ = 0.0
    total = count = 0.0
    share = batches[ranks.rank::ranks.world]
    for _ in range(-(-len(batches) // ranks.world) - len(share)):
        with autocast(device, dtype):
            model(batches[0][0].to(device))
    for x, y in share:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits, _ = model(x)
        # A target of -1 is not scored (chat data: every token but the assistant's).
        target = y.flatten()
        kept = target >= 0
        losses = F.cross_entropy(logits.float().flatten(0, 1), target, reduction="none",
                                 ignore_index=-1)
        nb = token_bytes[target.clamp(min=0)] * kept
        nats += (losses * (nb > 0)).sum().item()  # special tokens stand for no bytes
        bytes_ += nb.sum().item()
        total += losses.sum().item()
        count += kept.sum().item()
    model.train(was_training)
    nats, bytes_, total, count = all_sum([nats, bytes_, total, count], ranks)
    return EvalResult(loss=total / count, bpb=nats / math.log(2) / max(bytes_, 1.0))


def accumulate_gradients(fwd: torch.nn.Module, micro_batches: Iterable[tuple[Tensor, Tensor]],
                         n: int, scaler: torch.amp.GradScaler, device: torch.device,
                         dtype: torch.dtype) -> Tensor:
    """Backward over n micro-batches, each loss scaled by 1/n: the summed gradient is the
    gradient of one batch n times larger (equal-sized micro-batches, mean losses). Returns the
    mean loss, still on the device (reading it would wait for the device)."""
    loss_sum = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # Under DDP only the last micro-batch's backward all-reduces (DDP averages over ranks,
        # so n is this rank's share: the result is the mean over every rank's micro-batches).
        with no_sync(fwd, skip=i < n - 1):
            with autocast(device, dtype):
                _, loss = fwd(x, y)
            scaler.scale(loss / n).backward()
        loss_sum += loss.detach()
    return loss_sum / n


def clip_gradients(model: torch.nn.Module, opt: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, max_norm: float) -> Tensor | None:
    """Scale all gradients together so their global L2 norm is at most max_norm (0 = off).
    Returns the norm before clipping (a device tensor), which metrics.jsonl logs."""
    if max_norm <= 0:
        return None
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # Sharded (FSDP2) gradients give a DTensor norm, already reduced over the ranks.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
