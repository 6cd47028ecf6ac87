"""The request bodies of the OpenAI API that lmforge-serve answers, and its error format.

Bodies are checked by pydantic: an unknown field, a wrong type or an out-of-range value is a 400
in OpenAI's error format (:class:`ApiError`), naming the field. Fields of the OpenAI API that
lmforge does not implement (``logprobs``, ``tools``...) are refused by name instead of ignored,
so that a client never gets an answer computed differently from what it asked for.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What completions and chat completions share: the model, the sampling options and streaming."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored, as a tag for the client's own bookkeeping

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple (empty when none)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    # In the OpenAI API, not in lmforge-serve: refused by name when set.
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    unsupported: ClassVar[tuple[str, ...]] = ("logprobs", "echo", "best_of", "suffix")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The message's text (parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    parallel_tool_calls: bool | None = None

    unsupported: ClassVar[tuple[str, ...]] = ("tools", "tool_choice", "functions", "function_call", "response_format", "logprobs", "top_logprobs",
                   "parallel_tool_calls")  # fmt: skip


class ClassifyRequest(_Body):
    """``POST /v1/classify`` and ``POST /v1/tag``: one text or a list."""

    model: str
    input: str | list[str]

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Question(_Body):
    question: str
    context: str


class AnswerRequest(_Body):
    """``POST /v1/answer``: a question and the context that holds its answer, or a list of them."""

    model: str
    question: str | None = None
    context: str | None = None
    input: list[Question] | None = None

    def questions(self) -> list[dict[str, str]]:
        if self.input is not None:
            return [q.model_dump() for q in self.input]
        if self.question is None or self.context is None:
            raise ApiError(400, "Give question and context, or input: a list of {question, context}.", param="input")
        return [{"question": self.question, "context": self.context}]


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32, as OpenAI sends
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def refuse_unsupported(body: CompletionRequest | ChatRequest) -> None:
    """Raise a 400 naming the first OpenAI field in ``body`` that lmforge-serve does not implement."""
    for name in body.unsupported:
        if getattr(body, name) not in (None, False):
            raise ApiError(400, f"{name} is not supported by lmforge-serve.", param=name, code="unsupported_parameter")


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The 400 for a body that pydantic refused: its first problem, in one sentence naming the field."""
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        return ApiError(400, "We could not parse the JSON body of your request (it is not valid JSON).")
    field = ".".join(str(part) for part in first["loc"] if part != "body")
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {field}", param=field)
    if first["type"] == "missing":
        return ApiError(400, f"Missing required parameter: {field or 'body'}.", param=field or None)
    return ApiError(400, f"Invalid value for {field or 'the body'}: {first['msg']}.", param=field or None)
