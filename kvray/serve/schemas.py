"""The HTTP contract: request and response models (the OpenAPI schema is generated from these).

Every model forbids unknown fields, so a typo in a request is a 422 naming the field rather
than a silently ignored option.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

MAX_POD_ID = 256
MAX_MODEL = 512
TokenId = Annotated[int, Field(ge=0, lt=2**32)]
"""A token id as vLLM stores it (u32)."""


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreCompletionsRequest(_Req):
    """Score a completion prompt."""

    model: str = Field(min_length=1, max_length=MAX_MODEL, description="Served model name.")
    prompt: str = Field(description="The prompt text, tokenized as vLLM would.")
    pods: list[str] | None = Field(None, description="Only score these pods (default: all).")
    lora: str | None = Field(None, max_length=MAX_MODEL, description="LoRA adapter name.")
    cache_salt: str | None = Field(None, description="vLLM cache_salt of the request.")


class ScoreChatRequest(_Req):
    """Score a chat conversation (rendered with the model's chat template)."""

    model: str = Field(min_length=1, max_length=MAX_MODEL, description="Served model name.")
    messages: list[dict[str, Any]] = Field(
        min_length=1, description="OpenAI-style messages: [{role, content}, ...]."
    )
    tools: list[dict[str, Any]] | None = Field(None, description="Tool definitions.")
    add_generation_prompt: bool = Field(True, description="Append the assistant header.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Extra template variables, e.g. {"enable_thinking": false}.'
    )
    pods: list[str] | None = Field(None, description="Only score these pods (default: all).")
    lora: str | None = Field(None, max_length=MAX_MODEL, description="LoRA adapter name.")


class ScoreTokensRequest(_Req):
    """Score already tokenized input."""

    model: str = Field(min_length=1, max_length=MAX_MODEL, description="Served model name.")
    token_ids: list[TokenId] = Field(description="Prompt token ids.")
    pods: list[str] | None = Field(None, description="Only score these pods (default: all).")
    lora: str | None = Field(None, max_length=MAX_MODEL, description="LoRA adapter name.")
    cache_salt: str | None = Field(None, description="vLLM cache_salt of the request.")


class ScoreResponse(BaseModel):
    """Longest-cached-prefix score per pod (pods lacking block 0 are absent)."""

    model: str = Field(description="The model scored for.")
    scores: dict[str, float] = Field(description="Pod → weighted count of leading cached blocks.")
    blocks: int = Field(description="Full blocks in the prompt (the maximum possible score).")
    tokens: int = Field(description="Prompt tokens.")


class RouteRequest(_Req):
    """Pick the best pod among candidates, and record the choice (speculative entries)."""

    model: str = Field(min_length=1, max_length=MAX_MODEL, description="Served model name.")
    pods: list[str] = Field(min_length=1, description="Candidate pods.")
    prompt: str | None = Field(None, description="Completion prompt (or token_ids/messages).")
    token_ids: list[TokenId] | None = Field(None, description="Prompt token ids.")
    messages: list[dict[str, Any]] | None = Field(None, description="Chat messages.")
    lora: str | None = Field(None, max_length=MAX_MODEL, description="LoRA adapter name.")
    load: dict[str, float] | None = Field(
        None, description="Current load per candidate (e.g. queued tokens); higher is busier."
    )
    load_weight: float = Field(
        0.0, ge=0.0, description="Blend: normalized score − load_weight × normalized load."
    )
    record: bool = Field(True, description="Record speculative entries for the chosen pod.")


class RouteResponse(BaseModel):
    """The chosen pod and why."""

    pod: str = Field(description="The chosen pod.")
    scores: dict[str, float] = Field(description="Raw scores of the candidates that have any.")
    blocks: int = Field(description="Full blocks in the prompt.")
    reason: str = Field(description="'cache' (best prefix), 'load' (blend) or 'fallback'.")


class PodInfo(BaseModel):
    """One holder as kvray sees it."""

    pod: str
    shard: int
    model: str | None
    last_seq: int | None
    idle_s: float
    hash_contract: dict[str, Any]


class PodsResponse(BaseModel):
    """Every holder in the index."""

    pods: list[PodInfo]


class ErrorResponse(BaseModel):
    """What went wrong."""

    detail: str
