"""The training loop: parallel teacher forcing, AdamW, warmup + cosine, exact resume.

One optimizer step = `grad_accum_steps` forward passes, each over every position of a batch of
windows at once (causal mask, targets shifted by one). Dropout is on (`model.train()`); every
evaluation switches to `model.eval()` + no-grad and back.
"""

from __future__ import annotations

import io
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tiktoken
import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor

from minigpt_cli import files
from minigpt_cli import tokenizer as tok
from minigpt_cli.config import Config
from minigpt_cli.device import DTYPES, keep_freed_memory, resolve_device, synchronize, train_dtype
from minigpt_cli.errors import SaveError, UserError
from minigpt_cli.faults import crash_point
from minigpt_cli.model import store
from minigpt_cli.model.gpt import GPT, GPTConfig
from minigpt_cli.tokenizer import chat
from minigpt_cli.training import (
    chat_data,
    distributed,
    init_from,
    optim,
    run_state,
    scheduled_sampling,
    sharding,
)
from minigpt_cli.training import data as D
from minigpt_cli.training.arithmetic import accumulate_gradients, clip_gradients, evaluate, lr_at
from minigpt_cli.training.objective import Objective
from minigpt_cli.training.trackers import Trackers

# What may change between a run and its resume. New data is how an imported or trained model
# is fine-tuned; the model's shape and tokenizer must stay as they were.
_RESUMABLE_CHANGES = {"train", "data", "rl"}
_RESUMABLE_KEYS = {("model", "dropout")}


def _check_out_dir(run_dir: Path, resume: bool) -> None:
    if resume and not (run_dir / run_state.STATE_JSON).is_file():
        raise UserError(f"nothing to resume in {run_dir}: no {run_state.STATE_JSON} "
                        "(drop --resume to start)")
    # Checked without creating anything: a run refused later (bad data, say) leaves no trace.
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        why = "a file is in the way" if not existing.is_dir() else "permission denied"
        raise UserError(f"out_dir {run_dir} is not writable ({why} at {existing}); choose "
                        "another with --set out_dir=PATH")
    has_run = (run_dir / run_state.STATE_JSON).exists() or (run_dir / store.MODEL_FILE).exists()
    if has_run and not resume:
        raise UserError(f"out_dir {run_dir} already holds a run: add --resume to continue it, "
                        "or --set out_dir=NEW_DIR to start fresh")


def _start_fresh(run_dir: Path) -> None:
    """A new run in a directory with no resume point: whatever a first attempt that died
    before its first commit left (weights, a best file, metric lines) goes, so none of it
    can be read as this run's."""
    run_state.clean_stale_state_files(run_dir)
    (run_dir / store.BEST_FILE).unlink(missing_ok=True)
    files.atomic_write_text(run_dir / run_state.METRICS_FILE, "")


def _check_same_run(run_dir: Path, cfg: Config) -> None:
    """A resume must use the model shape, data and tokenizer the run was started with."""
    path = run_dir / store.CONFIG_FILE
    if not path.is_file():
        return
    saved = yaml.safe_load(path.read_text()) or {}
    now = cfg.to_dict()
    for section, values in now.items():
        if section in _RESUMABLE_CHANGES or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if (section, key) in _RESUMABLE_KEYS:
                continue
            before = (saved.get(section) or {}).get(key, value)
            if before != value:
                raise UserError(f"{run_dir} was trained with {section}.{key}={before}, the config "
                                f"says {value}: use the original config or another out_dir")


def _metrics_after_resume(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """Drop metric lines past the resumed step, so the log reads like one unbroken run."""
    keep = [r for r in run_state.read_metrics(run_dir) if r.get("step", 0) <= step]
    files.atomic_write_text(run_dir / run_state.METRICS_FILE, "".join(files.to_json(r) + "\n"
                                                                  for r in keep))
    return keep


def _last_good(run_dir: Path) -> str:
    """What a user whose save failed still has, and what to do next."""
    step = (run_state.read_state_json(run_dir) or {}).get("step")
    if step is None:
        return "nothing of this run was saved yet: make room (or fix the folder) and start again"
    return (f"the last good checkpoint (step {step}) in {run_dir} is intact: make room (or fix "
            "the folder) and continue with --resume")


def _number(value: Any, default: float) -> float:
    """A loss read back from JSON: null (written for NaN or infinity) is `default`."""
    return default if value is None else float(value)


def _val_field(val_loss: float) -> str:
    """The progress bar's validation loss: nothing until the first evaluation."""
    return f"val {val_loss:.4f}" if math.isfinite(val_loss) else ""


def _run_dtype(cfg: Config, device: torch.device, state: dict[str, Any] | None,
               console: Console) -> tuple[torch.dtype, str]:
    """The precision to train in, and why. A resume keeps the precision its run started with
    (the same steps, to the bit, on the same machine and thread count) unless the config names
    another one explicitly, which is allowed and warned about: from there on the run is no
    longer the one an uninterrupted run would have been."""
    dtype, why = train_dtype(cfg.dtype, device, cfg.model.n_embd, cfg.model.block_size)
    before = (state or {}).get("dtype")
    if before not in DTYPES or DTYPES[before] == dtype:
        return dtype, why
    if cfg.dtype == "auto":
        return DTYPES[before], "auto: what this run started with"
    console.print(f"[yellow]warning:[/] this run trained in {before} until now; it goes on in "
                  f"{cfg.dtype}, as configured, so it will not end as an uninterrupted run would")
    return dtype, why


class _StopFlag:
    """First Ctrl-C asks the loop to save and stop at the next step boundary; a second one
    interrupts at once (atomic writes keep the last checkpoint intact either way)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving; the CLI exits 130."""


@dataclass
class TrainSummary:
    run_dir: str
    step: int
    train_loss: float
    val_loss: float
    val_bpb: float
    best_val_loss: float
    tokens_per_s: float
    seconds: float


def train(cfg: Config, resume: bool = False, console: Console | None = None,
          objective: Objective | None = None) -> TrainSummary:
    """One process, or one rank of a torchrun job (distributed.py); the group is left in the
    end whatever happens, so a failing rank does not hold the others. `objective`: what the
    steps learn from instead of teacher forcing (train.objective grpo; objective.py)."""
    ranks = distributed.from_env(os.environ.get("MINIGPT_DIST_INIT"))
    if distributed.restarted() and (Path(cfg.out_dir) / run_state.STATE_JSON).is_file():
        resume = True  # torchrun restarted the group after a failure: on from the last save
    try:
        return _train(cfg, resume, console or Console(stderr=True), ranks, objective)
    except SaveError as e:
        raise SaveError(f"{e}; {_last_good(Path(cfg.out_dir))}") from None
    except RuntimeError as e:
        lost = distributed.peer_lost(e, ranks)
        if lost is None:
            raise
        raise distributed.PeerLost(f"{lost}; the last checkpoint in {cfg.out_dir} is kept: "
                                   "torchrun --max-restarts N resumes from it, as does "
                                   "--resume") from None
    finally:
        distributed.shutdown(ranks)


def _encoding(cfg: Config, resume: bool, run_dir: Path, corpus: D.Corpus,
              start: init_from.Start | None) -> tuple[tiktoken.Encoding, chat.ChatTemplate | None]:
    """The run's tokenizer and chat template: a resumed run reuses its own saved ones
    (described in the weights' header, imports' too), a run that starts from another takes
    that run's, a new run builds its tokenizer from the corpus. A chat run whose tokenizer
    has no template yet gets the chat tokens and the default template."""
    desc: dict[str, Any] | None = None
    if resume and (run_dir / store.MODEL_FILE).is_file():
        saved = store.read_meta(run_dir / store.MODEL_FILE).get("tokenizer")
        desc = saved if isinstance(saved, dict) and saved.get("kind") == cfg.tokenizer.kind \
            else None
    if desc is not None or start is not None:
        desc = desc if desc is not None else start.tokenizer  # type: ignore[union-attr]
        enc = tok.load(desc, run_dir if start is None or resume else start.run_dir)
        template = chat.ChatTemplate.from_dict(desc.get("chat"))
    elif resume and cfg.tokenizer.kind == "bpe":
        enc, template = tok.load_bpe_file(run_dir / tok.TOKENIZER_FILE), None
    else:
        enc = D.tokenizer_for(corpus, cfg.tokenizer.kind, cfg.tokenizer.vocab_size)
        template = None
    if cfg.data.format == "chat" and template is None:
        if not isinstance(enc, tiktoken.Encoding):
            raise UserError("this imported tokenizer came without a chat template: import a "
                            "model folder whose tokenizer_config.json has one")
        enc, template = tok.with_tokens(enc, chat.CHAT_TOKENS), chat.default_template(tok.EOT)
    return enc, template


class _Run:
    """One training run: what the loop needs at every step, built once (`_train` calls
    `start`, then `loop`, then `summary`). Each method is one part of a step or a save."""

    def __init__(self, cfg: Config, resume: bool, console: Console,
                 ranks: distributed.Ranks, objective: Objective | None = None) -> None:
        self.cfg, self.t, self.ranks, self.console = cfg, cfg.train, ranks, console
        self.objective = objective
        self.t0 = time.perf_counter()
        self.run_dir = Path(cfg.out_dir)
        self.mine = ranks.micro_batches(cfg.train.grad_accum_steps)
        _check_out_dir(self.run_dir, resume)
        self.state: dict[str, Any] | None = None
        self.state_tensors: dict[str, Tensor] = {}
        start = init_from.load(cfg)  # adopts the starting run's architecture, resumed or not
        self.start_from = None if resume else start
        if resume:
            _check_same_run(self.run_dir, cfg)
            self.state, self.state_tensors = run_state.load_train_state(self.run_dir)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and ranks.enabled:
            self.device = torch.device("cuda", ranks.local_rank)
        self.dtype, self.dtype_why = _run_dtype(cfg, self.device, self.state, console)
        self.memory = keep_freed_memory() if self.device.type == "cpu" else ""
        torch.manual_seed(cfg.seed)
        self._data(resume)
        if objective is not None:
            objective.start(self.enc, self.chat_template)
        self._model()
        self.start_step, self.best_val = 0, math.inf
        self.last = {"train_loss": math.nan, "val_loss": math.nan, "val_bpb": math.nan,
                     "loss": math.nan}

    def _data(self, resume: bool) -> None:
        """The tokenizer, the batches the steps draw and the fixed batches evaluations score:
        windows of text, or (data.format chat) whole conversations."""
        cfg = self.cfg
        if cfg.data.format == "chat":
            self._chat_data(resume)
        else:
            corpus = D.load_corpus(cfg.data.source, cfg.data.val_fraction)
            self.enc, self.chat_template = _encoding(cfg, resume, self.run_dir, corpus,
                                                self.start_from)
            self._text_data(corpus)
        self.token_bytes = torch.tensor(tok.token_byte_lengths(self.enc), dtype=torch.float32,
                                        device=self.device)

    def _text_data(self, corpus: D.Corpus) -> None:
        cfg, T, bs = self.cfg, self.cfg.model.block_size, self.t.batch_size
        tokens = D.tokenize_corpus(corpus, self.enc, cfg.tokenizer.kind)
        if len(tokens.val) <= T + 1 or len(tokens.train) <= T + 1:
            raise UserError(f"model.block_size ({T}) is larger than the data (train "
                            f"{len(tokens.train)}, val {len(tokens.val)} tokens): "
                            "lower block_size or add text")
        self.sizes = (len(tokens.train), len(tokens.val))
        self.batch = lambda step, m: D.train_batch(tokens.train, bs, T, cfg.seed, step, m)
        self.val_batches = D.eval_batches(tokens.val, bs, T, self.t.eval_steps)
        self.train_eval_batches = D.eval_batches(tokens.train, bs, T, self.t.eval_steps)

    def _chat_data(self, resume: bool) -> None:
        cfg, T, bs = self.cfg, self.cfg.model.block_size, self.t.batch_size
        skip = cfg.data.bad_records == "skip"
        convs = chat_data.read_conversations(cfg.data.source, cfg.data.val_fraction, skip)
        texts = [m["content"] for c in convs.train for m in c]  # what a new BPE learns from
        corpus = D.Corpus(train=texts, val=[], digest=convs.digest)
        self.enc, template = _encoding(cfg, resume, self.run_dir, corpus, self.start_from)
        assert template is not None
        self.chat_template = template
        train, val = (chat_data.tokenize(self.enc, template, c, T, skip, convs.skipped)
                      for c in (convs.train, convs.val))
        if convs.skipped:
            self.console.print(f"[yellow]skipped {len(convs.skipped)} conversation(s)[/] "
                               f"(data.bad_records skip); the first: "
                               f"{escape(convs.skipped[0])}")
        pad = self.enc.eot_token
        self.sizes = (train.tokens, val.tokens)
        self.batch = lambda step, m: chat_data.train_rows(train, bs, pad, cfg.seed, step, m)
        self.val_batches = chat_data.eval_rows(val, bs, self.t.eval_steps, pad)
        self.train_eval_batches = chat_data.eval_rows(train, bs, self.t.eval_steps, pad)

    def _model(self) -> None:
        self.mcfg = GPTConfig(vocab_size=self.enc.n_vocab, **asdict(self.cfg.model))
        model = GPT(self.mcfg)
        if self.state is not None and self.state_tensors:
            model_sd = {k.removeprefix("model."): v for k, v in self.state_tensors.items()
                        if k.startswith("model.")}
            model = store.build_model(model_sd, asdict(self.mcfg),
                                      self.run_dir / self.state["weights_file"])
        elif self.start_from is not None:
            start = self.start_from
            model = store.build_model(start.tensors(), {**start.model_config,
                                                      "dropout": self.cfg.model.dropout},
                                      start.path)
            model.grow_vocab(self.enc.n_vocab)  # the chat tokens a base tokenizer gained
        self.model = model.to(self.device)
        # DDP wraps the model; FSDP2 shards it in place, before the optimizer sees it.
        self.fwd = distributed.wrap(self.model, self.ranks, self.t.parallel, self.dtype)
        self.sharded = sharding.is_sharded(self.model)
        self.opt = optim.build(self.model, self.t, self.device)

    def start(self) -> None:
        """Pick up the resume state, or set the run directory up; then the last pieces."""
        if self.state is not None:
            self._restore(self.state)
        elif self.ranks.main:
            self._prepare_dir()
        distributed.barrier(self.ranks)  # rank 0 has set the directory up before anyone goes on
        self.fwd = torch.compile(self.fwd) if self.cfg.compile else self.fwd
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.dtype == torch.float16)
        template = self.chat_template
        self.tok_desc = tok.describe(self.enc, self.cfg.tokenizer.kind,
                                     template.to_dict() if template else None)
        # Unbuffered: a line the disk refuses is not held back to fail again at close.
        self.metrics: Any = ((self.run_dir / run_state.METRICS_FILE).open("ab", buffering=0)
                             if self.ranks.main else io.BytesIO())
        self.trackers = Trackers(self.t.loggers if self.ranks.main else [], self.run_dir,
                                 self.cfg.to_dict(), self.start_step, self.console)
        state = self.state
        if state is not None and (run_state.saved_step(self.run_dir / store.MODEL_FILE)
                                  != self.start_step):
            # The run died between committing its resume state and writing model.safetensors.
            full = self.weights()
            if self.ranks.main:
                store.save_model(self.run_dir / store.MODEL_FILE, full, self.model_meta(
                    self.start_step, state.get("val_loss", self.last["val_loss"])))

    def _restore(self, state: dict[str, Any]) -> None:
        run_dir, ranks = self.run_dir, self.ranks
        if self.state_tensors:  # one safetensors file (one process or DDP wrote it)
            sharding.load_optimizer(self.opt, self.state_tensors, state["param_groups"])
        else:  # a DCP directory (FSDP2 wrote it), at whatever world size
            sharding.load(run_dir / state["weights_file"], self.model, self.opt,
                          state["param_groups"])
        run_state.set_rng_state(state["rng"])
        self.start_step = state["step"]
        self.best_val = _number(state.get("best_val_loss"), math.inf)  # null: none yet
        history = _metrics_after_resume(run_dir, self.start_step) if ranks.main else []
        if ranks.main:
            run_state.clean_stale_state_files(run_dir)
        evals = [r for r in history if "val_loss" in r]
        if evals:
            self.last.update({k: _number(evals[-1].get(k), math.nan)
                              for k in ("train_loss", "val_loss", "val_bpb")})
        if self.start_step >= self.t.max_steps:
            self.console.print(f"{escape(str(run_dir))} is already complete at step "
                               f"{self.start_step} (train.max_steps={self.t.max_steps}); raise "
                               "it with --set train.max_steps=N to train further")
        else:
            self.console.print(f"[bold]resuming[/] {escape(str(run_dir))} at step "
                               f"{self.start_step}")

    def _prepare_dir(self) -> None:
        run_dir = self.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"out_dir {run_dir} cannot be created ({e.strerror}); choose "
                            "another with --set out_dir=PATH") from None
        _start_fresh(run_dir)
        files.atomic_write_text(run_dir / store.CONFIG_FILE,
                                yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        if self.cfg.tokenizer.kind == "bpe":
            tok.save_ranks(self.enc, run_dir / tok.TOKENIZER_FILE)
        if self.start_from is not None and self.cfg.tokenizer.kind == "hf":
            tok.copy_tokenizer_file(self.start_from.tokenizer, self.start_from.run_dir, run_dir)

    def log(self, record: dict[str, Any]) -> None:
        try:
            crash_point(f"{run_state.METRICS_FILE}:append")
            self.metrics.write((files.to_json(record) + "\n").encode())
        except OSError as e:
            raise SaveError(f"could not write {self.run_dir / run_state.METRICS_FILE}: "
                            f"{e.strerror}") from None
        self.trackers.log(record)

    def model_meta(self, step: int, val_loss: float | None) -> dict[str, Any]:
        """What makes a weights file self-describing: shape, tokenizer, provenance."""
        return {"model_config": asdict(self.mcfg), "tokenizer": self.tok_desc, "step": step,
                "val_loss": val_loss, "config": self.cfg.to_dict()}

    def weights(self) -> dict[str, Tensor]:
        """The whole model for rank 0 to write (sharded, every rank takes part in gathering)."""
        return sharding.full_tensors(self.model) if self.sharded or self.ranks.main else {}

    def save(self, step: int, val_loss: float | None) -> None:
        full, run_dir, ranks = self.weights(), self.run_dir, self.ranks
        info = {"step": step, "best_val_loss": self.best_val, "seed": self.cfg.seed,
                "val_loss": val_loss, "dtype": str(self.dtype).removeprefix("torch."),
                # Batches are a pure function of (seed, step): the next step is the position.
                "data": {"sampler": "random-windows", "next_step": step}}
        # The resume state is the commit point, so it goes first: a crash before it leaves the
        # previous state (or, on a first save, a directory a fresh start may reuse); a crash
        # after it leaves model.safetensors one save behind, which a resume rewrites.
        if self.sharded:  # each rank writes its shards; rank 0 commits
            name = sharding.save(run_dir, step, self.model, self.opt, ranks.main)
            if ranks.main:
                run_state.commit_train_state(run_dir, name,
                                             self.opt.state_dict()["param_groups"], info)
        elif ranks.main:
            run_state.save_train_state(run_dir, full, self.opt, info)
        if ranks.main:
            store.save_model(run_dir / store.MODEL_FILE, full, self.model_meta(step, val_loss))
        distributed.barrier(ranks)  # saved before any rank goes on (or stops)

    def micro_batches(self, step: int, ss_prob: float) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's micro-batches, each a function of (seed, step, global index) alone:
        its windows, its dropout masks, and (scheduled sampling) its own-prediction inputs."""
        cfg = self.cfg
        for m in self.mine:
            x, y = self.batch(step, m)
            torch.manual_seed(D.micro_seed(cfg.seed, step, m) ^ 0xD209)
            if ss_prob > 0:  # scheduled sampling: a no-grad pass first, then mixed inputs
                x = scheduled_sampling.own_predictions_as_inputs(
                    self.fwd, x, ss_prob, cfg.seed, step, m, self.device, self.dtype)
            yield x, y

    def optimizer_step(self, step: int) -> tuple[float, Tensor, Tensor | None, float]:
        """One step's teacher-forced passes, clipping and update: (lr, mean loss, grad norm,
        scheduled-sampling probability)."""
        lr = lr_at(step, self.t)
        for group in self.opt.param_groups:
            group["lr"] = lr
        ss_prob = scheduled_sampling.probability(step, self.t.scheduled_sampling)
        if self.objective is not None:
            loss = self.objective.loss(self.model, self.fwd, step, self.device, self.dtype)
            self.scaler.scale(loss).backward()
            mean_loss = loss.detach()
        else:
            mean_loss = accumulate_gradients(self.fwd, self.micro_batches(step, ss_prob),
                                             len(self.mine), self.scaler, self.device,
                                             self.dtype)
        grad_norm = clip_gradients(self.model, self.opt, self.scaler, self.t.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return lr, mean_loss, grad_norm, ss_prob

    def evaluate_and_keep_best(self, step: int) -> float:
        """Train and val loss (each rank scores a share), logged; the best weights kept."""
        judge = self.model if self.ranks.enabled else self.fwd
        args = (self.token_bytes, self.device, self.dtype, self.ranks)
        tr = evaluate(judge, self.train_eval_batches, *args)
        va = evaluate(judge, self.val_batches, *args)
        self.last.update(train_loss=tr.loss, val_loss=va.loss, val_bpb=va.bpb)
        self.log({"step": step, "train_loss": tr.loss, "val_loss": va.loss, "val_bpb": va.bpb})
        if va.loss < self.best_val:
            self.best_val = va.loss
            full = self.weights()
            if self.ranks.main:
                store.save_model(self.run_dir / store.BEST_FILE, full,
                                 self.model_meta(step, va.loss))
        if not self.console.is_terminal:
            self.console.print(f"step {step}: train {tr.loss:.4f}  val {va.loss:.4f}  "
                               f"val bpb {va.bpb:.4f}  {self.tps:,.0f} tok/s")
        return va.loss

    def header(self) -> None:
        t, T, ranks = self.t, self.cfg.model.block_size, self.ranks
        self.console.print(
            f"[bold]training[/] {self.model.num_params() / 1e6:.2f}M params on {self.device} "
            f"({str(self.dtype).removeprefix('torch.')}: {self.dtype_why}), vocab "
            f"{self.enc.n_vocab}, {self.sizes[0]:,} train / {self.sizes[1]:,} val tokens"
            + (" (chat: the loss on the assistant's tokens)" if self.cfg.data.format == "chat"
               else "") + (f"; {self.memory}" if self.memory else ""))
        self.console.print(
            f"global batch {t.batch_size} x {T} tokens x {t.grad_accum_steps} "
            f"micro-batches = {self.tokens_per_step:,} tokens per step"
            + (f", over {ranks.world} ranks ({len(self.mine)} micro-batches each, "
               f"{'FSDP2' if self.sharded else 'DDP'})" if ranks.enabled else ""))

    @property
    def tokens_per_step(self) -> int:
        return self.t.batch_size * self.cfg.model.block_size * self.t.grad_accum_steps

    def loop(self) -> tuple[int, float]:
        """Steps until max_steps (or a Ctrl-C, saved first); returns (last step, tokens/s)."""
        t = self.t
        progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[val]}  "
                       "lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
            TimeRemainingColumn(), console=self.console, transient=False)
        self.model.train()
        step, self.tps = self.start_step, 0.0
        # The throughput window: when it began, and the steps taken in it.
        self.window_start, self.window_steps = time.perf_counter(), 0
        with _StopFlag() as stop, progress, self.metrics, self.trackers:
            task = progress.add_task("train", total=t.max_steps, completed=step, loss=math.nan,
                                     val=self.shown(), lr=0.0, tps=0.0)
            while step < t.max_steps:
                lr, mean_loss, grad_norm, ss_prob = self.optimizer_step(step)
                step += 1
                # Read the Ctrl-C flag once: a signal landing later is handled at the next
                # boundary, so "stop" always means "saved first".
                stopping = distributed.any_rank(stop.requested, self.ranks)
                self.after_step(step, stopping, lr, mean_loss, grad_norm, ss_prob)
                progress.update(task, completed=step, loss=self.last["loss"],
                                val=self.shown(), lr=lr, tps=self.tps)
                if stopping and step < t.max_steps:
                    raise Interrupted(f"interrupted at step {step}; checkpoint saved in "
                                      f"{self.run_dir}: continue with --resume")
        return step, self.tps

    def shown(self) -> str:
        """The progress bar's middle: the last validation loss, and an objective's own figures
        (RL: the mean reward of the last step's samples and its spread)."""
        stats = self.objective.stats() if self.objective is not None else {}
        reward = (f"  reward {stats['reward_mean']:.3f}±{stats['reward_std']:.3f}"
                  if "reward_mean" in stats else "")
        return _val_field(self.last["val_loss"]) + reward

    def after_step(self, step: int, stopping: bool, lr: float, mean_loss: Tensor,
                   grad_norm: Tensor | None, ss_prob: float) -> None:
        """What a step boundary owes: the log line, an evaluation, a save, when they are due."""
        t = self.t
        self.window_steps += 1
        is_eval = step % t.eval_interval == 0 or step == t.max_steps
        is_save = step % t.save_interval == 0 or step == t.max_steps or stopping
        if step % t.log_interval == 0 or is_eval or is_save:
            self.log_step(step, lr, mean_loss, grad_norm, ss_prob)
        val_loss = None
        if is_eval:
            val_loss = self.evaluate_and_keep_best(step)
            self.window_start = time.perf_counter()  # evaluation is not training throughput
        if is_save:
            self.save(step, val_loss if val_loss is not None else self.last["val_loss"])

    def log_step(self, step: int, lr: float, mean_loss: Tensor, grad_norm: Tensor | None,
                 ss_prob: float) -> None:
        train_loss = distributed.all_sum([mean_loss.item()], self.ranks)[0] / self.ranks.world
        if not math.isfinite(train_loss):
            raise UserError(f"loss became {train_loss} at step {step}; the last good "
                            f"checkpoint in {self.run_dir} is kept: lower train.lr or use "
                            "dtype float32")
        synchronize(self.device)
        now = time.perf_counter()
        self.tps = self.window_steps * self.tokens_per_step / (now - self.window_start)
        self.window_start, self.window_steps = now, 0
        self.last["loss"] = train_loss
        norm = None if grad_norm is None else grad_norm.item()
        self.log({"step": step, "loss": train_loss, "lr": lr, "grad_norm": norm,
                  "tokens_per_s": self.tps, "elapsed_s": now - self.t0,
                  **({"scheduled_sampling_prob": ss_prob} if ss_prob > 0 else {}),
                  **(self.objective.stats() if self.objective is not None else {})})

    def summary(self, step: int, tps: float) -> TrainSummary:
        last, run_dir = self.last, self.run_dir
        summary = TrainSummary(run_dir=str(run_dir), step=step, train_loss=last["train_loss"],
                               val_loss=last["val_loss"], val_bpb=last["val_bpb"],
                               best_val_loss=self.best_val, tokens_per_s=tps,
                               seconds=time.perf_counter() - self.t0)
        table = Table(title=f"run {escape(str(run_dir))}", show_header=False)
        for name, value in (("steps", f"{step}"), ("train loss", f"{summary.train_loss:.4f}"),
                            ("val loss", f"{summary.val_loss:.4f}"),
                            ("val bits/byte", f"{summary.val_bpb:.4f}"),
                            ("best val loss", f"{self.best_val:.4f}"),
                            ("throughput", f"{tps:,.0f} tok/s"),
                            ("wall time", f"{summary.seconds:.1f} s"),
                            ("weights", str(run_dir / store.MODEL_FILE))):
            table.add_row(name, escape(value))
        self.console.print(table)
        return summary


def _train(cfg: Config, resume: bool, console: Console, ranks: distributed.Ranks,
           objective: Objective | None) -> TrainSummary:
    if not ranks.main:  # rank 0 speaks for the job
        console = Console(file=io.StringIO())
    if cfg.train.objective != "lm" and objective is None:
        raise UserError(f"train.objective {cfg.train.objective} needs its objective object "
                        "(minigpt_cli.rl builds it; `minigpt train` does so)")
    if objective is not None and ranks.enabled:
        raise UserError("train.objective grpo runs in one process: start it without torchrun")
    run = _Run(cfg, resume, console, ranks, objective)
    run.start()
    run.header()
    step, tps = run.loop()
    return run.summary(step, tps)
