"""The FastAPI application: limits, authentication, error handlers, and the engine's life.

The engine is built (weights packed for the C step, its thread started) on a background
thread after the server starts listening, from whatever `loader()` returns, so `/health`
answers 503 until it is ready (what load balancers and test harnesses poll for).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from minigpt_cli.errors import UserError
from minigpt_cli.inference.engine import Engine
from minigpt_cli.inference.serve import errors, openapi
from minigpt_cli.inference.serve.routes import Served, api, pages
from minigpt_cli.inference.serve.worker import Worker

log = logging.getLogger("minigpt.serve")


@dataclass
class ServeOptions:
    max_batch: int = 16
    max_queue: int = 64
    api_key: str | None = None
    engine: str = "auto"
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's context (block_size)
    max_tokens: int = 4096
    model_name: str | None = None
    max_prefill_tokens: int | None = 16  # prompt tokens started per engine step
    prefill_first: bool = False  # a step that starts prompts runs them alone
    prefix_cache: bool = True  # a prompt reuses what a slot's cache holds of its beginning
    join_mid_step: bool = True  # a request arriving early in a step may join it
    prompt_lookup: int = 0  # speculative decoding by prompt lookup for every request (0: off)
    draft_k: int = 4
    draft: str | None = None  # a draft run for speculative decoding (the loader loads it)


class BodyLimit:
    """413 for a body over the limit, whether it declares its length or streams it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = errors.error_response(413, f"the request body is over {self.limit} bytes",
                                         code="body_too_large")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


# -> (model, encoding, name, draft, chat format or None)
Loader = Callable[[], tuple[object, object, str, object, object]]


def create_app(loader: Loader, options: ServeOptions,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """An app whose model comes from `loader()`, called once on a background thread; if it
    fails, `on_load_error(message)` is called (the CLI stops the server with that line)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker: list[Worker] = []

        def load() -> None:
            try:
                model, enc, name, draft, fmt = loader()
                engine = Engine(model, enc, options.max_batch, engine=options.engine,  # type: ignore[arg-type]
                                max_queue=options.max_queue,
                                prefill_budget=options.max_prefill_tokens,
                                prefill_first=options.prefill_first,
                                prefix_cache=options.prefix_cache,
                                join_mid_step=options.join_mid_step,
                                draft=draft)  # type: ignore[arg-type]
                w = Worker(engine)
                w.start()
                worker.append(w)
                block = model.config.block_size  # type: ignore[attr-defined]
                app.state.served = Served(
                    name=options.model_name or name, enc=enc, worker=w,  # type: ignore[arg-type]
                    block_size=block, max_prompt_tokens=min(options.max_prompt_tokens or block,
                                                            block),
                    max_tokens=options.max_tokens, created=int(time.time()),
                    lookup=options.prompt_lookup, draft_k=options.draft_k,
                    chat=fmt)  # type: ignore[arg-type]
                log.info("serving %s with the %s engine, %d slots", name, engine.engine,
                         options.max_batch)
            except Exception as exc:
                app.state.load_error = str(exc)
                if not isinstance(exc, UserError):
                    log.exception("loading the model failed")
                if on_load_error is not None:
                    on_load_error(str(exc))

        threading.Thread(target=load, name="minigpt-load", daemon=True).start()
        try:
            yield
        finally:
            for w in worker:
                w.join()

    app = FastAPI(title="minigpt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = None
    app.state.options = options
    app.state.load_error = None
    app.add_exception_handler(errors.APIError, errors.on_api_error)
    app.add_exception_handler(RequestValidationError, errors.on_validation_error)
    app.add_exception_handler(StarletteHTTPException, errors.on_http_error)
    app.include_router(pages)
    app.include_router(api)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    openapi.publish(app)
    return app
