"""Inference: prefill the prompt once, then one token per step through a KV cache.

`Decoder` owns, for a batch of sequences, each sequence's context window and the static
`KVCache`. With the cache, a step feeds only the new token at its position; without it
(`use_cache=False`, the naive loop and our test oracle) every step re-runs the whole window.

Context overflow policy (both paths, so they stay token-identical): a window holds at most
`block_size` tokens. When appending would exceed that, the window keeps its most recent
`block_size // 2` tokens and the cache is re-filled from them in one prefill; decoding then
continues incrementally for another half block. Windows are per sequence, so a sequence in a
batch slides exactly when it would alone.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import torch

from minigpt_cli import checkpoint as ckpt
from minigpt_cli import native
from minigpt_cli.errors import UserError
from minigpt_cli.model import GPT, KVCache
from minigpt_cli.sampling import SamplerSettings, choose, process


class Decoder:
    """Next-token logits for a batch of growing sequences, with or without a KV cache."""

    def __init__(self, model: GPT, windows: list[list[int]], use_cache: bool = True,
                 engine: str = "auto") -> None:
        self.model = model
        self.block_size = model.config.block_size
        self.keep = max(1, self.block_size // 2)
        self.use_cache = use_cache
        self.device = next(model.parameters()).device
        self.windows = [list(w[-self.block_size:]) for w in windows]
        self.cache: KVCache | None = None
        self.pending: list[int] | None = None  # tokens appended since the last forward
        self.needs_prefill = True
        self.last_positions = 0  # positions the last forward pass computed (for --trace)
        self._cols = 0  # cache columns filled (windows are left-padded to the longest)
        self._valid: torch.Tensor | None = None  # [B, block_size] real-token mask, if padded
        # Which code runs a cached decode step: the fused C step (minigpt_cli/native.py) or
        # the model's forward. Prefill and the uncached loop always use the model's forward.
        self.engine = native.choose_engine(engine, model, len(windows), use_cache)
        self._native: native.NativeStep | None = None

    @property
    def batch_size(self) -> int:
        return len(self.windows)

    def _layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Left-pad the windows: ids [B, L], positions [B, L], key_valid [B, L] or None."""
        L = max(len(w) for w in self.windows)
        pads = [L - len(w) for w in self.windows]
        ids = torch.tensor([[0] * p + w for p, w in zip(pads, self.windows, strict=True)],
                           device=self.device)
        pad_t = torch.tensor(pads, device=self.device)[:, None]
        pos = (torch.arange(L, device=self.device)[None, :] - pad_t).clamp(min=0)
        if not any(pads):
            return ids, pos, None
        valid = torch.ones(self.batch_size, self.block_size, dtype=torch.bool, device=self.device)
        valid[:, :L] = torch.arange(L, device=self.device)[None, :] >= pad_t
        return ids, pos, valid

    @torch.inference_mode()
    def logits(self) -> torch.Tensor:
        """Logits [B, V] for the next token of every sequence. Read them before the next call:
        the native engine reuses one buffer."""
        if self.use_cache and not self.needs_prefill and self.pending is not None:
            return self._decode_step()
        ids, pos, valid = self._layout()
        if self.use_cache:
            if self.cache is None:
                dtype = next(self.model.parameters()).dtype
                self.cache = KVCache(self.model.config, self.batch_size, self.block_size,
                                     self.device, dtype)
            self._cols = ids.size(1)
            self._valid = valid
        out, _ = self.model(ids, cache=self.cache if self.use_cache else None, pos_ids=pos,
                            key_valid=valid, last_only=True)
        self.last_positions = ids.size(1)
        self.needs_prefill = False
        self.pending = None
        return out[:, -1]

    def _decode_step(self) -> torch.Tensor:
        col = self._cols
        assert self.pending is not None and self.cache is not None
        if self._valid is not None:
            self._valid[:, col] = True
        self._cols = col + 1
        self.last_positions = 1
        tokens, self.pending = self.pending, None
        positions = [len(w) - 1 for w in self.windows]
        if self.engine == "native":
            if self._native is None:
                self._native = native.NativeStep(self.model, self.batch_size)
            return self._native(tokens, positions, col, self.cache, self._valid)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        out, _ = self.model(ids, cache=self.cache, start_pos=col, pos_ids=pos,
                            key_valid=self._valid, last_only=True)
        return out[:, -1]

    def append(self, tokens: list[int]) -> None:
        """Add one token to every sequence, sliding any window that would overflow."""
        for w, t in zip(self.windows, tokens, strict=True):
            w.append(t)
        if any(len(w) > self.block_size for w in self.windows):
            for i, w in enumerate(self.windows):
                if len(w) > self.block_size:
                    self.windows[i] = w[-self.keep:]
            self.needs_prefill = True
        self.pending = list(tokens)

    def reorder(self, rows: list[int]) -> None:
        """Beam search: sequence i becomes a copy of sequence rows[i], cache included."""
        self.windows = [list(self.windows[r]) for r in rows]
        if self.cache is not None and not self.needs_prefill:
            index = torch.tensor(rows, device=self.device)
            self.cache.reorder(index)
            if self._valid is not None:
                self._valid = self._valid.index_select(0, index)


class TextStream:
    """Token bytes in, printable text out: holds back bytes that end inside a UTF-8 character,
    and text that may be the start of a stop string, so nothing printed is ever taken back."""

    def __init__(self, enc: tiktoken.Encoding, stops: list[str]) -> None:
        self.enc = enc
        self.stops = [s for s in stops if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far
        self.emitted = 0  # characters already handed out
        self.stopped = False

    def feed(self, token: int, final: bool = False) -> str:
        """Decode one more token; returns the newly printable text."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(self.enc.decode_single_token_bytes(token), final=final)
        return self._release(final)

    def close(self) -> str:
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(True)

    def _release(self, final: bool) -> str:
        for s in self.stops:
            at = self.text.find(s)
            if at != -1:
                self.text, self.stopped, final = self.text[:at], True, True
        hold = 0
        if not final:  # the longest tail of the text that could still grow into a stop string
            for s in self.stops:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted:end], end
        return out


@dataclass
class Completion:
    prompt: str
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # length | eos | stop


@dataclass
class Timings:
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    steps: int = 0
    prefills: int = 0
    engine: str = "torch"  # what ran the cached decode steps: native (C) or torch


@dataclass
class StepInfo:
    """What one decode step did, for --trace: candidates after the filters, and the choice."""
    step: int
    row: int
    candidates: list[tuple[int, float]]
    chosen: int
    positions: int


def _history(decoder: Decoder, n: int) -> torch.Tensor | None:
    if n <= 0:
        return None
    rows = [w[-n:] for w in decoder.windows]
    width = max(len(r) for r in rows)
    return torch.tensor([[-1] * (width - len(r)) + r for r in rows], device=decoder.device)


def generate(
    model: GPT,
    enc: tiktoken.Encoding,
    prompts: list[list[int]],
    settings: SamplerSettings,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    seed: int | None = None,
    stops: list[str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    trace_top: int = 5,
    engine: str = "auto",
) -> tuple[list[Completion], Timings]:
    """Generate for a batch of prompts (token ids); each sequence stops on its own.

    `on_text(row, text)` receives printable text as soon as it is safe to print.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    eot = enc.eot_token
    decoder = Decoder(model, prompts, use_cache=use_cache, engine=engine)
    streams = [TextStream(enc, stops or []) for _ in prompts]
    done = [False] * len(prompts)
    out = [Completion(prompt=enc.decode(p), prompt_tokens=list(p)) for p in prompts]
    timings = Timings(engine=decoder.engine)
    t0 = time.perf_counter()
    t_first = t0
    for step in range(max_new_tokens):
        prefilling = decoder.needs_prefill
        logits = decoder.logits()
        timings.prefills += prefilling
        processed = process(logits, settings, _history(decoder, settings.repeat_last_n
                                                        if settings.repetition_penalty != 1 else 0))
        next_ids = choose(processed, settings, generator).tolist()
        if step == 0:
            t_first = time.perf_counter()
        if on_step is not None:
            probs = torch.softmax(processed, dim=-1)
            top = torch.topk(probs, min(trace_top, probs.size(-1)), dim=-1)
            for row in range(len(prompts)):
                if not done[row]:
                    cands = [(int(i), float(p)) for i, p in
                             zip(top.indices[row].tolist(), top.values[row].tolist(), strict=True)
                             if p > 0]
                    on_step(StepInfo(step, row, cands, next_ids[row], decoder.last_positions))
        for row, token in enumerate(next_ids):
            if done[row]:
                continue
            if token == eot:
                done[row], out[row].finish_reason = True, "eos"
                continue
            out[row].tokens.append(token)
            piece = streams[row].feed(token)
            if piece and on_text is not None:
                on_text(row, piece)
            if streams[row].stopped:
                done[row], out[row].finish_reason = True, "stop"
        timings.steps = step + 1
        if all(done):
            break
        decoder.append([eot if d else t for d, t in zip(done, next_ids, strict=True)])
    for row, stream in enumerate(streams):
        piece = stream.close()
        if piece and on_text is not None:
            on_text(row, piece)
        out[row].text = stream.text
    t_end = time.perf_counter()
    timings.time_to_first_token_s = t_first - t0
    timings.total_s = t_end - t0
    decode_tokens = (timings.steps - 1) * len(prompts)
    timings.decode_tokens_per_s = decode_tokens / (t_end - t_first) if t_end > t_first else 0.0
    return out, timings


@torch.inference_mode()
def beam_search(model: GPT, enc: tiktoken.Encoding, prompt: list[int], num_beams: int,
                max_new_tokens: int, length_penalty: float = 1.0, use_cache: bool = True,
                engine: str = "auto") -> tuple[Completion, Timings]:
    """Deterministic beam search: keep the `num_beams` best partial sequences by summed
    log-probability; finished ones are ranked by score / length**length_penalty."""
    t0 = time.perf_counter()
    eot = enc.eot_token
    decoder = Decoder(model, [prompt] * num_beams, use_cache=use_cache, engine=engine)
    scores = torch.full((num_beams,), float("-inf"), device=decoder.device)
    scores[0] = 0.0  # all beams start identical: expand only the first at step one
    beams: list[list[int]] = [[] for _ in range(num_beams)]
    finished: list[tuple[float, list[int]]] = []
    timings = Timings(engine=decoder.engine)
    for step in range(max_new_tokens):
        logprobs = torch.log_softmax(decoder.logits().float(), dim=-1)
        if step == 0:
            timings.time_to_first_token_s = time.perf_counter() - t0
        total = (scores[:, None] + logprobs).flatten()
        top = torch.topk(total, 2 * num_beams)
        vocab = logprobs.size(-1)
        rows, next_ids, next_scores = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            row, token = divmod(flat, vocab)
            if token == eot:
                n = max(1, len(beams[row]))
                finished.append((score / n ** length_penalty, beams[row]))
                continue
            rows.append(row)
            next_ids.append(token)
            next_scores.append(score)
            if len(rows) == num_beams:
                break
        timings.steps = step + 1
        best_open = max(next_scores) / (len(beams[0]) + 1) ** length_penalty
        if len(finished) >= num_beams and max(f[0] for f in finished) >= best_open:
            break
        beams = [beams[r] + [t] for r, t in zip(rows, next_ids, strict=True)]
        scores = torch.tensor(next_scores, device=decoder.device)
        decoder.reorder(rows)
        decoder.append(next_ids)
    for score, beam in zip(scores.tolist(), beams, strict=True):
        finished.append((score / max(1, len(beam)) ** length_penalty, beam))
    best = max(finished, key=lambda f: f[0])[1]
    reason = "eos" if len(best) < timings.steps else "length"
    timings.total_s = time.perf_counter() - t0
    decode_time = timings.total_s - timings.time_to_first_token_s
    timings.decode_tokens_per_s = (timings.steps - 1) / decode_time if decode_time > 0 else 0.0
    text = enc.decode_bytes(best).decode("utf-8", errors="replace")
    return Completion(prompt=enc.decode(prompt), prompt_tokens=list(prompt), tokens=best,
                      text=text, finish_reason=reason), timings


def find_checkpoint(checkpoint: str | None, runs_dir: Path = Path("runs")) -> Path:
    """A weights file from a run dir, a file path, or (None) the newest run under runs/."""
    if checkpoint is None:
        found = sorted(runs_dir.glob(f"*/{ckpt.MODEL_FILE}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(f"no trained run found under {runs_dir}/: train one first with "
                            "`minigpt train configs/tiny.yaml`, or pass --checkpoint")
        return found[-1]
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / ckpt.MODEL_FILE).is_file():
            raise UserError(f"{path} holds no {ckpt.MODEL_FILE}: is it a minigpt run directory?")
        return path / ckpt.MODEL_FILE
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    return path


def load_for_inference(checkpoint: str | None, device: str = "auto", dtype: str = "auto"
                       ) -> tuple[GPT, tiktoken.Encoding, dict, Path]:
    """Model in eval mode on its device and dtype, with the tokenizer it was trained with."""
    from minigpt_cli import tokenizer as tok
    from minigpt_cli.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = find_checkpoint(checkpoint)
    model, meta = ckpt.load_model(path)
    enc = tok.load(meta["tokenizer"], path.parent)
    model.to(device=dev, dtype=dt).eval()  # eval: dropout off, so equal inputs give equal outputs
    return model, enc, meta, path
