"""The published OpenAPI schema (`/openapi.json`), made to tell the truth.

FastAPI's own schema says every endpoint answers 200 or 422. This server answers 400 where
FastAPI would say 422, and 401, 404, 413, 429 and 503 besides, always with OpenAI's error
object; it streams server-sent events when asked; `/metrics` is Prometheus text; and the
bounds this server enforces at run time (the largest `max_tokens`, the token ids its
vocabulary has) are in the request schemas, so a client generated from the schema, or a
fuzzer reading it, knows what will be accepted. One bound JSON Schema cannot state is a
prompt's length in tokens: a prompt over it is a 400 with the code `context_length_exceeded`,
documented here in words.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from minigpt_cli.inference.serve.errors import TYPES

STATUSES = {
    400: "Bad request: a field out of range, a body that is not JSON, or a prompt over the "
         "server's limit in tokens (code `context_length_exceeded`).",
    401: "No or wrong API key (when the server was started with one).",
    404: "No such model (the `model` field names another) or route.",
    413: "The request body is over the server's limit.",
    429: "The request queue is full; retry after `Retry-After` seconds.",
    503: "The model is still loading, or the server is shutting down.",
}
SSE = "text/event-stream"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
# Before OpenAPI 3.2, an event stream's schema describes one event (`stream: true`).
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description":
                                     "A chunk as JSON (the response object with a `delta` or "
                                     "its next `text`), or `[DONE]` after the last."}}}


class ErrorDetail(BaseModel):
    message: str
    type: Literal[tuple(sorted(set(TYPES.values()) | {"server_error"}))]  # type: ignore[valid-type]
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every failure the server reports."""
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    model: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    chat_template: bool  # whether chat requests render through the run's own template


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    """A whole completion; streamed, each `data:` event is one of these with one choice's
    next text, `finish_reason` null until its last, then `data: [DONE]`."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    """A whole chat completion; streamed, `chat.completion.chunk` events with a `delta`."""
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/health", "get"): Health, ("/v1/models", "get"): ModelList,
    ("/v1/completions", "post"): Completion, ("/v1/chat/completions", "post"): ChatCompletion,
}
STREAMED = {"/v1/completions", "/v1/chat/completions"}


def _components(spec: dict) -> dict:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in (ErrorResponse, *BODIES.values()):
        found = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(found.pop("$defs", {}))
        schemas[model.__name__] = found
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return schemas


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _responses(path: str, method: str) -> dict:
    ok: dict[str, Any] = {"application/json": {"schema": _ref(BODIES[path, method])}} \
        if (path, method) in BODIES else {}
    if path in STREAMED:
        ok[SSE] = {"schema": SSE_EVENT}
    if path == "/metrics":
        ok = {PROMETHEUS: {"schema": {"type": "string"}}}
    out = {"200": {"description": "OK", "content": ok}}
    statuses = [503] if not path.startswith("/v1/") else [401, 503]
    if method == "post":
        statuses += [400, 404, 413, 429]
    for status in sorted(statuses):
        out[str(status)] = {"description": STATUSES[status],
                            "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    return out


def _bound(schemas: dict, max_tokens: int, n_vocab: int | None) -> None:
    """Write the server's run-time limits into the request schemas."""
    for name in ("CompletionRequest", "ChatRequest"):
        props = schemas[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens"):
            for option in props.get(field, {}).get("anyOf", [props.get(field, {})]):
                if option.get("type") == "integer":
                    option["maximum"] = max_tokens
    if n_vocab is None:
        return

    def ids(node: Any) -> None:  # every integer inside `prompt` is a token id
        if isinstance(node, dict):
            if node.get("type") == "integer":
                node.update(minimum=0, maximum=n_vocab - 1)
            for value in node.values():
                ids(value)
        elif isinstance(node, list):
            for value in node:
                ids(value)

    ids(schemas["CompletionRequest"]["properties"]["prompt"])


def build(app: FastAPI, max_tokens: int, n_vocab: int | None) -> dict:
    """The schema for `app` with this server's limits (`n_vocab` None while loading)."""
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes,
                       description=__doc__.split("\n\n")[0])
    schemas = _components(spec)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            operation["responses"] = _responses(path, method)
    _bound(schemas, max_tokens, n_vocab)
    return spec


def publish(app: FastAPI) -> None:
    """Serve `build`'s schema at /openapi.json, made once the model (and its vocabulary) is
    loaded and kept from then on."""
    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        served = app.state.served
        spec = build(app, app.state.options.max_tokens,
                     None if served is None else served.enc.n_vocab)
        if served is not None:
            app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
