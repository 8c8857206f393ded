"""`minigpt eval --tasks`: lm-evaluation-harness in process, on a minigpt run.

`MinigptLM` is lm-eval's `TemplateLM`: lm-eval splits each context and continuation into
tokens (with the run's tokenizer) exactly as it does for its own models and for an
OpenAI-style server, and minigpt scores the token ids:

- loglikelihood: one forward pass over context + continuation (the last `block_size` tokens),
  batched; the continuation's log-probabilities summed, and whether each token was the argmax;
- loglikelihood_rolling: lm-eval's own rolling windows of the context size, each scored so;
- generate_until: through the engine (the one decode loop), greedy unless the task asks for
  sampling, stopping at the task's `until` strings.

So the numbers equal lm-eval's `local-completions` client against `minigpt serve` on the same
run (the served /v1/completions scores prompts with echo + logprobs the same way).

Tasks come from lm-eval's registry or `--include-path DIR` (YAML task files; offline a task's
data is a local file: `dataset_path: json` with `dataset_kwargs: {data_files: ...}`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tiktoken
import torch
from rich.console import Console

from minigpt_cli import files
from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.inference.generate import generate
from minigpt_cli.inference.loading import load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings
from minigpt_cli.model.gpt import GPT


def _lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise UserError("--tasks runs lm-evaluation-harness: pip install 'minigpt[lm-eval]'"
                        ) from None
    return lm_eval, TemplateLM


def make_lm(model: GPT, enc: tiktoken.Encoding, batch_size: int = 8) -> Any:
    """An lm-eval `LM` over a loaded run (the class is built here: lm-eval is optional)."""
    _, TemplateLM = _lm_eval()

    class MinigptLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.enc, self.batch_size = model, enc, batch_size

        @property
        def eot_token_id(self) -> int:
            return self.enc.eot_token

        @property
        def max_length(self) -> int:
            return self.model.config.block_size

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       **kwargs: Any) -> list[int]:
            return tok.encode(self.enc, string)

        def tok_decode(self, tokens: list[int]) -> str:
            return self.enc.decode(tokens)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                                  **kwargs: Any) -> list[tuple[float, bool]]:
            return score_pairs(self.model, [(c, x) for _, c, x in requests], self.batch_size)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False
                                  ) -> list[float]:
            return [rolling(self, req.args[0]) for req in requests]

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            return [until(self, context, dict(kwargs)) for context, kwargs in
                    (req.args for req in requests)]

    return MinigptLM()


@torch.no_grad()
def score_pairs(model: GPT, pairs: list[tuple[list[int], list[int]]], batch_size: int
                ) -> list[tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether each was the argmax) for each
    (context ids, continuation ids), the last block_size + 1 tokens of each, in batches of
    like lengths (right padding: a causal model's real positions never see it)."""
    block = model.config.block_size
    device = next(model.parameters()).device
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    for at in range(0, len(order), batch_size):
        rows = order[at:at + batch_size]
        seqs = [(pairs[i][0] + pairs[i][1])[-(block + 1):] for i in rows]
        width = max(len(s) - 1 for s in seqs)
        x = torch.zeros((len(rows), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            x[r, :len(s) - 1] = torch.tensor(s[:-1])
        logits, _ = model(x.to(device))
        lp = torch.log_softmax(logits.float(), dim=-1)
        for r, i in enumerate(rows):
            n, s = len(pairs[i][1]), seqs[r]
            rows_lp = lp[r, len(s) - 1 - n:len(s) - 1]
            target = torch.tensor(s[-n:], device=rows_lp.device)
            got = rows_lp.gather(1, target[:, None]).sum()
            out[i] = (float(got), bool((rows_lp.argmax(-1) == target).all()))
    return out  # type: ignore[return-value]


def rolling(lm: Any, text: str) -> float:
    """A whole text's log-likelihood in lm-eval's rolling windows of the context size."""
    from lm_eval import utils

    windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
        token_list=lm.tok_encode(text), prefix_token=lm.prefix_token_id,
        max_seq_len=lm.max_length, context_len=1)]
    return sum(lp for lp, _ in score_pairs(lm.model, windows, lm.batch_size))


def until(lm: Any, context: str, kwargs: dict[str, Any]) -> str:
    """One generate_until request through the engine."""
    stops = kwargs.pop("until", None) or []
    stops = [stops] if isinstance(stops, str) else list(stops)
    new = int(kwargs.pop("max_gen_toks", 256))
    sample = kwargs.pop("do_sample", False)
    temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
    ids = (lm.tok_encode(context) or [lm.eot_token_id])[-lm.max_length:]
    (done,), _ = generate(lm.model, lm.enc, [ids], SamplerSettings(temperature=temperature),
                          new, stops=[s for s in stops if s], seed=0)
    text = done.text
    for s in stops:  # lm-eval's own models cut at the first stop string too
        if s and s in text:
            text = text[:text.index(s)]
    return text


def _task_manager(cls: Any, include_path: Path | None, names: list[str]) -> Any:
    """lm-eval's index of tasks: `include_path`'s alone when it has every task named (indexing
    lm-eval's own thousands takes seconds), else with lm-eval's own."""
    if include_path is not None:
        mine = cls(include_path=str(include_path), include_defaults=False)
        if all(n in mine.all_tasks for n in names):
            return mine
    return cls(include_path=str(include_path) if include_path else None)


def run_harness(*, checkpoint: str | None, tasks: str, include_path: Path | None,
                limit: int | None, num_fewshot: int | None, batch_size: int,
                json_path: Path | None, device: str, dtype: str, console: Console
                ) -> dict[str, Any]:
    files.check_output_paths(json=json_path)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks needs one or more task names, comma-separated")
    if include_path is not None and not include_path.is_dir():
        raise UserError(f"--include-path {include_path} is not a directory")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    lm_eval, _ = _lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    manager = _task_manager(TaskManager, include_path, names)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: lm-eval knows no task {', '.join(unknown)} (a task of "
                        "your own: --include-path DIR with its YAML)")
    model, enc, _, _ = load_for_inference(checkpoint, device, dtype)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a task's data is a local file
    try:
        results = lm_eval.simple_evaluate(model=make_lm(model, enc, batch_size), tasks=names,
                                          num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, bootstrap_iters=0)
    except Exception as e:  # a task's YAML or data is the user's: say which, in one line
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"--tasks {tasks}: lm-eval could not run it ({type(e).__name__}: "
                        f"{first})") from None
    console.print(make_table(results))
    if json_path is not None:
        files.atomic_write_text(json_path, json.dumps(
            {k: results[k] for k in ("results", "n-shot", "configs", "versions")
             if k in results}, indent=2, default=str))
    return results
