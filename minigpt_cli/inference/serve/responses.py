"""OpenAI's response objects for completions and chat, whole and streamed.

A request becomes one or more choices (prompts x n), each backed by one engine sequence.
Streamed, every token event becomes one chunk carrying the text it made printable (possibly
empty while a UTF-8 character or a possible stop string is held back) and, if asked, that
token's log-probability and top alternatives; the web page draws one inspectable span per
chunk. Finish reasons are OpenAI's: `stop` (EOS or a stop string) or `length`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import tiktoken

from minigpt_cli.inference.engine import Sequence, TokenEvent

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
Entry = tuple[int, float | None, list[tuple[int, float]]]  # token, logprob, top alternatives


@dataclass
class Choice:
    index: int
    seq: Sequence
    prefix: str = ""  # echoed prompt text, sent before the first token
    entries: list[Entry] = field(default_factory=list)
    started: bool = False


def token_text(enc: tiktoken.Encoding, token: int) -> str:
    return enc.decode_single_token_bytes(token).decode("utf-8", errors="replace")


class Format:
    """What both endpoints share: ids, usage, and log-probability entries."""
    object_name = ""
    chunk_name = ""

    def __init__(self, enc: tiktoken.Encoding, model: str, id_prefix: str,
                 logprobs: int | None) -> None:
        self.enc, self.model, self.logprobs = enc, model, logprobs
        self.id = f"{id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def envelope(self, name: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model,
                "choices": choices}

    @staticmethod
    def usage(choices: list[Choice], prompt_tokens: int) -> dict:
        completion = sum(len(c.seq.tokens) for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    @staticmethod
    def entry(event: TokenEvent) -> Entry:
        return (event.token, event.logprob, event.top or [])


class CompletionFormat(Format):
    object_name = chunk_name = "text_completion"

    def __init__(self, enc: tiktoken.Encoding, model: str, logprobs: int | None,
                 echo: bool) -> None:
        super().__init__(enc, model, "cmpl", logprobs)
        self.echo = echo

    def _logprobs(self, entries: list[Entry], offset: int) -> dict:
        tokens = [token_text(self.enc, t) for t, _, _ in entries]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{token_text(self.enc, i): v for i, v in top} if lp is not None
                                 else None for _, lp, top in entries],
                "text_offset": offsets}

    def prompt_entries(self, seq: Sequence) -> list[Entry]:
        scored = seq.prompt_logprobs or [(None, [])] * len(seq.prompt)
        return [(t, lp, top) for t, (lp, top) in zip(seq.prompt, scored, strict=True)]

    def chunk(self, choice: Choice, event: TokenEvent) -> dict:
        text, entries = event.text, [self.entry(event)] if event.token >= 0 else []
        if event.finish_reason == "eos":
            entries = []  # the end-of-text token is not part of the completion
        if not choice.started:
            choice.started = True
            text = choice.prefix + text
            if self.echo and self.logprobs is not None:
                entries = self.prompt_entries(choice.seq) + entries
        lp = self._logprobs(entries, 0) if self.logprobs is not None else None
        return self.envelope(self.chunk_name, [{
            "index": choice.index, "text": text, "logprobs": lp,
            "finish_reason": FINISH.get(event.finish_reason or "")}])

    def result(self, choices: list[Choice], prompt_tokens: int) -> dict:
        out = []
        for c in choices:
            entries = [e for e in c.entries if e[0] != self.enc.eot_token]
            if self.echo and self.logprobs is not None:
                entries = self.prompt_entries(c.seq) + entries
            out.append({"index": c.index, "text": c.prefix + c.seq.text,
                        "logprobs": (self._logprobs(entries, 0) if self.logprobs is not None
                                     else None),
                        "finish_reason": FINISH.get(c.seq.finish_reason or "", "stop")})
        body = self.envelope(self.object_name, out)
        body["usage"] = self.usage(choices, prompt_tokens)
        return body


class ChatFormat(Format):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, enc: tiktoken.Encoding, model: str, logprobs: int | None) -> None:
        super().__init__(enc, model, "chatcmpl", logprobs)

    def _token(self, token: int, logprob: float) -> dict:
        raw = self.enc.decode_single_token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}

    def _logprobs(self, entries: list[Entry]) -> dict:
        content = []
        specials = set(getattr(self.enc, "_special_tokens", {}).values())
        for t, lp, top in entries:
            if t == self.enc.eot_token or t in specials or lp is None:  # the end of the turn
                continue
            item = self._token(t, lp)
            item["top_logprobs"] = [self._token(i, v) for i, v in top]
            content.append(item)
        return {"content": content}

    def chunk(self, choice: Choice, event: TokenEvent) -> dict:
        delta: dict = {}
        if not choice.started:
            choice.started = True
            delta["role"] = "assistant"
        if event.text or "role" in delta:
            delta["content"] = event.text
        entries = [self.entry(event)] if event.token >= 0 else []
        return self.envelope(self.chunk_name, [{
            "index": choice.index, "delta": delta,
            "logprobs": self._logprobs(entries) if self.logprobs is not None else None,
            "finish_reason": FINISH.get(event.finish_reason or "")}])

    def result(self, choices: list[Choice], prompt_tokens: int) -> dict:
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.seq.text},
                "logprobs": self._logprobs(c.entries) if self.logprobs is not None else None,
                "finish_reason": FINISH.get(c.seq.finish_reason or "", "stop")}
               for c in choices]
        body = self.envelope(self.object_name, out)
        body["usage"] = self.usage(choices, prompt_tokens)
        return body
