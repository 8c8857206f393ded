"""Typed configuration: dataclasses whose fields are at once YAML keys, `--set` keys and docs.

Everything is checked before any work starts, so a typo costs a second, not a training run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from minigpt_cli.errors import UserError

# hf: an imported run's own tokenizer.json, run by the tokenizers library (tokenizer_json.py)
TokenizerKind = Literal["bpe", "byte", "gpt2", "r50k_base", "cl100k_base", "o200k_base", "hf"]
Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class DataConfig:
    source: str = "shakespeare"  # 'shakespeare', a .txt file, a directory, a glob, or a .jsonl
    val_fraction: float = 0.1  # the last fraction of each document is held out for validation
    # text: documents, every token a target. chat: a .jsonl of {"messages": [...]}, rendered
    # through the run's chat template, the loss on the assistant's tokens only.
    format: Literal["text", "chat"] = "text"
    # chat: a malformed line or a conversation longer than the context stops the run (error)
    # or is counted, reported and skipped (skip).
    bad_records: Literal["error", "skip"] = "error"


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = "bpe"
    vocab_size: int = 4096  # only for kind=bpe: merges are learned until this size


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128  # context length in tokens
    dropout: float = 0.1  # embedding, attention and residual dropout; only in model.train()
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has
    # Architecture options (minigpt_cli/model/layers.py); the defaults are GPT-2's.
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    position: Literal["learned", "rotary"] = "learned"
    mlp: Literal["gelu", "swiglu", "relu2"] = "gelu"
    qk_norm: bool = False  # RMSNorm on each head's queries and keys
    rope_theta: float = 10000.0  # rotary only: the base of its wavelengths
    mlp_hidden: int = 0  # the MLP's inner width; 0: 4 x n_embd (swiglu: 8/3 x, rounded)
    norm_eps: float = 1e-5  # every norm's epsilon, added to the variance before the root


@dataclass
class ScheduledSamplingConfig:
    """Feed the model's own predictions as inputs during training (Bengio et al. 2015)."""

    max_prob: float = 0.0  # the largest share of inputs replaced; 0 = off
    schedule: Literal["linear", "exponential", "inverse_sigmoid"] = "linear"
    ramp_steps: int = 1000  # steps from 0 to max_prob


@dataclass
class RLConfig:
    """RL fine-tuning (train.objective grpo): sample a group of completions per prompt, score
    each with a reward, and push up the ones that beat their group's mean."""

    prompts: str = ""  # a text file (a prompt a line) or JSONL (prompt + fields, e.g. answer)
    reward: str = "exact"  # a built-in task (reverse, addition, exact) or module:function
    group_size: int = 8  # completions sampled per prompt
    prompts_per_step: int = 16  # x group_size completions a step, sampled in one batch
    max_new_tokens: int = 32
    temperature: float = 1.0  # of the sampled completions
    kl: float = 0.0  # weight of a KL penalty to the starting run (train.init_from); 0: none


@dataclass
class TrainConfig:
    batch_size: int = 32
    grad_accum_steps: int = 1
    max_steps: int = 2000
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 turns clipping off
    # adamw: AdamW on every weight. muon: Muon on the blocks' matrices (orthogonalised
    # momentum), AdamW on embeddings, norms and biases; the same lr and decay serve both.
    optimizer: Literal["adamw", "muon"] = "adamw"
    eval_interval: int = 200
    eval_steps: int = 20
    save_interval: int = 200
    log_interval: int = 10
    # Several ranks (torchrun): ddp replicates the model, fsdp (FSDP2) shards it and its
    # optimizer state. One process ignores it.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    scheduled_sampling: ScheduledSamplingConfig = field(default_factory=ScheduledSamplingConfig)
    # Start from another run's weights (a minigpt run or an imported Hugging Face model): its
    # architecture, weights and tokenizer, with a fresh optimizer and schedule.
    init_from: str = ""
    # lm: teacher forcing on data.source. grpo: RL fine-tuning on the rl section's prompts and
    # reward (data.source is still what evaluations score).
    objective: Literal["lm", "grpo"] = "lm"
    # Experiment trackers that get metrics.jsonl's scalars and the config (training/trackers.py)
    loggers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)


@dataclass
class Config:
    out_dir: str = "runs/tiny"
    seed: int = 1337
    device: Device = "auto"
    dtype: DType = "auto"
    compile: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    # The model keys the YAML and --set named (not dataclass fields: not saved). A run that
    # starts from another (train.init_from) takes that run's architecture; a key named here
    # that disagrees with it is an error, not silently overridden.
    given_model_keys: typing.ClassVar[frozenset[str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nearest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(options)})"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotated type, converting only where YAML is ambiguous."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UserError(f"{where}: '{value}' is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            example = ", ".join(map(str, get_args(get_args(tp)[0])))
            raise UserError(f"{where}: expected a list, e.g. [{example}], got {value!r}")
        return [_coerce(v, get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        # YAML 1.1 reads '1e-3' (no dot) as a string; accept it as the number it clearly is.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        raise NotImplementedError(f"union types are not supported in config ({where})")
    raise NotImplementedError(f"unsupported config type {tp} at {where}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, "
                        f"got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key '{where}'{_nearest(str(key), names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{where}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
    return cls(**kwargs)


def _set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `key.sub=value` to the raw mapping; the value is parsed as YAML."""
    if "=" not in assignment:
        raise UserError(f"--set expects key.sub=value, got '{assignment}'")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: '{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = text


def validate(cfg: Config) -> None:
    """Reject values that type-check but cannot work, naming the key."""
    m, t, d = cfg.model, cfg.train, cfg.data
    checks: list[tuple[bool, str]] = [
        (m.n_layer >= 1, "model.n_layer must be at least 1"),
        (m.n_head >= 1, "model.n_head must be at least 1"),
        (m.n_embd >= 1, "model.n_embd must be at least 1"),
        (m.n_embd % max(m.n_head, 1) == 0,
         f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})"),
        (m.block_size >= 2, "model.block_size must be at least 2"),
        (m.rope_theta > 0, "model.rope_theta must be > 0"),
        (0 < m.norm_eps < 1, "model.norm_eps must be in (0, 1)"),
        (m.mlp_hidden >= 0, "model.mlp_hidden must be >= 0 (0: the default width)"),
        (m.position != "rotary" or (m.n_embd // max(m.n_head, 1)) % 2 == 0,
         "model.position rotary needs an even head width (n_embd / n_head)"),
        (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (0.0 < d.val_fraction < 1.0, "data.val_fraction must be in (0, 1)"),
        (bool(d.source.strip()), "data.source must not be empty"),
        (cfg.tokenizer.kind != "bpe" or 257 <= cfg.tokenizer.vocab_size <= 1_000_000,
         "tokenizer.vocab_size must be between 257 and 1000000 for kind bpe"),
        (t.batch_size >= 1, "train.batch_size must be at least 1"),
        (t.grad_accum_steps >= 1, "train.grad_accum_steps must be at least 1"),
        (t.max_steps >= 1, "train.max_steps must be at least 1"),
        (t.lr > 0, "train.lr must be > 0"),
        (0 <= t.min_lr <= t.lr, "train.min_lr must be in [0, train.lr]"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)"),
        (t.grad_clip >= 0, "train.grad_clip must be >= 0 (0 turns it off)"),
        (t.optimizer != "muon" or t.parallel != "fsdp",
         "train.optimizer muon needs whole matrices: use train.parallel ddp, not fsdp"),
        (t.eval_interval >= 1, "train.eval_interval must be at least 1"),
        (t.eval_steps >= 1, "train.eval_steps must be at least 1"),
        (t.save_interval >= 1, "train.save_interval must be at least 1"),
        (t.log_interval >= 1, "train.log_interval must be at least 1"),
        (0.0 <= t.scheduled_sampling.max_prob <= 1.0,
         "train.scheduled_sampling.max_prob must be in [0, 1]"),
        (t.scheduled_sampling.ramp_steps >= 1,
         "train.scheduled_sampling.ramp_steps must be at least 1"),
        (cfg.seed >= 0, "seed must be >= 0"),
        (t.objective != "grpo" or bool(cfg.rl.prompts.strip()),
         "train.objective grpo needs rl.prompts: a file of prompts"),
        (cfg.rl.group_size >= 2, "rl.group_size must be at least 2 (advantages compare a "
                                 "completion with its group)"),
        (cfg.rl.prompts_per_step >= 1, "rl.prompts_per_step must be at least 1"),
        (cfg.rl.max_new_tokens >= 1, "rl.max_new_tokens must be at least 1"),
        (math.isfinite(cfg.rl.temperature) and cfg.rl.temperature > 0,
         "rl.temperature must be > 0 (RL samples)"),
        (math.isfinite(cfg.rl.kl) and cfg.rl.kl >= 0, "rl.kl must be >= 0"),
        (cfg.rl.kl == 0 or bool(t.init_from), "rl.kl penalises moving away from the starting "
                                              "run: set train.init_from"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    raw = copy.deepcopy(raw)  # overrides go into nested sections: never into the caller's
    for assignment in overrides or []:
        _set_override(raw, assignment)
    cfg = _build(Config, raw, "")
    model = raw.get("model")
    cfg.given_model_keys = frozenset(model) if isinstance(model, dict) else frozenset()
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `--set` overrides, type-check and validate it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p} (try configs/tiny.yaml)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config {p} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise UserError(f"config {p} is not UTF-8 text") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config {p} must be a mapping of keys at the top level")
    return config_from_dict(raw, overrides)
