"""schemathesis hooks for fuzzing `minigpt serve` (loaded through schemathesis.toml).

A request the schema allows must be accepted, with two exceptions JSON Schema cannot state: a
prompt longer, in tokens, than the server accepts, and a `response_format` schema that is an
object but not a JSON schema the grammar engine compiles. schemathesis.toml lets positive data
meet a 400 for those reasons; this check holds every other 400 on positive data to be a
failure.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.check
def only_token_limits_refuse_valid_requests(ctx: Any, response: Any, case: Any) -> None:
    meta = case.meta
    if response.status_code != 400 or meta is None or not meta.generation.mode.is_positive:
        return
    code = (response.json().get("error") or {}).get("code")
    if code not in ("context_length_exceeded", "invalid_json_schema"):
        raise AssertionError(f"a request the schema allows was refused: {response.text}")
