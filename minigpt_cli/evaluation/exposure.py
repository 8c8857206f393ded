"""Exposure bias, measured: accumulated error on the model's own prefixes against the data's.

The method of Arora et al. 2022 ("Why Exposure Bias Matters: An Imitation Learning Perspective
of Error Accumulation in Language Generation"). From held-out windows, take a context of c
tokens and continue it for L tokens two ways: with the held-out text itself (the prefixes
teacher forcing trains on) and with the model's own tokens (greedy, and sampled at
temperature 1). At each continuation position t the per-step error is

    e(t) = KL( oracle(. | prefix) || model(. | prefix) ),

where the oracle is a stronger model of the same text. R(l) sums e over the first l positions,
averaged over windows: R_D on data prefixes, R_M on model prefixes, and

    %ExAccErr(l) = 100 * (R_M(l) - R_D(l)) / R_D(l)

is how much more error the model accumulates on its own prefixes than on the data's: the
mismatch teacher forcing leaves, as a number. Intervals are a bootstrap over windows. Without
an oracle the true distribution is unknown, so e(t) cannot be identified; what can be measured
is shown instead: next-token entropy and repetition on model-made against data prefixes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from minigpt_cli.inference.generate import Decoder
from minigpt_cli.model.gpt import GPT


def window_starts(n_tokens: int, span: int, count: int) -> list[int]:
    """`count` evenly spread starts of `span`-token windows (fewer if the text is short)."""
    last = n_tokens - span
    count = min(count, last + 1)
    return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})


@torch.inference_mode()
def continue_contexts(model: GPT, contexts: np.ndarray, length: int, temperature: float,
                      seed: int) -> np.ndarray:
    """[N, length] tokens from the model after each context, all rows in one batch, through
    the same runner `generate` uses; no stop at end-of-text, so every row has `length`."""
    decoder = Decoder(model, contexts.tolist())
    gen = torch.Generator().manual_seed(seed)
    out = np.zeros((len(contexts), length), dtype=np.int64)
    for t in range(length):
        logits = decoder.logits().float().cpu()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        out[:, t] = nxt.numpy()
        decoder.append(nxt.tolist())
    return out


@torch.inference_mode()
def step_errors(model: GPT, oracle: GPT | None, contexts: np.ndarray, continuations: np.ndarray,
                batch_size: int = 8) -> tuple[np.ndarray, np.ndarray | None]:
    """Per continuation position t, given the context and the continuation's first t tokens
    (one teacher-forced pass per row and model): the model's next-token entropy, and
    e(t) = KL(oracle || model) if there is an oracle. Both [N, L], in nats; reduced batch by
    batch, so a 50k vocabulary never needs an [N, L, V] tensor."""
    c = contexts.shape[1]
    seqs = torch.from_numpy(np.concatenate([contexts, continuations[:, :-1]], axis=1))
    device = next(model.parameters()).device
    entropy, kl = [], []
    for i in range(0, len(seqs), batch_size):
        x = seqs[i:i + batch_size].to(device)
        lp = F.log_softmax(model(x)[0][:, c - 1:].float(), -1)
        entropy.append((-(lp.exp() * lp).sum(-1)).double().cpu())
        if oracle is not None:
            lo = F.log_softmax(oracle(x)[0][:, c - 1:].float(), -1)
            # clamp: float rounding around a true 0 (model and oracle the same)
            kl.append((lo.exp() * (lo - lp)).sum(-1).clamp(min=0.0).double().cpu())
    return (torch.cat(entropy).numpy(),
            torch.cat(kl).numpy() if oracle is not None else None)


def seq_rep(tokens: np.ndarray, n: int, upto: int) -> float:
    """Welleck et al.'s seq-rep-n over the first `upto` tokens of each row: the share of
    n-grams that repeat an earlier one, averaged over rows (0 = no repetition)."""
    rates = []
    for row in tokens[:, :upto]:
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else float("nan")


def distinct(tokens: np.ndarray, n: int, upto: int) -> float:
    """distinct-n: unique n-grams over all n-grams in the first `upto` tokens, pooled."""
    grams = [tuple(row[i:i + n]) for row in tokens[:, :upto] for i in range(upto - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def accumulated(errors: np.ndarray) -> np.ndarray:
    """R(l) for l = 1..L from per-window per-step errors [N, L]: mean over windows of sums."""
    return errors.cumsum(axis=1).mean(axis=0)


def ex_acc_err(r_model: np.ndarray, r_data: np.ndarray) -> list[float | None]:
    """%ExAccErr at each l; None where R_D is 0 (model and oracle agree: undefined)."""
    return [None if d <= 1e-12 else 100.0 * (m - d) / d
            for m, d in zip(r_model.tolist(), r_data.tolist(), strict=True)]


Interval = tuple[float, float]


def bootstrap_ex_acc_err(e_model: np.ndarray, e_data: np.ndarray, levels: list[int],
                         rounds: int = 1000, seed: int = 0) -> dict[int, Interval | None]:
    """95% intervals for %ExAccErr(l), resampling windows with replacement."""
    rng = np.random.default_rng(seed)
    n = len(e_data)
    cm, cd = e_model.cumsum(axis=1), e_data.cumsum(axis=1)
    out: dict[int, Interval | None] = {}
    picks = rng.integers(0, n, size=(rounds, n))
    for level in levels:
        m = cm[:, level - 1][picks].mean(axis=1)
        d = cd[:, level - 1][picks].mean(axis=1)
        ok = d > 1e-12
        if not ok.any():
            out[level] = None
            continue
        ratio = 100.0 * (m[ok] - d[ok]) / d[ok]
        out[level] = (float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5)))
    return out


def table_levels(length: int) -> list[int]:
    """l = 8, 16, 32, ... up to L, and L itself."""
    levels = [level for level in (2 ** k for k in range(3, 20)) if level <= length]
    return levels + ([length] if length not in levels else [])
