"""Tasks with checkable answers: prompt sets, and the rewards that score a completion.

A reward is a function `reward(prompt, completion, **fields) -> float`, where `fields` are the
prompt's other JSONL fields (an `answer`, say). Built-in tasks are named (`reverse`,
`addition`, `exact`); a user's own is `module:function`, imported as Python imports it, or
`path/to/file.py:function`. RL fine-tuning (`train.objective: grpo`) maximises a reward;
`minigpt eval --task` reports it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt_cli.errors import UserError

Reward = Callable[..., float]


@dataclass
class Prompt:
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


def _answer_of(prompt: str, fields: dict[str, Any], derive: Callable[[str], str]) -> str:
    answer = fields.get("answer")
    return str(answer) if answer is not None else derive(prompt)


def reverse(prompt: str, completion: str, **fields: Any) -> float:
    """1 when the completion is the prompt's word ("reverse WORD") spelled backwards."""
    word = prompt.rsplit(" ", 1)[-1]
    return float(completion.strip() == _answer_of(prompt, fields, lambda _: word[::-1]))


def _sum(prompt: str) -> str:
    left, _, right = prompt.rstrip(" =").partition("+")
    return str(int(left) + int(right))


def addition(prompt: str, completion: str, **fields: Any) -> float:
    """1 when the completion is the sum the prompt ("A+B=") asks for."""
    return float(completion.strip() == _answer_of(prompt, fields, _sum))


def exact(prompt: str, completion: str, answer: Any = None, **fields: Any) -> float:
    """1 when the completion is the prompt's `answer` field, whitespace aside."""
    if answer is None:
        raise UserError("reward exact needs an 'answer' field on every prompt (JSONL)")
    return float(completion.strip() == str(answer).strip())


BUILTIN: dict[str, Reward] = {"reverse": reverse, "addition": addition, "exact": exact}


def load_reward(spec: str) -> Reward:
    """A built-in reward by name, or `module:function` / `file.py:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UserError(f"reward '{spec}' is neither a built-in task ({', '.join(BUILTIN)}) "
                        "nor module:function")
    try:
        if where.endswith(".py"):
            loaded = importlib.util.spec_from_file_location(Path(where).stem, where)
            if loaded is None or loaded.loader is None:
                raise ImportError(where)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (ImportError, FileNotFoundError, SyntaxError) as e:
        raise UserError(f"reward '{spec}': cannot import {where} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"reward '{spec}': {where} has no function {name}")
    return fn


def score(reward: Reward, prompt: Prompt, completion: str) -> float:
    """The reward of one completion, checked: a reward that raises or returns something other
    than a finite number is the user's bug, reported in one line."""
    try:
        value = reward(prompt.text, completion, **prompt.fields)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"the reward raised {type(e).__name__}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"the reward returned {value!r}, not a finite number")
    return float(value)


def read_prompts(path: str) -> list[Prompt]:
    """Prompts from a text file (one per line) or JSONL (`prompt`, and any other fields the
    reward may use, e.g. `answer`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"prompts file {p} not found")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if p.suffix != ".jsonl":
        prompts = [Prompt(ln) for ln in lines]
    else:
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{p}:{n} is not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise UserError(f"{p}:{n} needs a string field 'prompt'")
            prompts.append(Prompt(obj.pop("prompt"), obj))
    if not prompts:
        raise UserError(f"prompts file {p} holds no prompts")
    return prompts


def make(task: str, n: int, seed: int) -> list[Prompt]:
    """n prompts of a built-in task with their answers: for demos and tests."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if task == "reverse":
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                           for _ in range(rng.randint(3, 6)))
            out.append(Prompt(f"reverse {word}", {"answer": word[::-1]}))
        elif task == "addition":
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            out.append(Prompt(f"{a}+{b}=", {"answer": str(a + b)}))
        else:
            raise UserError(f"no built-in prompt maker for task '{task}'")
    return out
