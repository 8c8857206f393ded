"""Scheduled sampling: the shift, the schedules, and that a run with it on differs from one
with it off yet resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from minigpt_cli.config import ScheduledSamplingConfig
from minigpt_cli.training.scheduled_sampling import (
    mix_inputs,
    own_predictions_as_inputs,
    probability,
)


def test_position_t_gets_the_prediction_made_at_t_minus_1() -> None:
    x = torch.tensor([[10, 11, 12, 13]])
    predicted = torch.tensor([[20, 21, 22, 23]])  # predicted[:, t] is the guess for x[:, t + 1]
    every = torch.ones(1, 4, dtype=torch.bool)
    assert mix_inputs(x, predicted, every).tolist() == [[10, 20, 21, 22]]
    only_2 = torch.tensor([[True, False, True, False]])  # position 0 is never replaced
    assert mix_inputs(x, predicted, only_2).tolist() == [[10, 11, 21, 13]]
    assert mix_inputs(x, predicted, ~every).tolist() == x.tolist()
    assert x.tolist() == [[10, 11, 12, 13]]  # the batch itself is left alone


@pytest.mark.parametrize(("schedule", "at"), [
    ("linear", {0: 0.0, 50: 0.5, 100: 1.0, 300: 1.0}),
    ("exponential", {0: 0.0, 50: 0.9, 100: 0.99}),
    ("inverse_sigmoid", {0: 1 / (1 + math.exp(5)), 50: 0.5, 100: 1 / (1 + math.exp(-5))}),
])
def test_schedules(schedule: str, at: dict[int, float]) -> None:
    ss = ScheduledSamplingConfig(max_prob=0.4, schedule=schedule, ramp_steps=100)  # type: ignore[arg-type]
    for step, share in at.items():
        assert probability(step, ss) == pytest.approx(0.4 * share, abs=1e-12), step
    values = [probability(s, ss) for s in range(0, 200, 7)]
    assert values == sorted(values) and max(values) <= 0.4
    assert probability(50, ScheduledSamplingConfig(max_prob=0.0, schedule=schedule)) == 0.0  # type: ignore[arg-type]


def test_replaced_share_follows_the_probability_and_is_seeded(tiny_model) -> None:
    x = torch.randint(0, 257, (16, 32))
    cpu = torch.device("cpu")
    a = own_predictions_as_inputs(tiny_model, x, 0.3, 7, 5, 0, cpu, torch.float32)
    b = own_predictions_as_inputs(tiny_model, x, 0.3, 7, 5, 0, cpu, torch.float32)
    c = own_predictions_as_inputs(tiny_model, x, 0.3, 7, 6, 0, cpu, torch.float32)
    assert torch.equal(a, b) and not torch.equal(a, c)  # a function of (seed, step, micro)
    assert torch.equal(a[:, 0], x[:, 0])
    changed = (a[:, 1:] != x[:, 1:]).float().mean().item()
    assert 0.2 < changed < 0.32  # 30% replaced, a few by the same token
