"""`minigpt eval --task`: how well a run does a task with checkable answers.

Each prompt is answered once greedily and `samples` times sampled (seeded), all through the
engine in one batch; the reward scores every answer. Reported: the mean reward greedy and
sampled, and pass@k, the share of prompts where at least one of the k samples scored 1 or
more (a right answer, for the built-in tasks, which score 1 or 0).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from minigpt_cli import files, tasks
from minigpt_cli.errors import UserError
from minigpt_cli.inference import answers
from minigpt_cli.inference.loading import chat_template, load_for_inference
from minigpt_cli.inference.sampling import SamplerSettings


def run_task_eval(*, checkpoint: str | None, task: str, prompts: str | None, samples: int,
                  max_new_tokens: int, temperature: float, seed: int,
                  json_path: Path | None, device: str, dtype: str, console: Console
                  ) -> dict[str, Any]:
    files.check_output_paths(json=json_path)
    reward = tasks.load_reward(task)
    if prompts is None:
        raise UserError("--task needs --prompts FILE: a prompt a line, or JSONL with 'prompt'")
    items = tasks.read_prompts(prompts)
    if not 1 <= samples <= 1024:
        raise UserError(f"--samples must be in [1, 1024], got {samples}")
    if not 1 <= max_new_tokens <= 4096:
        raise UserError(f"--max-new-tokens must be in [1, 4096], got {max_new_tokens}")
    settings = SamplerSettings(temperature=temperature, top_p=1.0)
    settings.validate()
    if temperature <= 0:
        raise UserError("--temperature must be > 0 for the sampled answers (greedy is always "
                        "reported too)")
    model, enc, meta, path = load_for_inference(checkpoint, device, dtype)
    template = chat_template(meta)
    ids = [answers.prompt_ids(enc, template, p.text) for p in items]
    room = model.config.block_size - max_new_tokens
    if any(len(x) > room for x in ids):
        raise UserError(f"a prompt with --max-new-tokens {max_new_tokens} does not fit the "
                        f"run's context ({model.config.block_size} tokens)")
    greedy = answers.answer(model, enc, template, ids, SamplerSettings(temperature=0.0),
                            max_new_tokens, [None] * len(ids))
    each = [i for i in range(len(items)) for _ in range(samples)]
    sampled = answers.answer(model, enc, template, [ids[i] for i in each], settings,
                             max_new_tokens, [seed * 1_000_003 + k for k in range(len(each))])
    g = [tasks.score(reward, items[i], text) for i, (_, text) in enumerate(greedy)]
    s = [tasks.score(reward, items[i], text) for i, (_, text) in zip(each, sampled,
                                                                    strict=True)]
    solved = [any(s[k] >= 1 for k in range(i * samples, (i + 1) * samples))
              for i in range(len(items))]
    report = {"checkpoint": str(path), "task": task, "prompts": len(items),
              "greedy_mean_reward": statistics.fmean(g),
              "sampled_mean_reward": statistics.fmean(s), "samples": samples,
              "temperature": temperature, f"pass@{samples}": sum(solved) / len(items),
              "template": template is not None,
              "examples": [{"prompt": items[i].text, "greedy": greedy[i][1], "reward": g[i]}
                           for i in range(min(5, len(items)))]}
    _show(console, report, samples)
    if json_path is not None:
        files.atomic_write_text(json_path, files.to_json(report) + "\n")
    return report


def _show(console: Console, report: dict[str, Any], k: int) -> None:
    table = Table(title=f"{report['task']} on {report['prompts']} prompts "
                        f"({'chat template' if report['template'] else 'plain text'})")
    for col in ("greedy mean reward", f"sampled mean reward (T={report['temperature']:g})",
                f"pass@{k}"):
        table.add_column(col, justify="right")
    table.add_row(f"{report['greedy_mean_reward']:.3f}", f"{report['sampled_mean_reward']:.3f}",
                  f"{report[f'pass@{k}']:.3f}")
    console.print(table)
    for ex in report["examples"][:3]:
        console.print(f"  {json.dumps(ex['prompt'])} -> {json.dumps(ex['greedy'])} "
                      f"(reward {ex['reward']:g})")
