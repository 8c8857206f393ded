"""`minigpt serve`: load a run, listen on 127.0.0.1 unless told otherwise, stop cleanly.

Ctrl-C or SIGTERM first tells the engine to stop; it ends every open request with an error
event, so streams close and uvicorn's graceful shutdown never waits on a generation.
"""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn

from minigpt_cli.errors import UserError
from minigpt_cli.inference.engine import lookup
from minigpt_cli.inference.serve.app import ServeOptions, create_app

# An idle keep-alive connection is kept this long. uvicorn's default, 5 s, is the same as
# httpx's pool expiry, so a client could send its next request on a connection the server
# was closing at that moment ("Server disconnected without sending a response"). The server
# must outlive its clients' pools: they close first, and no request meets a closing socket.
KEEP_ALIVE_S = 75


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        served = self._app.state.served
        if served is not None:
            served.worker.shutdown()  # only sets a flag: safe inside a signal handler
        super().handle_exit(sig, frame)


def _check_port(host: str, port: int) -> None:
    """Fail with one line now, not with uvicorn's log and abort after loading the model."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def run_serve(*, checkpoint: str | None, host: str, port: int, options: ServeOptions,
              device: str, dtype: str, log_level: str = "info", quantize: str = "none") -> None:
    """Check every option and load the model first, so a bad flag or checkpoint is a
    one-line error (exit 2) before anything listens; then serve until Ctrl-C or SIGTERM."""
    from minigpt_cli.inference import native
    from minigpt_cli.inference.loading import chat_template, load_draft, load_for_inference

    if not host:
        raise UserError("--host must not be empty (an empty host would listen on every "
                        "interface): use 127.0.0.1, or 0.0.0.0 on purpose")
    if options.api_key is not None and not options.api_key.strip():
        raise UserError("--api-key (or MINIGPT_API_KEY) is empty: give a key, or leave it unset "
                        "to serve without one")
    if options.model_name is not None and not options.model_name.strip():
        raise UserError("--model-name must not be empty")
    if not 1 <= options.max_batch <= 256:
        raise UserError(f"--max-batch must be in 1..256, got {options.max_batch}")
    if options.max_prefill_tokens is not None and options.max_prefill_tokens < 0:
        raise UserError(f"--max-prefill-tokens must be >= 0, got {options.max_prefill_tokens}")
    lookup.check_options(options.prompt_lookup, options.draft_k, options.draft)
    if options.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {options.max_queue}")
    if options.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {options.max_tokens}")
    if options.max_body_bytes < 1:
        raise UserError(f"--max-body-bytes must be at least 1, got {options.max_body_bytes}")
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    native.check_engine_name(options.engine)
    # Every refusal that needs the model comes before the port check, so a case's own error
    # is what is reported, whatever else holds the port.
    def load() -> tuple[Any, Any, Path, Any, Any]:
        model, enc, meta, found = load_for_inference(checkpoint, device, dtype, quantize)
        draft = (load_draft(options.draft, model, enc, device, dtype, quantize)
                 if options.draft else None)
        native.choose_engine(options.engine, model)
        if draft is not None:
            native.choose_engine(options.engine, draft)
        return model, enc, found, draft, chat_template(meta)

    # On a thread that ends when the model is loaded, not on the main thread, which goes on to
    # run the event loop. libgomp gives each thread that runs a parallel region a team of its
    # own, and when its teams hold more threads than there are CPUs it stops idle workers from
    # spinning: a main-thread team left from loading made the engine's C-step workers sleep
    # and wake at every barrier (docs/benchmarks.md §6: 1.5x fewer token events
    # a second on the tiny model). A thread that ends takes its team with it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="minigpt-load") as pool:
        model, enc, found, draft, fmt = pool.submit(load).result()
    _check_port(host, port)

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    server: list[_Server] = []

    def stop(message: str) -> None:
        server[0].should_exit = True

    app = create_app(lambda: (model, enc, found.parent.name, draft, fmt), options,
                     on_load_error=stop)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S)
    server.append(_Server(config, app))
    server[0].run()
    if app.state.load_error is not None:
        raise UserError(app.state.load_error)
    if not server[0].started:  # uvicorn could not start (it has logged why)
        raise UserError(f"the server could not start on {host}:{port}")
