"""OpenAI's error object, for every failure the server reports.

`{"error": {"message", "type", "param", "code"}}` with the HTTP status that fits: 400 bad
request, 401 no or wrong API key, 404 unknown model or route, 413 body too large, 429 queue
full, 503 not ready or shutting down. Bad input never reaches a 500.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """pydantic's first complaint as one sentence, naming the field."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return error_response(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union types report one error per alternative, each under a tag naming its type
    # ("str", "list[int]", "constrained-str", "function-after[...]"); the field (and index)
    # and the first reason suffice.
    param = ".".join(p for p in loc if p.isdigit() or (p.isidentifier() and p[:1].islower()
                                                          and p not in _TYPE_TAGS))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not param:
        return error_response(400, f"invalid request body: {msg}", code="invalid_body")
    return error_response(400, f"invalid value for '{param}': {msg}", param=param,
                          code="invalid_value")


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))
