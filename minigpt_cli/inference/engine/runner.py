"""The model runner: prefill one cache slot, or run the model once for many slots at once.

Each slot holds one sequence's context window (at most `block_size` tokens) and, with the
cache, that window's keys and values at columns 0..len-1, so every sequence keeps its own
positions and lengths and a step over several slots wastes nothing on padding.

Context overflow policy (cached and uncached alike, so they stay token-identical): when
appending would make a window longer than `block_size`, it keeps its most recent
`block_size // 2` tokens and the slot is re-filled from them in one prefill; decoding then
continues incrementally for another half block. The rule is per slot, so a sequence slides
exactly when it would alone.

Without the cache (`use_cache=False`, the naive loop and our test oracle) every step re-runs
each window whole, left-padded to the longest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from minigpt_cli.inference import native
from minigpt_cli.model.gpt import GPT, KVCache, RowsView

# The one call from the runner up to the engine: at a layer boundary early in a run, which
# waiting prompts join it now. Given how many rows still fit and which columns the run is
# writing (slot -> first column), it returns (slot, prompt) pairs it has placed in free slots.
JoinHook = Callable[[int, dict[int, int]], list[tuple[int, list[int]]]]


@dataclass
class RunOutput:
    """What one `ModelRunner.run` computed, for the engine to sample from."""

    firsts: list[torch.Tensor]  # per prompt started: its next-token logits [V]
    filled: list[int]  # per prompt started: positions computed (the rest was reused)
    logits: torch.Tensor | None  # the decode rows' logits; None without decode rows
    positions: list[int] = field(default_factory=list)  # per decode slot: positions computed
    drafted: list[int] = field(default_factory=list)  # per decode slot: guesses that went in
    # per prompt that joined the run mid-way, in the order the hook gave them: logits, positions
    joined: list[tuple[torch.Tensor, int]] = field(default_factory=list)


class PrefixView:
    """The scheduler's read-only question to the cache when it places a prompt: how much of
    it a free slot can skip. One view serves one admission; it looks up each prompt's best
    copy source (`ModelRunner.shared`) once, however many free slots are asked about it."""

    def __init__(self, runner: ModelRunner, upto: dict[int, int] | None) -> None:
        self._runner = runner
        self._upto = upto
        self._anywhere: dict[int, int] = {}

    def reusable(self, slot: int, prompt: list[int]) -> tuple[int, int]:
        """(how many of the prompt's first tokens `slot` can skip, how many of those its own
        cache holds); the rest it would copy from the slot that holds the most."""
        if id(prompt) not in self._anywhere:
            self._anywhere[id(prompt)] = self._runner.shared(prompt, upto=self._upto)[1]
        own = self._runner.held(slot, prompt)
        return max(own, self._anywhere[id(prompt)]), own


class ModelRunner:
    def __init__(self, model: GPT, n_slots: int, use_cache: bool = True,
                 engine: str = "auto") -> None:
        self.model = model
        self.block_size = model.config.block_size
        self.keep = max(1, self.block_size // 2)
        self.use_cache = use_cache
        p = next(model.parameters())
        self.device = p.device
        self.windows: list[list[int]] = [[] for _ in range(n_slots)]
        self.cache = (KVCache(model.config, n_slots, self.block_size, self.device, p.dtype)
                      if use_cache else None)
        # What runs cached steps: the fused C step (minigpt_cli/inference/native/; it also takes the
        # prompts of `run`) or the model's forward. The uncached loop is always the forward.
        self.engine = native.choose_engine(engine, model, use_cache)
        # The C step's weight layout is packed now, with the runner, not inside the first
        # timed step (0.3 s for GPT-2 124M).
        self._native = native.FusedForward(model) if self.engine == "native" else None
        # This engine's [C, V] head (GPT.head), made now for PyTorch steps so no timed step
        # pays for the copy; an engine on the fused C step makes it only if it needs it.
        self._head_t = model.head_copy() if self.engine == "torch" else None
        self.positions: list[int] = []  # per row of the last call: positions computed
        # Prefix reuse (the engine turns it on): a prompt that starts with what a slot's
        # cache already holds (its own, or another's by copy) computes only the rest. Only
        # on the fused C step, where a row's keys and values do not depend on which call or
        # which other rows computed them, so reusing them changes no output bit; a PyTorch
        # prefill over a whole prompt may round differently from the steps that cached a
        # slot's tokens one by one.
        self.reuse_prefix = False
        # The share of a run's layers after which a late prompt may still join it (the
        # engine's join_mid_step): joining after layer l costs the running rows the time to
        # stream l layers' weights once more, so late in a run waiting is cheaper.
        self.join_share = 0.5
        self._forward_filled: set[int] = set()  # slots whose cache a PyTorch forward filled
        self.prefills = 0  # forward passes over a whole window (a prompt, or a slide)

    def held(self, slot: int, prompt: list[int]) -> int:
        """How many of the prompt's first tokens slot's cache holds already, usable as they
        are: the common prefix of its window and the prompt's, short of the prompt's last
        token, whose logits the first sampled token needs. 0 when reuse is off."""
        if not self.reuse_prefix or self.engine != "native" or slot in self._forward_filled:
            return 0  # a forward's keys and values may differ in the last bit from the C step's
        window, new = self.windows[slot], prompt[-self.block_size:]
        # The longest common prefix by bisection over slice comparisons (C speed): every
        # free slot is asked at each admission, with prompts up to a whole context long.
        lo, hi = 0, min(len(window), len(new) - 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if window[:mid] == new[:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def prefixes(self, upto: dict[int, int] | None = None) -> PrefixView | None:
        """The scheduler's view of what the cache can reuse (None when reuse is off).
        `upto`: see `shared`."""
        return PrefixView(self, upto) if self.reuse_prefix else None

    def shared(self, prompt: list[int], skip: set[int] | frozenset[int] = frozenset(),
               upto: dict[int, int] | None = None) -> tuple[int, int]:
        """(slot, n): the slot, running or free and not in `skip`, that holds the most of
        prompt's beginning, and how much (`held`'s count; (-1, 0) when none holds any). A
        prompt can take those columns from it by copy: a burst of requests that begin alike
        computes the common part once. `upto[s]`: slot s's columns from there on are being
        written by the step in progress, so only those before count."""
        best, most = -1, 0
        for s in range(self.n_slots):
            n = 0 if s in skip else self.held(s, prompt)
            if upto is not None and s in upto:
                n = min(n, upto[s])
            if n > most:
                best, most = s, n
        return best, most

    @property
    def n_slots(self) -> int:
        return len(self.windows)

    @property
    def head_t(self) -> torch.Tensor:
        if self._head_t is None:
            self._head_t = self.model.head_copy()
        return self._head_t

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], all_positions: bool = False
                ) -> torch.Tensor:
        """Start `slot` on `tokens` (its last block_size); next-token logits [V], or with
        `all_positions` the logits after every token [T, V]."""
        self.windows[slot] = list(tokens[-self.block_size:])
        self.positions = [len(self.windows[slot])]
        return self._fill(slot, all_positions)

    def _fill(self, slot: int, all_positions: bool = False) -> torch.Tensor:
        self._forward_filled.add(slot)
        ids = torch.tensor([self.windows[slot]], device=self.device)
        cache = self.cache.slot(slot) if self.cache is not None else None
        out, _ = self.model(ids, cache=cache, last_only=not all_positions, head_t=self.head_t)
        self.prefills += 1
        return out[0] if all_positions else out[0, -1]

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Append tokens[i] to slot slots[i]; next-token logits [len(slots), V]. Read them
        before the next call: the native engine reuses one buffer."""
        slid = [i for i, moved in enumerate(self._append(slots, tokens)) if moved]
        if not self.use_cache:
            self.positions = [len(self.windows[s]) for s in slots]
            return self._uncached(slots)
        if not slid:
            self.positions = [1] * len(slots)
            return self._next_tokens(slots, tokens)
        out = torch.empty(len(slots), self.model.config.vocab_size, device=self.device,
                          dtype=next(self.model.parameters()).dtype)
        self.positions = [1] * len(slots)
        for i in slid:
            out[i] = self._fill(slots[i])
            self.positions[i] = len(self.windows[slots[i]])
        rest = [i for i in range(len(slots)) if i not in slid]
        if rest:
            out[rest] = self._next_tokens([slots[i] for i in rest], [tokens[i] for i in rest])
        return out

    @torch.inference_mode()
    def run(self, prefills: list[tuple[int, list[int]]], slots: list[int], tokens: list[int],
            drafts: list[list[int]] | None = None, join: JoinHook | None = None) -> RunOutput:
        """The model's share of one engine step: start slot s on prompt p for each (s, p) in
        `prefills`, and append tokens[i] to slots[i]. Returns each prompt's next-token logits
        [V] and the decode rows' [len(slots), V], with what was computed for each.

        With the fused C step, prompts are not prefilled one by one: their tokens become rows
        of the same call as the decode rows (chunked prefill), so a new request's first token
        costs about one step, and the running requests do not wait for its prompt.

        `drafts[i]` (cached runs only): guesses appended after tokens[i], one row each, as
        far as the window has room; `drafted[i]` says how many went in. Slot i's rows are
        then 1 + drafted[i] consecutive decode rows, each the logits after its token;
        `truncate` takes back the guesses that were wrong.

        `join` (C step only): asked at layer boundaries early in the run for prompts that
        join it (see `_join_late`); `joined` then holds each one's (next-token logits,
        positions computed). Read the logits before the next call: the C step reuses its
        buffer."""
        self.drafted = [0] * len(slots)
        if self.engine != "native":
            first = [self.prefill(s, p) for s, p in prefills]
            filled = [len(self.windows[s]) for s, _ in prefills]
            logits = None
            if slots and (not self.use_cache or not drafts or not any(drafts)):
                logits = self.decode(slots, tokens)
            elif slots:
                assert drafts is not None
                logits = self._decode_drafts(slots, tokens, drafts)
            return RunOutput(first, filled, logits, list(self.positions) if slots else [],
                             self.drafted)
        rows, filled = self._start(prefills)
        self.positions = []
        moved_all = self._append(slots, tokens)
        for i, (s, t, moved) in enumerate(zip(slots, tokens, moved_all, strict=True)):
            if moved:  # the overflow policy: re-fill the kept half
                rows += self._window_rows(s)
                self.positions.append(len(self.windows[s]))
            else:
                rows.append((t, s, len(self.windows[s]) - 1, True))
                self.positions.append(1)
                guesses = (drafts[i] if drafts else [])[:self.block_size - len(self.windows[s])]
                for g in guesses:  # a slot's rows at consecutive columns share one call
                    self.windows[s].append(g)
                    rows.append((g, s, len(self.windows[s]) - 1, True))
                self.drafted[i] = len(guesses)
        self.prefills += len(prefills) + sum(p > 1 for p in self.positions)
        joined: list[tuple[int, int, int, bool]] = []
        joined_filled: list[int] = []  # per joined prompt: positions computed
        try:
            if join is not None and self.model.config.n_layer > 1 \
                    and len(rows) < self._native.max_rows:  # type: ignore[union-attr]
                logits = self._join_late(rows, join, joined, joined_filled)
            else:
                logits = self._native_rows(rows)
        except Exception:  # the windows say more than the cache holds: let nothing reuse it
            for s in {row[1] for row in rows + joined}:
                self.windows[s] = []
            raise
        n_own = sum(row[3] for row in rows)
        first = len(prefills)
        return RunOutput(list(logits[:first]), filled, logits[first:n_own] if slots else None,
                         self.positions, self.drafted,
                         list(zip(logits[n_own:], joined_filled, strict=True)))

    def _start(self, prefills: list[tuple[int, list[int]]],
               upto: dict[int, int] | None = None
               ) -> tuple[list[tuple[int, int, int, bool]], list[int]]:
        """Point each (slot, prompt)'s window at its prompt and reuse what a cache holds of
        it (its own slot's, or another's by copy; `upto`: see `shared`). The rows that
        compute the rest (token, slot, column = position, wants logits), and how many
        positions each prompt computes."""
        rows: list[tuple[int, int, int, bool]] = []
        filled = []
        refilled = {s for s, _ in prefills}  # their windows stop describing their caches
        for s, p in prefills:
            held = self.held(s, p)
            src, n = self.shared(p, refilled, upto)
            if n > held:  # another slot holds more of it: copy those columns over
                assert self.cache is not None
                self.cache.copy_prefix(src, s, n)
                held = n
            self.windows[s] = list(p[-self.block_size:])
            self._forward_filled.discard(s)  # the C step computes what it does not reuse
            rows += self._window_rows(s)[held:]
            filled.append(len(self.windows[s]) - held)
        return rows, filled

    def _join_late(self, rows: list[tuple[int, int, int, bool]], join: JoinHook,
                   joined: list[tuple[int, int, int, bool]], filled: list[int]
                   ) -> torch.Tensor:
        """Run `rows` through the C step a layer at a time over the first `join_share` of the
        layers, asking `join` after each whether prompts arrived that should join this run
        instead of waiting for the next: a request that comes early in a long step then has
        its first token at the end of this one. Their rows catch up on the layers done so
        far in a call of their own (only they read those weights again), then go on with
        the others; the last call takes every row to the end. `joined` receives the new
        rows and `filled` each joined prompt's positions computed; logits come for every
        wanted row of `rows`, then each joined prompt's last."""
        fused, n_layer = self._native, self.model.config.n_layer
        assert fused is not None and self.cache is not None
        upto: dict[int, int] = {}  # slot -> the first column this run writes

        def writing(new: list[tuple[int, int, int, bool]]) -> None:
            for _, s, c, _ in new:
                upto[s] = min(upto.get(s, c), c)

        writing(rows)
        toks, slots, cols, want = (list(c) for c in zip(*rows, strict=True))
        x: torch.Tensor | None = None
        layer, last = 0, min(n_layer - 1, max(1, round(n_layer * self.join_share)))
        while layer < last:
            # The residual stream stays in the C step's buffer from one call to the next.
            x = fused(toks, cols, slots, cols, self.cache, want, (layer, layer + 1), x)
            layer += 1
            prefills = join(fused.max_rows - len(toks), upto)
            if not prefills:
                continue
            new, counts = self._start(prefills, upto)
            writing(new)
            joined += new
            filled += counts
            self.prefills += len(prefills)
            nt, ns, nc, nw = (list(c) for c in zip(*new, strict=True))
            x = x.clone()  # the catch-up call below reuses the buffer
            x = torch.cat([x, fused(nt, nc, ns, nc, self.cache, nw, (0, layer))])
            toks, slots, cols, want = toks + nt, slots + ns, cols + nc, want + nw
        return fused(toks, cols, slots, cols, self.cache, want, (layer, n_layer), x)

    def _decode_drafts(self, slots: list[int], tokens: list[int], drafts: list[list[int]]
                       ) -> torch.Tensor:
        """The PyTorch form of `run`'s drafts: slots without guesses share one decode step;
        a slot with guesses runs its token and guesses as one forward over its cache slot,
        positions len(window) - 1 onwards, like a prefill that starts mid-window."""
        plain = [i for i, d in enumerate(drafts) if not d]
        rows: list[torch.Tensor] = [torch.empty(0)] * len(slots)
        positions = [1] * len(slots)
        if plain:
            out = self.decode([slots[i] for i in plain], [tokens[i] for i in plain])
            for i, row, n in zip(plain, out, self.positions, strict=True):
                rows[i], positions[i] = row[None], n
        for i in (i for i, d in enumerate(drafts) if d):
            s = slots[i]
            if self._append([s], [tokens[i]])[0]:  # slid: re-fill, no room for guesses here
                rows[i], positions[i] = self._fill(s)[None], len(self.windows[s])
                continue
            start = len(self.windows[s]) - 1
            guesses = drafts[i][:self.block_size - len(self.windows[s])]
            self.windows[s] += guesses
            self.drafted[i] = len(guesses)
            ids = torch.tensor([[tokens[i], *guesses]], device=self.device)
            out, _ = self.model(ids, cache=self.cache.slot(s), start_pos=start, head_t=self.head_t)
            rows[i] = out[0]
        self.positions = positions
        return torch.cat(rows)

    def truncate(self, slot: int, n: int) -> None:
        """Drop the last n tokens of a slot's window (rejected drafts); their cache columns
        are past the window's end, never attended to, and overwritten by the next tokens."""
        if n > 0:
            del self.windows[slot][-n:]

    def _append(self, slots: list[int], tokens: list[int]) -> list[bool]:
        """Append tokens[i] to slot slots[i]'s window; which windows slid (overflow policy)."""
        moved = []
        for s, t in zip(slots, tokens, strict=True):
            w = self.windows[s]
            w.append(t)
            moved.append(len(w) > self.block_size)
            if moved[-1]:
                self.windows[s] = w[-self.keep:]
        return moved

    def _native_rows(self, rows: list[tuple[int, int, int, bool]]) -> torch.Tensor:
        """Run rows through the C step, as many calls as its row limit needs (a long prompt,
        or more slots than one call takes); the wanted rows' logits, in order."""
        assert self._native is not None
        fused, n = self._native, self._native.max_rows
        out = []
        for i in range(0, len(rows), n):
            toks, slots, cols, want = (list(c) for c in zip(*rows[i:i + n], strict=True))
            logits = fused(toks, cols, slots, cols, self.cache, want)
            out.append(logits if len(rows) <= n else logits.clone())  # the buffer is reused
        return out[0] if len(out) == 1 else torch.cat(out)

    def _window_rows(self, slot: int) -> list[tuple[int, int, int, bool]]:
        """The rows that (re)fill a slot from its window; only the last one wants logits."""
        w = self.windows[slot]
        return [(t, slot, k, k == len(w) - 1) for k, t in enumerate(w)]

    def _next_tokens(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One new token per slot, at column (= position) len(window) - 1."""
        assert self.cache is not None
        cols = [len(self.windows[s]) - 1 for s in slots]
        if self.engine == "native":
            return self._native_rows([(t, s, c, True)
                                      for t, s, c in zip(tokens, slots, cols, strict=True)])
        ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(cols, device=self.device)[:, None]
        out, _ = self.model(ids, cache=RowsView(self.cache, slots, cols), pos_ids=pos,
                            last_only=True, head_t=self.head_t)
        return out[:, -1]

    def _uncached(self, slots: list[int]) -> torch.Tensor:
        """The naive loop: every window whole, left-padded to the longest, in one pass."""
        windows = [self.windows[s] for s in slots]
        L = max(len(w) for w in windows)
        pads = [L - len(w) for w in windows]
        ids = torch.tensor([[0] * p + w for p, w in zip(pads, windows, strict=True)],
                           device=self.device)
        pad_t = torch.tensor(pads, device=self.device)[:, None]
        pos = (torch.arange(L, device=self.device)[None, :] - pad_t).clamp(min=0)
        valid = None
        if any(pads):
            valid = torch.arange(L, device=self.device)[None, :] >= pad_t
        out, _ = self.model(ids, pos_ids=pos, key_valid=valid, last_only=True,
                            head_t=self.head_t)
        return out[:, -1]

    def reorder(self, rows: list[int]) -> None:
        """Beam search: slot i becomes a copy of slot rows[i], cache included."""
        self.windows = [list(self.windows[r]) for r in rows]
        if self.cache is not None:
            self.cache.reorder(torch.tensor(rows, device=self.device))
