"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Types are strict (a string where a number belongs is an error, as with OpenAI), ranges are
checked here, and unknown fields are ignored, as OpenAI-compatible servers do. minigpt adds
`top_k`, `min_p` and `repetition_penalty` beside OpenAI's fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from minigpt_cli.inference.sampling import SamplerSettings

MAX_STOPS = 4  # OpenAI's limit
MAX_N = 16
MAX_LOGPROBS = 20

StopText = Annotated[str, Field(min_length=1)]


def _whole(v: object) -> object:
    """JSON Schema's integers include 1.0 (a number with no fraction); so do ours."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


WHOLE = BeforeValidator(_whole)  # after any bounds, so they stay in the published schema
Int = Annotated[int, WHOLE]  # strict otherwise: "1", true and 1.5 are not integers


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


# OpenAI's `response_format`: plain text, any JSON object, or JSON following a schema
# (inference/constraints.py turns the last two into grammars).
ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaResponseFormat,
                           Field(discriminator="type")]


def response_format_dict(fmt: BaseModel | None) -> dict[str, Any] | None:
    """The request's response_format as constraints.from_response_format reads it."""
    if fmt is None:
        return None
    if isinstance(fmt, JsonSchemaResponseFormat):
        return {"type": fmt.type, "json_schema": {"name": fmt.json_schema.name,
                                                  "schema": fmt.json_schema.schema_}}
    return {"type": fmt.type}


class Sampling(BaseModel):
    """Fields both endpoints share."""
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1), WHOLE] | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Annotated[int, Field(ge=0), WHOLE] = 0
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N), WHOLE] = 1
    seed: Int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        return [v] if isinstance(v, str) else list(v or [])

    def sampler(self) -> SamplerSettings:
        return SamplerSettings(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               min_p=self.min_p, repetition_penalty=self.repetition_penalty)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


NonEmpty = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: (str | Annotated[list[str], NonEmpty] | Annotated[list[Int], NonEmpty]
             | Annotated[list[list[Int]], NonEmpty])
    # None: OpenAI's default for completions, 16 (or the server's limit, if lower)
    max_tokens: Annotated[int, Field(ge=1), WHOLE] | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1), WHOLE] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS), WHOLE] | None = None
