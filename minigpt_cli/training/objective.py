"""What a step learns from when it is not teacher forcing on the run's data.

`train.objective: grpo` (RL fine-tuning) samples completions and scores them, which takes the
inference engine; training never imports inference, so the objective is built above both
(minigpt_cli/rl/) and handed to `train`. This protocol is all the loop knows of it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from minigpt_cli.model.gpt import GPT


class Objective(Protocol):
    def start(self, enc: Any, template: Any) -> None:
        """Called once the run's tokenizer and chat template (or None) are known."""

    def loss(self, model: GPT, fwd: torch.nn.Module, step: int, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
        """Step `step`'s loss, to be back-propagated through `fwd` (the module the step
        trains: `model` itself, or it wrapped); `model` is for generating with."""

    def stats(self) -> dict[str, float]:
        """What the last `loss` measured (mean reward, say): logged and shown."""
