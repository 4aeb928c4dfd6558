"""The HTTP contract's msgspec Structs: what they accept, how they name a bad field, and the
OpenAPI document built from them (no Ray)."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import msgspec
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from kvray.serve import schemas as s
from kvray.serve.ingress import Ingress

M = "qwen3"
CHAT = [{"role": "user", "content": "x"}]

# (Struct, document, None when accepted else a regex the error message must match)
DOCS: list[tuple[type[msgspec.Struct], Any, str | None]] = [
    (s.ScoreTokens, {"model": M, "token_ids": [1, 2, 3]}, None),
    (s.ScoreTokens, {"model": M, "token_ids": [], "pods": ["a"], "lora": "x"}, None),
    (s.ScoreTokens, {"model": M, "token_ids": [2**32 - 1], "cache_salt": "s"}, None),
    (s.ScoreTokens, {"model": M, "token_ids": [2**32]}, r"<= 4294967295 - at `\$.token_ids\[0\]`"),
    (s.ScoreTokens, {"model": M, "token_ids": [-1]}, r">= 0 - at `\$.token_ids\[0\]`"),
    (s.ScoreTokens, {"model": M, "token_ids": ["1"]}, r"`int`, got `str` - at `\$.token_ids"),
    (s.ScoreTokens, {"model": "", "token_ids": [1]}, r"length >= 1 - at `\$.model`"),
    (s.ScoreTokens, {"model": "m" * 513, "token_ids": [1]}, r"at `\$.model`"),
    (s.ScoreTokens, {"model": M}, r"missing required field `token_ids`"),
    (s.ScoreTokens, {"model": M, "token_ids": [1], "extra": 1}, r"unknown field `extra`"),
    (s.ScoreTokens, {"model": M, "token_ids": [1], "temperature": 0.5}, r"`temperature`"),
    (s.ScoreTokens, {"model": M, "token_ids": [1], "pods": "a"}, r"at `\$.pods`"),
    (s.ScoreTokens, {"model": M, "token_ids": [1], "lora": "l" * 513}, r"at `\$.lora`"),
    (s.ScoreTokens, {"model": M, "token_ids": [1], "cache_salt": ""}, r"at `\$.cache_salt`"),
    (s.ScoreTokens, [1, 2], r"Expected `object`, got `array`"),
    (s.ScoreCompletions, {"model": M, "prompt": "hi"}, None),
    (s.ScoreCompletions, {"model": M, "prompt": [1, 2, 3]}, None),
    (s.ScoreCompletions, {"model": M, "prompt": [1, -2]}, r"at `\$.prompt\[1\]`"),
    (s.ScoreCompletions, {"model": M, "prompt": ["a"]}, r"at `\$.prompt\[0\]`"),
    (s.ScoreCompletions, {"model": M, "prompt": 3}, r"at `\$.prompt`"),
    (s.ScoreCompletions, {"model": M}, r"missing required field `prompt`"),
    (s.ScoreCompletions, {"model": M, "prompt": "x", "bogus": 1}, r"unknown field `bogus`"),
    (
        s.ScoreCompletions,
        {"model": M, "prompt": "x", "temperature": 0, "max_tokens": 5, "stream": True},
        None,
    ),
    (s.ScoreCompletions, {"model": M, "prompt": "x", "temperature": "hot"}, r"`\$.temperature`"),
    (s.ScoreCompletions, {"model": M, "prompt": "x", "stream": "yes"}, r"at `\$.stream`"),
    (s.ScoreCompletions, {"model": M, "prompt": "x", "stop": ["\n"], "seed": 1}, None),
    (s.ScoreCompletions, {"model": M, "prompt": "x", "truncation_side": "middle"}, r"truncation"),
    (s.ScoreChat, {"model": M, "messages": CHAT}, None),
    (s.ScoreChat, {"model": M, "messages": CHAT, "cache_salt": "salt"}, None),
    (s.ScoreChat, {"model": M, "messages": []}, r"length >= 1 - at `\$.messages`"),
    (s.ScoreChat, {"model": M, "messages": CHAT, "tools": [{}]}, None),
    (s.ScoreChat, {"model": M, "messages": [1]}, r"at `\$.messages\[0\]`"),
    (s.ScoreChat, {"model": M, "messages": CHAT, "add_generation_prompt": False}, None),
    (s.ScoreChat, {"model": M, "messages": CHAT, "chat_template_kwargs": {"a": 1}}, None),
    (s.ScoreChat, {"model": M, "messages": CHAT, "tool_choice": {"type": "function"}}, None),
    (s.ScoreChat, {"model": M, "messages": CHAT, "max_completion_tokens": 9}, None),
    (s.ScoreChat, {"model": M, "messages": CHAT, "prompt": "x"}, r"unknown field `prompt`"),
    (s.ScoreChat, {"model": M, "messages": CHAT, "logprobs": 3}, r"at `\$.logprobs`"),
    (s.Route, {"model": M, "pods": ["a"], "token_ids": [1]}, None),
    (s.Route, {"model": M, "pods": []}, r"length >= 1 - at `\$.pods`"),
    (s.Route, {"model": M, "pods": ["a"], "load": {"a": 1.5}, "load_weight": 0.5}, None),
    (s.Route, {"model": M, "pods": ["a"], "load_weight": -0.1}, r"at `\$.load_weight`"),
    (s.Route, {"model": M, "pods": ["a"], "load": {"a": 2}, "record": False}, None),
    (s.Route, {"model": M, "pods": ["a"], "messages": CHAT}, None),
]


@pytest.mark.parametrize(("struct", "doc", "error"), DOCS)
def test_decode_accepts_or_names_the_field(
    struct: type[msgspec.Struct], doc: Any, error: str | None
) -> None:
    raw = json.dumps(doc).encode()
    if error is None:
        msgspec.json.Decoder(struct).decode(raw)
        msgspec.convert(doc, struct)  # the deployment-handle path agrees
        return
    with pytest.raises(msgspec.ValidationError, match=error):
        msgspec.json.Decoder(struct).decode(raw)
    with pytest.raises(msgspec.ValidationError, match=error):
        msgspec.convert(doc, struct)


def test_malformed_json_is_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError, match="malformed"):
        msgspec.json.Decoder(s.ScoreTokens).decode(b"{not json")


# vLLM 0.33's own request bodies, as its pydantic models dump them with every default
# (CompletionRequest(model='m', prompt='hi').model_dump(mode='json'), same for chat).
VLLM_COMPLETION = json.loads(
    '{"model": "m", "prompt": "hi", "echo": false, "frequency_penalty": null, "logit_bias": '
    'null, "logprobs": null, "max_tokens": 16, "n": 1, "presence_penalty": null, "seed": null, '
    '"stop": [], "stream": false, "stream_options": null, "suffix": null, "temperature": null, '
    '"top_p": null, "user": null, "use_beam_search": false, "top_k": null, "min_p": null, '
    '"repetition_penalty": null, "watermarking": null, "length_penalty": 1.0, '
    '"stop_token_ids": [], "include_stop_str_in_output": false, "ignore_eos": false, '
    '"min_tokens": 0, "skip_special_tokens": null, "spaces_between_special_tokens": true, '
    '"truncate_prompt_tokens": null, "truncation_side": null, "allowed_token_ids": null, '
    '"prompt_logprobs": null, "logprob_token_ids": null, "bad_words": [], "prompt_embeds": '
    'null, "add_special_tokens": true, "response_format": null, "structured_outputs": null, '
    '"priority": 0, "request_id": "r1", "session_id": null, "return_tokens_as_token_ids": '
    'null, "return_token_ids": null, "return_weight_versions": false, '
    '"routed_experts_prompt_start": 0, "return_token_offsets": false, "mm_payload": "tensors", '
    '"return_mm_kwargs": null, "cache_salt": null, "kv_transfer_params": null, '
    '"ec_transfer_params": null, "vllm_xargs": null, "repetition_detection": null, '
    '"thinking_token_budget": null, "stream_interval": null}'
)
VLLM_CHAT = json.loads(
    '{"messages": [{"content": "hi", "role": "user"}], "model": "m", "frequency_penalty": null, '
    '"logit_bias": null, "logprobs": false, "top_logprobs": 0, "max_tokens": null, '
    '"max_completion_tokens": null, "n": 1, "presence_penalty": null, "response_format": null, '
    '"seed": null, "stop": [], "stream": false, "stream_options": null, "temperature": null, '
    '"top_p": null, "tools": null, "tool_choice": "none", "reasoning_effort": null, '
    '"thinking_token_budget": null, "include_reasoning": true, "parallel_tool_calls": true, '
    '"user": null, "use_beam_search": false, "top_k": null, "min_p": null, '
    '"repetition_penalty": null, "watermarking": null, "length_penalty": 1.0, '
    '"stop_token_ids": [], "include_stop_str_in_output": false, "ignore_eos": false, '
    '"min_tokens": 0, "skip_special_tokens": null, "spaces_between_special_tokens": true, '
    '"truncate_prompt_tokens": null, "truncation_side": null, "prompt_logprobs": null, '
    '"logprob_token_ids": null, "allowed_token_ids": null, "bad_words": [], "echo": false, '
    '"add_generation_prompt": true, "continue_final_message": false, "add_special_tokens": '
    'false, "documents": null, "chat_template": null, "chat_template_kwargs": null, '
    '"media_io_kwargs": null, "mm_processor_kwargs": null, "structured_outputs": null, '
    '"priority": 0, "request_id": "r1", "session_id": null, "return_tokens_as_token_ids": '
    'null, "return_token_ids": null, "return_weight_versions": false, '
    '"routed_experts_prompt_start": 0, "return_token_offsets": false, "return_prompt_text": '
    'null, "mm_payload": "tensors", "return_mm_kwargs": null, "cache_salt": null, '
    '"kv_transfer_params": null, "ec_transfer_params": null, "vllm_xargs": null, '
    '"repetition_detection": null, "stream_interval": null}'
)


@pytest.mark.parametrize(
    ("struct", "body"), [(s.ScoreCompletions, VLLM_COMPLETION), (s.ScoreChat, VLLM_CHAT)]
)
def test_vllm_request_bodies_are_accepted_whole(
    struct: type[msgspec.Struct], body: dict[str, Any]
) -> None:
    req = msgspec.json.decode(json.dumps(body).encode(), type=struct)
    assert req.model == "m"  # type: ignore[attr-defined]
    # Every field vLLM 0.33 knows is a field here (so none is a 422 for a forwarded body).
    assert set(body) <= set(struct.__struct_fields__)


def test_openai_extras_beyond_vllm() -> None:
    body = {"model": M, "prompt": "x", "best_of": 2, "logprobs": 2, "user": "u", "n": 2}
    msgspec.json.decode(json.dumps(body).encode(), type=s.ScoreCompletions)


def _spec() -> dict[str, Any]:
    class _Client:
        replica = None

    ingress = Ingress("ns", {"auth_token": "t"}, client=_Client())  # type: ignore[arg-type]
    spec: dict[str, Any] = json.loads(json.dumps(ingress.openapi()))
    return spec


def test_openapi_lists_every_route_with_its_errors() -> None:
    spec = _spec()
    assert spec["openapi"].startswith("3.1")
    assert spec["info"]["title"] == "kvray"
    assert set(spec["paths"]) == {
        "/score_completions",
        "/score_chat_completions",
        "/score_tokens",
        "/route",
        "/pods",
        "/pods/{pod}",
        "/healthz",
        "/metrics",
        "/openapi.json",
        "/docs",
    }
    for path in (
        "/score_completions",
        "/score_chat_completions",
        "/score_tokens",
        "/route",
        "/pods",
    ):
        op = spec["paths"][path]["post"]
        assert {"200", "400", "401", "413", "422", "503"} <= set(op["responses"]), path
        assert op["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    req = spec["components"]["schemas"]["ScoreCompletions"]
    assert req["required"] == ["model", "prompt"]
    assert req["additionalProperties"] is False
    assert list(req["properties"])[:2] == ["model", "prompt"]  # own fields before generation's


def test_openapi_refs_resolve_and_schemas_agree_with_the_decoder() -> None:
    spec = _spec()
    text = json.dumps(spec)
    for name in set(re.findall(r'"#/components/schemas/([^"]+)"', text)):
        assert name in spec["components"]["schemas"], name
    registry: Registry[Any] = Registry().with_resource(
        "urn:kvray", Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    for struct, doc, error in DOCS:
        schema = {"$ref": f"urn:kvray#/components/schemas/{struct.__name__}"}
        validator = jsonschema.Draft202012Validator(schema, registry=registry)
        assert validator.is_valid(doc) == (error is None), (struct.__name__, doc)


def test_openapi_messages_say_what_renders() -> None:
    """The decoder takes any objects as messages (the tokenizer answers 400 naming the bad one);
    the document says what renders, so generated clients and fuzzers send messages that do."""
    spec = _spec()
    registry: Registry[Any] = Registry().with_resource(
        "urn:kvray", Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    schema = {"$ref": "urn:kvray#/components/schemas/ScoreChat"}
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    ok = [
        {"role": "user", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "x"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]
    for message in ok:
        assert validator.is_valid({"model": M, "messages": [message]}), message
    for message in [{"role": "user"}, {"content": "x"}, {"role": "", "content": "x"}]:
        assert not validator.is_valid({"model": M, "messages": [message]}), message
        msgspec.convert({"model": M, "messages": [message]}, s.ScoreChat)  # decoded: a 400 later
