"""The HTTP contract: request and response models (the OpenAPI schema is generated from these).

Every model forbids unknown fields, so a typo in a request is a 422 naming the field rather
than a silently ignored option, and is strict: a token id of ``"1"`` is a 422, not a guess.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from pydantic import BaseModel, ConfigDict, Field

MAX_POD_ID = 256
MAX_MODEL = 512
TokenId = Annotated[int, Field(ge=0, lt=2**32)]
"""A token id as vLLM stores it (u32)."""


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


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
    cache_salt: str | None = Field(None, description="vLLM cache_salt of the request.")
    load: dict[str, float] | None = Field(
        None,
        description="Work queued per candidate, in tokens (prefill + decode still to do); "
        "absent: kvray's own estimate from its recent routing decisions.",
    )
    load_weight: float | None = Field(
        None,
        ge=0.0,
        description="A queued token counts as this many tokens of prefill; null: the "
        "deployment's routing.load_weight (1.0: estimated time to first token).",
    )
    record: bool = Field(True, description="Record speculative entries for the chosen pod.")


class RouteResponse(BaseModel):
    """The chosen pod and why."""

    pod: str = Field(description="The chosen pod.")
    scores: dict[str, float] = Field(description="Raw scores of the candidates that have any.")
    blocks: int = Field(description="Full blocks in the prompt.")
    reason: str = Field(
        description="'cache' (the longest cached prefix), 'load' (a shorter prefix won on "
        "queued work or pool fullness) or 'spread' (no candidate has any of it cached: "
        "the least loaded, ties by rendezvous hashing of the first block)."
    )
    hit_blocks: float = Field(0.0, description="The chosen pod's cached prefix (blocks).")


class PodInfo(BaseModel):
    """One holder as kvray sees it."""

    pod: str
    shard: int
    model: str | None
    last_seq: int | None
    idle_s: float
    hash_contract: dict[str, Any]
    blocks: int = Field(0, description="GPU blocks the pod holds, per its events.")
    pool_blocks: int | None = Field(
        None, description="Its KV pool size learned from its evictions (null: not yet)."
    )


class PodsResponse(BaseModel):
    """Every holder in the index."""

    pods: list[PodInfo]


class ErrorResponse(BaseModel):
    """What went wrong."""

    detail: str


# --- the same contract as msgspec Structs (the fast HTTP path decodes bodies with these) ------
#
# msgspec validates while it parses (one C pass, ~20x pydantic on a 16k-token body). Each Struct
# mirrors the pydantic model above field for field; ``tests/unit/test_fast_schemas.py`` checks
# that both accept and reject the same documents (both are strict: no coercion from strings).

TokenIdM = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
ModelM = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MODEL)]
LoraM = Annotated[str, msgspec.Meta(max_length=MAX_MODEL)]


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ScoreCompletionsBody(_Body):
    model: ModelM
    prompt: str
    pods: list[str] | None = None
    lora: LoraM | None = None
    cache_salt: str | None = None


class ScoreChatBody(_Body):
    model: ModelM
    messages: Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1)]
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    pods: list[str] | None = None
    lora: LoraM | None = None


class ScoreTokensBody(_Body):
    model: ModelM
    token_ids: list[TokenIdM]
    pods: list[str] | None = None
    lora: LoraM | None = None
    cache_salt: str | None = None


class RouteBody(_Body):
    model: ModelM
    pods: Annotated[list[str], msgspec.Meta(min_length=1)]
    prompt: str | None = None
    token_ids: list[TokenIdM] | None = None
    messages: list[dict[str, Any]] | None = None
    lora: LoraM | None = None
    cache_salt: str | None = None
    load: dict[str, float] | None = None
    load_weight: Annotated[float, msgspec.Meta(ge=0.0)] | None = None
    record: bool = True
