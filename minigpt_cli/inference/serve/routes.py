"""The endpoints: OpenAI's completions and chat, models, health, metrics and the web page.

A request is tokenized and checked here (bad input is a 4xx before the engine sees it),
becomes one engine sequence per choice, and is answered whole or as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources

import tiktoken
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from minigpt_cli import tokenizer as tok
from minigpt_cli.errors import UserError
from minigpt_cli.inference import constraints
from minigpt_cli.inference.engine import QueueFull, Sequence, TokenEvent
from minigpt_cli.inference.serve import chat
from minigpt_cli.inference.serve.errors import APIError, error_body
from minigpt_cli.inference.serve.responses import ChatFormat, Choice, CompletionFormat, Format
from minigpt_cli.inference.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    Sampling,
    response_format_dict,
)
from minigpt_cli.inference.serve.worker import SHUTDOWN, Worker
from minigpt_cli.tokenizer import chat as templates

KEEPALIVE_S = 5.0  # an SSE comment this often while a request waits: finds gone clients
CHAT_MAX_TOKENS = 256  # default when a chat request names no limit
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions


@dataclass
class Served:
    """What a loaded server serves, and its limits."""
    name: str
    enc: tiktoken.Encoding
    worker: Worker
    block_size: int
    max_prompt_tokens: int
    max_tokens: int
    created: int
    lookup: int = 0  # prompt lookup n-gram for every request (0: off)
    draft_k: int = 4
    chat: templates.ChatTemplate | None = None  # the run's template; None: the plain script


def served(request: Request) -> Served:
    s = request.app.state.served
    if s is None:
        raise APIError(503, "the model is still loading; retry shortly", code="loading",
                       headers={"Retry-After": "1"})
    if s.worker.stopping:
        raise APIError(503, SHUTDOWN, code="shutting_down")
    return s


def check_key(request: Request) -> None:
    key = request.app.state.options.api_key
    if key and request.headers.get("authorization", "") != f"Bearer {key}":
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


pages = APIRouter()
api = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])


@pages.get("/", response_class=HTMLResponse, include_in_schema=False)
def index() -> HTMLResponse:
    page = resources.files("minigpt_cli.inference.serve").joinpath("static/index.html")
    return HTMLResponse(page.read_text(encoding="utf-8"))


@pages.get("/health")
def health(request: Request) -> dict:
    s = served(request)
    return {"status": "ok", "model": s.name}


@pages.get("/metrics")
def metrics(request: Request) -> Response:
    body, content_type = served(request).worker.metrics.render()
    return Response(body, media_type=content_type)


@api.get("/models")
def models(request: Request) -> dict:
    s = served(request)
    return {"object": "list", "data": [{"id": s.name, "object": "model", "created": s.created,
                                        "owned_by": "minigpt", "max_model_len": s.block_size,
                                        "chat_template": s.chat is not None}]}


def _check_model(s: Served, body: Sampling) -> None:
    if body.model is not None and body.model != s.name:
        raise APIError(404, f"the model '{body.model}' does not exist; this server serves "
                       f"'{s.name}'", param="model", code="model_not_found")


def _tokens(s: Served, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = tok.encode(s.enc, prompt) or [s.enc.eot_token]  # empty: a new document
    else:
        ids = list(prompt) or [s.enc.eot_token]
        if any(not 0 <= t < s.enc.n_vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {s.enc.n_vocab})",
                           param="prompt", code="invalid_value")
    if len(ids) > s.max_prompt_tokens:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at most "
                       f"{s.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
    return ids


def _max_tokens(s: Served, n: int, param: str) -> int:
    if n > s.max_tokens:
        raise APIError(400, f"{param} is {n}; this server allows at most {s.max_tokens}",
                       param=param, code="invalid_value")
    return n


def _sequences(s: Served, body: Sampling, prompts: list[list[int]], max_tokens: int,
               stops: list[str], logprobs: int | None, echo_logprobs: bool = False,
               stop_ids: frozenset[int] = frozenset()) -> list[Sequence]:
    """One sequence per choice, prompt-major like OpenAI; choice j of a seeded request
    samples with seed + j, so n choices differ and each is reproducible."""
    grammar = _constraint(_grammar(body), s, stop_ids | {s.enc.eot_token})
    return [Sequence(prompt=p, settings=body.sampler(), max_tokens=max_tokens, stops=stops,
                     seed=None if body.seed is None else body.seed + j, logprobs=logprobs,
                     echo_logprobs=echo_logprobs, lookup=s.lookup, draft_k=s.draft_k,
                     stop_ids=stop_ids, constraint=grammar.copy() if grammar else None)
            for p in prompts for j in range(body.n)]


def _grammar(body: Sampling) -> constraints.Grammar | None:
    try:
        return constraints.from_response_format(response_format_dict(body.response_format))
    except UserError as e:
        raise APIError(400, str(e), param="response_format", code="invalid_value") from None


def _constraint(grammar: constraints.Grammar | None, s: Served, ends: frozenset[int]
                ) -> constraints.Constraint | None:
    """The request's grammar, compiled once (each choice takes a copy). A schema the grammar
    engine rejects is a 400 with its own code: the published OpenAPI schema can say "an
    object", not "a JSON schema the engine supports"."""
    try:
        return constraints.constraint(grammar, s.enc, ends)
    except UserError as e:
        raise APIError(400, str(e), param="response_format", code="invalid_json_schema"
                       ) from None


async def _run(request: Request, s: Served, fmt: Format, choices: list[Choice],
               prompt_tokens: int, stream: bool, include_usage: bool) -> Response:
    seqs = [c.seq for c in choices]
    try:
        events = s.worker.submit(seqs)
    except QueueFull as exc:
        raise APIError(429, f"the server is busy: {exc}; retry shortly", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    by_seq = {c.seq.id: c for c in choices}
    if stream:
        return StreamingResponse(_sse(s, fmt, choices, by_seq, events, prompt_tokens,
                                      include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pending = len(choices)
    try:
        while pending:
            got = await _next(events)
            if got is None:
                if await request.is_disconnected():
                    return Response(status_code=499)
                continue
            seq, event = got
            choice = by_seq[seq.id]
            if event.token >= 0:
                choice.entries.append(fmt.entry(event))
            if event.finish_reason is not None:
                pending -= 1
                if event.finish_reason == "error":
                    return _failure(seq)
    finally:
        s.worker.cancel(seqs)
    return JSONResponse(fmt.result(choices, prompt_tokens))


async def _next(events: asyncio.Queue[tuple[Sequence, TokenEvent]]
                ) -> tuple[Sequence, TokenEvent] | None:
    """The next event, or None after KEEPALIVE_S without one (time to check on the client)."""
    try:
        return await asyncio.wait_for(events.get(), KEEPALIVE_S)
    except TimeoutError:
        return None


def _failure(seq: Sequence) -> JSONResponse:
    if seq.error == SHUTDOWN:
        return JSONResponse(error_body(503, SHUTDOWN, code="shutting_down"), status_code=503)
    return JSONResponse(error_body(500, "generation failed inside the server", code="internal"),
                        status_code=500)


def _data(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(s: Served, fmt: Format, choices: list[Choice], by_seq: dict[int, Choice],
               events: asyncio.Queue[tuple[Sequence, TokenEvent]], prompt_tokens: int,
               include_usage: bool) -> AsyncIterator[str]:
    """One `data:` event per token; a client that goes away closes this generator at its
    next send, and `finally` frees its slots at the engine's next step."""
    pending = len(choices)
    try:
        while pending:
            got = await _next(events)
            if got is None:
                yield ": keep-alive\n\n"
                continue
            seq, event = got
            out = []
            while True:  # every event already here goes out in one write
                if event.finish_reason == "error":
                    message = seq.error if seq.error == SHUTDOWN else "generation failed"
                    out.append(_data(error_body(503 if seq.error == SHUTDOWN else 500, message)))
                    yield "".join(out) + _data("[DONE]")
                    return
                if event.finish_reason is not None:
                    pending -= 1
                out.append(_data(fmt.chunk(by_seq[seq.id], event)))
                if events.empty():
                    break
                seq, event = events.get_nowait()
            yield "".join(out)
        if include_usage:
            body = fmt.envelope(fmt.chunk_name, [])
            body["usage"] = fmt.usage(choices, prompt_tokens)
            yield _data(body)
        yield _data("[DONE]")
    finally:
        s.worker.cancel([c.seq for c in choices])


@api.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    s = served(request)
    _check_model(s, body)
    p = body.prompt  # one string, one token list, or a list of either
    single = isinstance(p, str) or isinstance(p[0], int)
    prompts = [_tokens(s, x) for x in ([p] if single else p)]  # type: ignore[list-item]
    max_tokens = (_max_tokens(s, body.max_tokens, "max_tokens") if body.max_tokens
                  else min(COMPLETION_MAX_TOKENS, s.max_tokens))
    echo_lp = body.echo and body.logprobs is not None
    seqs = _sequences(s, body, prompts, max_tokens, body.stop or [], body.logprobs, echo_lp)
    fmt = CompletionFormat(s.enc, s.name, body.logprobs, body.echo)
    choices = [Choice(i, seq, prefix=s.enc.decode(seq.prompt) if body.echo else "")
               for i, seq in enumerate(seqs)]
    return await _run(request, s, fmt, choices, sum(len(x) for x in prompts), body.stream,
                      body.include_usage)


def _chat_prompt(s: Served, body: ChatRequest) -> tuple[list[int], list[str], frozenset[int]]:
    """The prompt ids, stop strings and stop ids of a chat request: through the run's chat
    template, ending at its end-of-turn token; or, for a base run without one, as the
    plain-text script it can continue (serve/chat.py)."""
    stops = list(body.stop or [])
    if s.chat is None:
        script = chat.render((m.role, m.text) for m in body.messages)
        return _tokens(s, script), list(dict.fromkeys(stops + chat.STOPS)), frozenset()
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text}
                for m in body.messages]
    try:
        ids = templates.prompt_ids(s.enc, s.chat, messages)
    except UserError as e:
        raise APIError(400, str(e), param="messages", code="invalid_value") from None
    _tokens(s, ids)  # the same length check as any prompt
    return ids, stops, templates.stop_ids(s.enc, s.chat)


@api.post("/chat/completions")
async def chat_completions(body: ChatRequest, request: Request) -> Response:
    s = served(request)
    _check_model(s, body)
    prompt, stops, stop_ids = _chat_prompt(s, body)
    for field in ("max_tokens", "max_completion_tokens"):  # both are checked, if given
        if getattr(body, field) is not None:
            _max_tokens(s, getattr(body, field), field)
    max_tokens = (body.max_completion_tokens or body.max_tokens
                  or min(CHAT_MAX_TOKENS, s.max_tokens))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    seqs = _sequences(s, body, [prompt], max_tokens, stops, logprobs, stop_ids=stop_ids)
    fmt = ChatFormat(s.enc, s.name, logprobs)
    choices = [Choice(i, seq) for i, seq in enumerate(seqs)]
    return await _run(request, s, fmt, choices, len(prompt), body.stream, body.include_usage)
