"""Request and response bodies of the HTTP API: the OpenAI shapes clients already speak
(completions, chat completions, models, errors), plus /v1/classify. FastAPI turns these into
the OpenAPI spec at /openapi.json, which the fuzz test drives.

The `model` field names what answers: a task of the pack, 'base' (the bare base), 'auto' (the
pack's router picks) or a mixture such as 'math:0.7+code:0.3'. Fields OpenAI has and qmerge
does not use (logprobs, penalties, user, ...) are accepted and ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Model = Field(
    min_length=1,
    max_length=512,
    description="a task of the served pack, 'base', "
    "'auto' (the pack's router picks) or a mixture such as 'math:0.7+code:0.3'",
)
Stop = str | list[str] | None


class Sampled(BaseModel):
    max_tokens: int = Field(
        16,
        ge=1,
        description="tokens to generate at most (the server refuses more than its --max-tokens)",
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="completions per prompt (only 1)")
    stream: bool = False
    stop: Stop = Field(
        None, description="up to 4 strings that end the completion (not included in it)"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="makes sampling reproducible")


class CompletionRequest(Sampled):
    model: str = Model
    prompt: str | list[str] = Field(description="a prompt, or a list of prompts (one choice each)")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampled):
    model: str = Model
    messages: list[ChatMessage] = Field(min_length=1)


class ClassifyRequest(BaseModel):
    model: str = Model
    input: str | list[str] = Field(description="a text or a list of texts")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Classification(BaseModel):
    index: int
    label: str | int
    scores: dict[str, float]
    route: str | dict[str, float] = Field(description="the task or mixture that answered")


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["classification"] = "classification"
    created: int
    model: str
    data: list[Classification]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qmerge"
    kind: str = Field(description="'task', 'base' or 'auto'")
    labels: list[str] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    # degraded: the pack on disk changed and could not be served; the previous tasks are
    # still served and reload_error says why
    status: Literal["ok", "degraded"]
    kind: str
    tasks: list[str]
    queue_depth: int
    running: int
    reload_error: str | None


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


def error(status: int, message: str) -> dict:
    return {"error": {"message": message, "type": ERRORS.get(status, "error"), "code": status}}


def responses(*codes: int) -> dict:
    """OpenAPI `responses` for the error statuses a route can give."""
    return {c: {"model": ErrorResponse} for c in codes}
