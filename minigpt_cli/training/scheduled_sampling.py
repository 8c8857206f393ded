"""Scheduled sampling: during training, sometimes feed the model its own predictions.

Teacher forcing conditions every prediction on the true previous tokens; generation conditions
on the model's own (exposure bias, docs/eval.md). Scheduled
sampling (Bengio et al. 2015; for transformers, Mihaylova & Martins 2019) narrows that gap: a
no-grad teacher-forced pass gives the model's prediction at every position, each input position
t >= 1 is replaced, with the scheduled probability, by the token predicted at position t - 1
(the prediction *of* token t), and the loss pass runs on the mixed inputs against the true
targets. The coin flips and sampled tokens come from a generator seeded by (seed, step, micro-
batch), so a resumed run replays them exactly.
"""

from __future__ import annotations

import math

import torch

from minigpt_cli.config import ScheduledSamplingConfig
from minigpt_cli.device import autocast
from minigpt_cli.training.data import micro_seed


def probability(step: int, ss: ScheduledSamplingConfig) -> float:
    """The share of inputs replaced at `step`, ramping from 0 to max_prob over ramp_steps.

    linear: a straight ramp. exponential: 1 - k^step with k chosen so the ramp is 99% done at
    ramp_steps (Bengio's exponential decay of the teacher-forcing probability). inverse_sigmoid:
    Bengio's inverse-sigmoid decay, centred at half the ramp (0.7% at 0, 99.3% at ramp_steps).
    """
    if ss.max_prob <= 0:
        return 0.0
    x = step / ss.ramp_steps
    if ss.schedule == "linear":
        share = min(1.0, x)
    elif ss.schedule == "exponential":
        share = 1.0 - 0.01 ** x
    else:
        share = 1.0 / (1.0 + math.exp(-10.0 * (x - 0.5)))
    return ss.max_prob * share


def mix_inputs(x: torch.Tensor, predicted: torch.Tensor, replace: torch.Tensor) -> torch.Tensor:
    """Inputs with position t (t >= 1) taken from predicted[:, t - 1] where replace[:, t].

    predicted[:, t - 1] is what the model predicted at position t - 1, that is its guess for
    the token at position t; position 0 has no prediction before it and is never replaced.
    """
    out = x.clone()
    swap = replace[:, 1:]
    out[:, 1:] = torch.where(swap, predicted[:, :-1], x[:, 1:])
    return out


@torch.no_grad()
def own_predictions_as_inputs(fwd: torch.nn.Module, x: torch.Tensor, prob: float, seed: int,
                              step: int, micro: int, device: torch.device,
                              dtype: torch.dtype) -> torch.Tensor:
    """The first of scheduled sampling's two passes: sample the model's next token at every
    position (temperature 1, as generation samples) and mix them into the inputs."""
    g = torch.Generator().manual_seed(micro_seed(seed, step, micro) ^ 0x5CED)
    with autocast(device, dtype):
        logits, _ = fwd(x.to(device))
    probs = torch.softmax(logits.float(), -1).cpu().flatten(0, 1)
    predicted = torch.multinomial(probs, 1, generator=g).view(x.shape)
    replace = torch.rand(x.shape, generator=g) < prob
    return mix_inputs(x, predicted, replace)
