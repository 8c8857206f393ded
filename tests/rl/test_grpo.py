"""GRPO: group-relative advantages, a loss over the sampled tokens only, rewards a user
writes, and a run that resumes exactly."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from minigpt_cli import tasks
from minigpt_cli import tokenizer as tok
from minigpt_cli.config import config_from_dict
from minigpt_cli.convert.hf import export_hf
from minigpt_cli.convert.llama import to_llama
from minigpt_cli.errors import UserError
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPT, GPTConfig
from minigpt_cli.rl.grpo import GRPO
from minigpt_cli.tokenizer import chat
from minigpt_cli.training import run_state
from minigpt_cli.training.loop import train
from tests.conftest import chat_raw, chat_sft_run, reverse_task

QUIET = Console(file=io.StringIO())


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_sft_run(tmp_path_factory.mktemp("sft"), 60)


def grpo_raw(tmp_path: Path, sft_run: Path, **rl: object) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": m["messages"][0]["content"]}) + "\n"
                               for m in reverse_task(50, seed=5)))
    raw = chat_raw(tmp_path, sft_run.parent / "chat.jsonl", max_steps=4, eval_interval=4,
                   save_interval=2, init_from=str(sft_run), objective="grpo", lr=1e-3,
                   min_lr=1e-3, warmup_steps=0)
    del raw["model"]  # the starting run's architecture
    raw["out_dir"] = str(tmp_path / "grpo")
    raw["rl"] = {"prompts": str(prompts), "reward": "reverse", "group_size": 4,
                 "prompts_per_step": 2, "max_new_tokens": 6, **rl}
    return raw


def run_grpo(raw: dict, overrides: list[str] | None = None, resume: bool = False) -> None:
    cfg = config_from_dict(raw, overrides)
    train(cfg, resume=resume, console=QUIET, objective=GRPO(cfg))


def test_a_groups_advantages_are_its_rewards_minus_their_mean(tmp_path, sft_run) -> None:
    objective = GRPO(config_from_dict(grpo_raw(tmp_path, sft_run)))
    assert objective._advantages([1, 0, 0, 1, 0, 0, 0, 0]) == [0.5, -0.5, -0.5, 0.5,
                                                                0.0, 0.0, 0.0, 0.0]


def test_the_loss_is_the_advantage_weighted_log_probability_of_the_samples(tmp_path,
                                                                            sft_run) -> None:
    """Rows hold prompt + completion; only the completion's tokens are targets, each weighted
    by its advantage; the loss equals -sum(A * log p(sampled)) / tokens computed another way."""
    cfg = config_from_dict(grpo_raw(tmp_path, sft_run))
    objective = GRPO(cfg)
    enc = tok.with_tokens(tok.byte_encoding(), chat.CHAT_TOKENS)
    objective.start(enc, chat.default_template(tok.EOT))
    completions = [[ord("c"), ord("b")], [ord("a")]]
    objective.rl.group_size = 1
    x, y, w = objective._rows([0, 1], completions, [0.5, -2.0])
    for r, (i, c) in enumerate(zip([0, 1], completions, strict=True)):
        start = len(objective.ids[i]) - 1
        assert y[r, start:start + len(c)].tolist() == c
        assert (y[r, :start] == -1).all() and (y[r, start + len(c):] == -1).all()
        assert (w[r, start:start + len(c)] == [0.5, -2.0][r]).all()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=32, n_layer=1, n_head=2,
                          n_embd=16))
    logits, _ = model(x)
    nll = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1,
                          reduction="none").view_as(y)
    ours = (nll * w).sum() / (y >= 0).sum()
    logp = torch.log_softmax(logits, -1)
    theirs = sum(-[0.5, -2.0][r] * logp[r, objective.ids[i].__len__() - 1 + j, t]
                 for r, (i, c) in enumerate(zip([0, 1], completions, strict=True))
                 for j, t in enumerate(c)) / 3
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_grpo_logs_its_rewards_and_resumes_exactly(tmp_path, sft_run) -> None:
    raw = grpo_raw(tmp_path, sft_run)
    run_grpo(raw)
    records = [r for r in run_state.read_metrics(tmp_path / "grpo") if "reward_mean" in r]
    assert records and all(0 <= r["reward_mean"] <= 1 and r["sampled_tokens"] > 0
                           for r in records)
    half = {**raw, "out_dir": str(tmp_path / "half")}
    run_grpo(half, ["train.max_steps=2"])
    run_grpo(half, resume=True)
    a, _ = store.load_safetensors(tmp_path / "grpo" / store.MODEL_FILE)
    b, _ = store.load_safetensors(tmp_path / "half" / store.MODEL_FILE)
    start, _ = store.load_safetensors(sft_run / store.MODEL_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], start[k]) for k in a)  # it did learn something


def test_a_users_reward_is_called_with_the_prompt_and_its_fields(tmp_path, sft_run) -> None:
    (tmp_path / "my_reward.py").write_text(
        "def shortest(prompt, completion, **fields):\n"
        "    assert prompt.startswith('reverse ')\n"
        "    return -len(completion)\n")
    raw = grpo_raw(tmp_path, sft_run, reward=f"{tmp_path / 'my_reward.py'}:shortest",
                   kl=0.1)
    raw["train"].update(max_steps=1, save_interval=1, eval_interval=1)
    run_grpo(raw)
    record = [r for r in run_state.read_metrics(tmp_path / "grpo") if "reward_mean" in r][-1]
    assert record["reward_mean"] <= 0 and math.isfinite(record["loss"])


@pytest.mark.parametrize("spec, why", [
    ("nowhere", "neither a built-in task"),
    ("no_such_module_xyz:f", "cannot import"),
    ("math:no_such_function", "has no function"),
])
def test_a_reward_that_cannot_be_found_is_one_line(spec, why) -> None:
    with pytest.raises(UserError, match=why):
        tasks.load_reward(spec)


@pytest.mark.parametrize("value", [float("nan"), "1", None, True])
def test_a_reward_that_returns_no_number_is_named(value) -> None:
    with pytest.raises(UserError, match="not a finite number"):
        tasks.score(lambda *a, **k: value, tasks.Prompt("p"), "c")


def test_built_in_tasks_check_their_answers() -> None:
    assert tasks.reverse("reverse abc", " cba ") == 1.0 and tasks.reverse("reverse abc", "abc") == 0
    assert tasks.addition("12+30=", "42") == 1.0 and tasks.addition("1+1=", "3") == 0.0
    for p in tasks.make("addition", 5, seed=1) + tasks.make("reverse", 5, seed=1):
        assert tasks.BUILTIN[("reverse" if p.text.startswith("reverse") else "addition")](
            p.text, p.fields["answer"], **p.fields) == 1.0


# GRPO against TRL's own loss: on the same weights and the same sampled completions, TRL's
# GRPOTrainer (on-policy, advantages not scaled, loss_type "dapo": the settings
# benchmarks/trl_grpo_peer.py matches) gives the gradient minigpt's GRPO step gives. Where
# the two peers' runs differ, this says the update is not why: the same samples make the same
# step, so what differs is which samples each draws.

def _minigpt_step(tmp_path: Path, sft_run: Path) -> tuple[dict, dict]:
    """One GRPO loss of minigpt's: its samples (prompt ids, completions, advantages) and the
    gradient of every weight, named and laid out as LlamaForCausalLM's."""
    (tmp_path / "length.py").write_text(  # rewards that differ within every group
        "def shortest(prompt, completion, **fields):\n    return -len(completion)\n")
    cfg = config_from_dict(grpo_raw(tmp_path, sft_run, group_size=8, prompts_per_step=4,
                                    max_new_tokens=8,
                                    reward=f"{tmp_path / 'length.py'}:shortest"))
    objective = GRPO(cfg)
    model, meta = store.load_model(sft_run / store.MODEL_FILE)
    enc = tok.load(meta["tokenizer"], sft_run)
    objective.start(enc, chat.ChatTemplate.from_dict(meta["tokenizer"]["chat"]))
    seen: dict = {}
    rows = objective._rows

    def keep(each, completions, advantages):  # type: ignore[no-untyped-def]
        seen.update(prompts=[objective.ids[i] for i in each], completions=completions,
                    advantages=advantages)
        return rows(each, completions, advantages)

    objective._rows = keep  # type: ignore[method-assign]
    model.train()
    loss = objective.loss(model, model, 0, torch.device("cpu"), torch.float32)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return seen, to_llama(grads, model.config)


def _trl_inputs(seen: dict, pad: int) -> dict[str, torch.Tensor]:
    """The batch as GRPOTrainer hands it to its loss: prompts padded on the left, completions
    on the right, a mask for each."""
    rows, width = len(seen["prompts"]), max(len(p) for p in seen["prompts"])
    length = max(len(c) for c in seen["completions"])
    prompt_ids = torch.full((rows, width), pad)
    prompt_mask = torch.zeros(rows, width, dtype=torch.long)
    completion_ids = torch.full((rows, length), pad)
    completion_mask = torch.zeros(rows, length, dtype=torch.long)
    for r, (p, c) in enumerate(zip(seen["prompts"], seen["completions"], strict=True)):
        prompt_ids[r, width - len(p):], prompt_mask[r, width - len(p):] = torch.tensor(p), 1
        completion_ids[r, :len(c)], completion_mask[r, :len(c)] = torch.tensor(c), 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": torch.tensor(seen["advantages"]),
            "num_items_in_batch": completion_mask.sum().float()}


def test_trl_grpo_loss_on_minigpts_samples_gives_minigpts_gradient(tmp_path, sft_run) -> None:
    import transformers
    import trl
    from datasets import Dataset

    seen, ours = _minigpt_step(tmp_path, sft_run)
    assert any(a != 0 for a in seen["advantages"])  # a batch that teaches something
    hf = export_hf(sft_run, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    tokenizer.pad_token = tokenizer.bos_token
    args = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=32,
                          num_generations=8, max_completion_length=8, beta=0.0,
                          scale_rewards="none", loss_type="dapo", num_iterations=1,
                          weight_decay=0.1, adam_beta2=0.99, use_cpu=True, bf16=False,
                          fp16=False, report_to=[], save_strategy="no")
    # bf16 and fp16 off: float32, as minigpt's step (TRL's default is bf16)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "x"}]}] * 8)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(
        completions), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by train(), which this skips
    model.train()
    loss = trainer._compute_loss(model, _trl_inputs(seen, tokenizer.pad_token_id))
    loss.backward()  # its value is -sum(A) / tokens (the ratio is 1 on-policy); its gradient
    theirs = {name: p.grad for name, p in model.named_parameters()}
    assert set(theirs) == set(ours)
    for name, grad in theirs.items():
        scale = float(grad.abs().max()) + 1e-12
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # and the step it takes with them is minigpt's `optimizer: adamw` one: AdamW, the same
    # betas and eps, weight decay on the same tensors (every matrix, the embedding; no gain)
    opt = trainer.create_optimizer()
    decayed = {name for group in opt.param_groups if group["weight_decay"] > 0
               for name, p in model.named_parameters() if any(p is q for q in group["params"])}
    assert type(opt).__name__ == "AdamW" and opt.defaults["eps"] == 1e-8
    assert opt.defaults["betas"] == (0.9, 0.99)  # benchmarks/trl_grpo_peer.py's, and ours
    assert decayed == {name for name, grad in ours.items() if grad.dim() >= 2}
