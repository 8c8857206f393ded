"""GRPO: RL fine-tuning by sampling a group of completions per prompt and pushing up the ones
that beat their group.

Each step picks `rl.prompts_per_step` prompts (a pure function of seed and step, as text
batches are), samples `rl.group_size` completions of each through the inference engine (the
one decode loop: every completion of the step decodes in one batch, the group sharing its
prompt's cached prefix on the C step), and scores each with the reward. A completion's
advantage is its reward minus its group's mean, so a group that is all right or all wrong
teaches nothing, and one that is split teaches which way to go. The loss is the policy
gradient over the sampled tokens only:

    loss = sum over sampled tokens of  -advantage * log p(token)  /  sampled tokens

on-policy (the samples come from the weights being trained, so there is no importance ratio
to clip), as nanochat's chat_rl does, with an optional KL penalty to the starting run
(`rl.kl`, the k3 estimator exp(d) - d - 1 with d = log p_ref - log p).

This is the remedy for exposure bias the tutorials name beside scheduled sampling: the model
learns from its own samples, in the situations its own choices lead to, not from the data's.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minigpt_cli import tasks
from minigpt_cli.config import Config
from minigpt_cli.device import autocast
from minigpt_cli.errors import UserError
from minigpt_cli.inference import answers
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPT
from minigpt_cli.tokenizer import chat
from minigpt_cli.training import init_from


def rollout_seed(seed: int, step: int, k: int) -> int:
    """The seed of completion k of step `step`: a resumed run samples what an unbroken one
    would."""
    return ((seed * 1_000_003 + step) * 4_099 + k) % 2**63


class GRPO:
    """`train.objective: grpo` (training/objective.py's protocol)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.rl, self.seed = cfg, cfg.rl, cfg.seed
        self.prompts = tasks.read_prompts(cfg.rl.prompts)
        self.reward = tasks.load_reward(cfg.rl.reward)
        self.settings = SamplerSettings(temperature=cfg.rl.temperature, top_p=1.0)
        self.reference: GPT | None = None
        if cfg.rl.kl > 0:  # the run it started from, frozen
            path = init_from.weights_file(Path(cfg.train.init_from).expanduser())
            self.reference, _ = store.load_model(path)
        self._stats: dict[str, float] = {}

    def start(self, enc: Any, template: chat.ChatTemplate | None) -> None:
        self.enc, self.template = enc, template
        self.block = self.cfg.model.block_size  # the starting run's, once train.init_from set it
        self.ids = [answers.prompt_ids(enc, template, p.text) for p in self.prompts]
        if self.reference is not None:  # the chat tokens a base run gained, as the policy did
            self.reference.grow_vocab(enc.n_vocab)
        room = self.block - self.rl.max_new_tokens
        for p, ids in zip(self.prompts, self.ids, strict=True):
            if len(ids) > room:
                raise UserError(f"the prompt {p.text[:40]!r} is {len(ids)} tokens; with "
                                f"rl.max_new_tokens {self.rl.max_new_tokens} it does not fit "
                                f"the context (model.block_size {self.block})")

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def loss(self, model: GPT, fwd: torch.nn.Module, step: int, device: torch.device,
             dtype: torch.dtype) -> torch.Tensor:
        each = self._each(self._picks(step))  # the prompt of every completion, group by group
        sampled = self._rollouts(model, each, step)
        rewards = [tasks.score(self.reward, self.prompts[i], text)
                   for i, (_, text) in zip(each, sampled, strict=True)]
        advantages = self._advantages(rewards)
        x, y, w = self._rows(each, [tokens for tokens, _ in sampled], advantages)
        x, y, w = x.to(device), y.to(device), w.to(device)
        with autocast(device, dtype):
            logits, _ = fwd(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                              reduction="none").view_as(y)
        n = (y >= 0).sum().clamp(min=1)
        loss = (nll * w).sum() / n
        if self.reference is not None:
            loss = loss + self.rl.kl * self._kl(x, y, nll, n)
        self._stats = {"reward_mean": statistics.fmean(rewards),
                       "reward_std": statistics.pstdev(rewards),
                       "sampled_tokens": float(sum(len(t) for t, _ in sampled))}
        return loss

    def _picks(self, step: int) -> list[int]:
        g = torch.Generator().manual_seed(rollout_seed(self.seed, step, -1))
        return torch.randint(0, len(self.prompts), (self.rl.prompts_per_step,),
                             generator=g).tolist()

    def _each(self, picks: list[int]) -> list[int]:
        """The prompt index of every completion, group by group."""
        return [i for i in picks for _ in range(self.rl.group_size)]

    def _rollouts(self, model: GPT, each: list[int], step: int
                  ) -> list[tuple[list[int], str]]:
        """Every completion of the step, sampled in one batch (inference/answers.py)."""
        seeds: list[int | None] = [rollout_seed(self.seed, step, k) for k in range(len(each))]
        return answers.answer(model, self.enc, self.template, [self.ids[i] for i in each],
                              self.settings, self.rl.max_new_tokens, seeds)

    def _advantages(self, rewards: list[float]) -> list[float]:
        g = self.rl.group_size
        out = []
        for at in range(0, len(rewards), g):
            group = rewards[at:at + g]
            mean = statistics.fmean(group)
            out += [r - mean for r in group]
        return out

    def _rows(self, each: list[int], completions: list[list[int]], advantages: list[float]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt + completion per row (`each`: the prompt of every completion), padded;
        targets only at the sampled tokens, each weighted by its completion's advantage."""
        ids = [self.ids[i] + c for i, c in zip(each, completions, strict=True)]
        width = max(len(r) for r in ids) - 1
        x = torch.full((len(ids), width), self.enc.eot_token, dtype=torch.long)
        y = torch.full((len(ids), width), -1, dtype=torch.long)
        w = torch.zeros(len(ids), width)
        for r, (row, i, a) in enumerate(zip(ids, each, advantages, strict=True)):
            start = len(self.ids[i]) - 1  # the target at this position is the first sample
            x[r, :len(row) - 1] = torch.tensor(row[:-1])
            y[r, start:len(row) - 1] = torch.tensor(row[start + 1:])
            w[r, start:len(row) - 1] = a
        return x, y, w

    def _kl(self, x: torch.Tensor, y: torch.Tensor, nll: torch.Tensor, n: torch.Tensor
            ) -> torch.Tensor:
        """The mean k3 estimate of KL(policy || reference) over the sampled tokens."""
        assert self.reference is not None
        ref = self.reference.to(x.device)
        with torch.no_grad():
            ref_logits, _ = ref(x)
            ref_nll = F.cross_entropy(ref_logits.float().flatten(0, 1), y.flatten(),
                                      ignore_index=-1, reduction="none").view_as(y)
        d = nll - ref_nll  # log p_ref - log p
        k3 = torch.exp(d) - d - 1
        return (k3 * (y >= 0)).sum() / n

