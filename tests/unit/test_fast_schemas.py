"""The fast path's msgspec Structs accept and reject what the pydantic models (OpenAPI) do."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pydantic
import pytest

from kvray.serve import schemas as s

PAIRS: list[tuple[type[pydantic.BaseModel], type[msgspec.Struct]]] = [
    (s.ScoreTokensRequest, s.ScoreTokensBody),
    (s.ScoreCompletionsRequest, s.ScoreCompletionsBody),
    (s.ScoreChatRequest, s.ScoreChatBody),
    (s.RouteRequest, s.RouteBody),
]

M = "qwen3"
DOCS: list[tuple[type[pydantic.BaseModel], Any]] = [
    (s.ScoreTokensRequest, {"model": M, "token_ids": [1, 2, 3]}),
    (s.ScoreTokensRequest, {"model": M, "token_ids": [], "pods": ["a"], "lora": "x"}),
    (s.ScoreTokensRequest, {"model": M, "token_ids": [2**32 - 1], "cache_salt": "s"}),
    (s.ScoreTokensRequest, {"model": M, "token_ids": [2**32]}),
    (s.ScoreTokensRequest, {"model": M, "token_ids": [-1]}),
    (s.ScoreTokensRequest, {"model": M, "token_ids": ["1"]}),
    (s.ScoreTokensRequest, {"model": "", "token_ids": [1]}),
    (s.ScoreTokensRequest, {"model": "m" * 513, "token_ids": [1]}),
    (s.ScoreTokensRequest, {"model": M}),
    (s.ScoreTokensRequest, {"model": M, "token_ids": [1], "extra": 1}),
    (s.ScoreTokensRequest, {"model": M, "token_ids": [1], "pods": "a"}),
    (s.ScoreTokensRequest, {"model": M, "token_ids": [1], "lora": "l" * 513}),
    (s.ScoreTokensRequest, [1, 2]),
    (s.ScoreCompletionsRequest, {"model": M, "prompt": "hi"}),
    (s.ScoreCompletionsRequest, {"model": M, "prompt": 3}),
    (s.ScoreCompletionsRequest, {"model": M}),
    (s.ScoreChatRequest, {"model": M, "messages": [{"role": "user", "content": "x"}]}),
    (s.ScoreChatRequest, {"model": M, "messages": []}),
    (s.ScoreChatRequest, {"model": M, "messages": [{"role": "user"}], "tools": [{}]}),
    (s.ScoreChatRequest, {"model": M, "messages": [1]}),
    (s.ScoreChatRequest, {"model": M, "messages": [{}], "add_generation_prompt": False}),
    (s.ScoreChatRequest, {"model": M, "messages": [{}], "chat_template_kwargs": {"a": 1}}),
    (s.RouteRequest, {"model": M, "pods": ["a"], "token_ids": [1]}),
    (s.RouteRequest, {"model": M, "pods": []}),
    (s.RouteRequest, {"model": M, "pods": ["a"], "load": {"a": 1.5}, "load_weight": 0.5}),
    (s.RouteRequest, {"model": M, "pods": ["a"], "load_weight": -0.1}),
    (s.RouteRequest, {"model": M, "pods": ["a"], "load": {"a": 2}, "record": False}),
    (s.RouteRequest, {"model": M, "pods": ["a"], "messages": [{"role": "user"}]}),
]


@pytest.mark.parametrize(("model", "doc"), DOCS)
def test_both_schemas_agree(model: type[pydantic.BaseModel], doc: Any) -> None:
    struct = dict(PAIRS)[model]
    raw = json.dumps(doc).encode()
    try:
        want = model.model_validate_json(raw).model_dump()
    except pydantic.ValidationError:
        want = None
    try:
        got: Any = msgspec.to_builtins(msgspec.json.decode(raw, type=struct))
    except msgspec.ValidationError:
        got = None
    assert got == want


@pytest.mark.parametrize(("model", "struct"), PAIRS)
def test_same_fields_and_defaults(
    model: type[pydantic.BaseModel], struct: type[msgspec.Struct]
) -> None:
    assert list(model.model_fields) == list(struct.__struct_fields__)
    defaults = dict(
        zip(
            struct.__struct_fields__[-len(struct.__struct_defaults__) :],
            struct.__struct_defaults__,
            strict=True,
        )
    )
    for name, field in model.model_fields.items():
        if not field.is_required():
            assert defaults[name] == field.default, name
