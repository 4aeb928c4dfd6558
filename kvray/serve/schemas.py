"""The HTTP contract: msgspec Structs for every request and response (one schema set).

The ingress (``kvray.serve.ingress``) decodes request bodies straight into these Structs
(validation happens while parsing, in one C pass), encodes the responses from them, and builds
its OpenAPI document from them (``msgspec.json.schema_components``).

Every request Struct forbids unknown fields, so a typo is a 422 naming the field rather than a
silently ignored option, and is strict: a token id of ``"1"`` is a 422, not a guess.

``ScoreCompletions`` and ``ScoreChat`` take the OpenAI / vLLM request a scheduler is about to
forward to vLLM, unchanged. Their fields fall in three groups:

* fields that make the prompt's tokens (``model``, ``prompt`` / ``messages``, ``tools``,
  ``add_generation_prompt``, ``chat_template_kwargs``, ``reasoning_effort``,
  ``add_special_tokens`` (completions), ``truncate_prompt_tokens`` + ``truncation_side``,
  ``cache_salt``) are honoured;
* fields that would change the prompt's tokens but kvray cannot reproduce (``suffix``,
  ``prompt_embeds``, ``chat_template``, ``documents``, ``continue_final_message: true``,
  ``add_special_tokens: true`` in chat, ``truncate_prompt_tokens`` without a
  ``truncation_side`` or of -1) are a 400 naming the field, never silently ignored;
* generation, sampling, output and transport fields (``max_tokens``, ``temperature``,
  ``stream``, ``stop``, ``logprobs``, ``kv_transfer_params``, ...) are type-checked and ignored:
  they cannot change which blocks the prompt fills.

LoRA: vLLM selects an adapter by ``model`` being the adapter's name. kvray needs the base
model's served name in ``model`` (its tokenizer and block settings) and the adapter's name in
its own ``lora`` field (the adapter is part of every block's key).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

MAX_POD_ID = 256
MAX_MODEL = 512
MAX_SALT = 1024  # vLLM's own limit on cache_salt

TokenId = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
"""A token id as vLLM stores it (u32)."""

Model = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_MODEL,
        description="Served (base) model name: picks the tokenizer and block settings.",
    ),
]
Lora = Annotated[
    str,
    msgspec.Meta(
        max_length=MAX_MODEL,
        description="LoRA adapter name (vLLM picks adapters by `model`; kvray needs the base "
        "model in `model` and the adapter here).",
    ),
]
CacheSalt = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=MAX_SALT,
        description="vLLM's cache_salt of the request (part of every block's key).",
    ),
]
Pods = Annotated[
    list[str] | None,
    msgspec.Meta(description="Only score these pods (default: all)."),
]
MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["role"],
    "anyOf": [{"required": ["content"]}, {"required": ["tool_calls"]}],
    "properties": {
        "role": {"type": "string", "minLength": 1},
        "content": {
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                    },
                },
                {"type": "null"},
            ]
        },
    },
}
"""The JSON Schema of a chat message that renders (other keys, e.g. ``tool_calls``, go to the
template as they are): the OpenAPI document's ``items`` of every ``messages``. The decoder takes
any objects (a dict each); the tokenizer checks them (a 400 naming the message)."""

Messages = Annotated[
    list[dict[str, Any]],
    msgspec.Meta(
        min_length=1,
        description="OpenAI chat messages: [{role, content}, ...] (text content only).",
    ),
]


class _Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _Response(msgspec.Struct, kw_only=True):
    pass


# --- requests -------------------------------------------------------------------------------


class ScoreTokens(_Request):
    """Score already tokenized input."""

    model: Model
    token_ids: Annotated[list[TokenId], msgspec.Meta(description="Prompt token ids.")]
    pods: Pods = None
    lora: Lora | None = None
    cache_salt: CacheSalt | None = None


class _Generation(_Request):
    """OpenAI / vLLM fields shared by completions and chats that cannot change the prompt's
    tokens: accepted (type-checked) and ignored."""

    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    use_beam_search: bool | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    watermarking: bool | None = None
    length_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    echo: bool | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: int | None = None
    request_id: str | None = None
    session_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    return_weight_versions: bool | None = None
    return_token_offsets: bool | None = None
    routed_experts_prompt_start: int | None = None
    mm_payload: str | None = None
    return_mm_kwargs: bool | None = None
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    repetition_detection: dict[str, Any] | None = None
    thinking_token_budget: int | None = None
    stream_interval: int | None = None
    # Honoured: the prompt's tokens are cut to this many, from `truncation_side`.
    truncate_prompt_tokens: (
        Annotated[
            int,
            msgspec.Meta(
                ge=-1,
                description="Keep this many prompt tokens (needs `truncation_side`; -1, the "
                "model's context length, is not supported).",
            ),
        ]
        | None
    ) = None
    truncation_side: (
        Annotated[
            Literal["left", "right"],
            msgspec.Meta(description="'right' keeps the first tokens, 'left' the last ones."),
        ]
        | None
    ) = None


class ScoreCompletions(_Generation, kw_only=True):
    """Score a completion prompt. Takes the OpenAI / vLLM completion request a scheduler
    forwards to vLLM, as is. Fields that make the prompt's tokens are honoured (model, prompt,
    add_special_tokens, truncate_prompt_tokens + truncation_side, cache_salt, and kvray's own
    pods and lora); suffix and prompt_embeds are refused (400); every other field (max_tokens,
    temperature, stream, stop, logprobs, ...) is type-checked and ignored. LoRA: `model` is the
    base model's served name and `lora` the adapter's."""

    model: Model
    prompt: Annotated[
        str | list[TokenId],
        msgspec.Meta(description="The prompt text (tokenized as vLLM would), or its token ids."),
    ]
    pods: Pods = None
    lora: Lora | None = None
    cache_salt: CacheSalt | None = None
    add_special_tokens: Annotated[
        bool, msgspec.Meta(description="Add the tokenizer's special tokens (e.g. BOS) to text.")
    ] = True
    logprobs: int | None = None
    best_of: int | None = None
    suffix: Annotated[
        str | None, msgspec.Meta(description="Not supported (fill-in-the-middle): a 400.")
    ] = None
    prompt_embeds: Annotated[
        str | list[str] | None, msgspec.Meta(description="Not supported: a 400.")
    ] = None


class ScoreChat(_Generation, kw_only=True):
    """Score a chat conversation rendered with the model's chat template. Takes the OpenAI /
    vLLM chat completion request a scheduler forwards to vLLM, as is. Fields that make the
    prompt's tokens are honoured (model, messages, tools, add_generation_prompt,
    chat_template_kwargs, reasoning_effort, truncate_prompt_tokens + truncation_side,
    cache_salt, and kvray's own pods and lora); chat_template, documents,
    continue_final_message=true and add_special_tokens=true are refused (400); every other
    field (max_tokens, temperature, stream, tool_choice, ...) is type-checked and ignored.
    LoRA: `model` is the base model's served name and `lora` the adapter's."""

    model: Model
    messages: Messages
    tools: Annotated[
        list[dict[str, Any]] | None, msgspec.Meta(description="Tool definitions (rendered).")
    ] = None
    add_generation_prompt: Annotated[
        bool, msgspec.Meta(description="Append the assistant header.")
    ] = True
    chat_template_kwargs: Annotated[
        dict[str, Any] | None,
        msgspec.Meta(description='Extra template variables, e.g. {"enable_thinking": false}.'),
    ] = None
    reasoning_effort: Annotated[
        str | None,
        msgspec.Meta(
            description="Passed to the template as vLLM does (also sets enable_thinking unless "
            "chat_template_kwargs does)."
        ),
    ] = None
    pods: Pods = None
    lora: Lora | None = None
    cache_salt: CacheSalt | None = None
    continue_final_message: Annotated[
        bool, msgspec.Meta(description="Only false is supported (true: a 400).")
    ] = False
    add_special_tokens: Annotated[
        bool, msgspec.Meta(description="Only false (vLLM's chat default) is supported.")
    ] = False
    chat_template: Annotated[
        str | None, msgspec.Meta(description="Not supported: kvray renders the model's own.")
    ] = None
    documents: Annotated[
        list[dict[str, str]] | None, msgspec.Meta(description="Not supported: a 400.")
    ] = None
    tool_choice: Annotated[
        str | dict[str, Any] | None,
        msgspec.Meta(
            description="Ignored: tools are rendered whatever the choice (vLLM's default; a "
            "server started with --exclude-tools-when-tool-choice-none differs for 'none')."
        ),
    ] = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    include_reasoning: bool | None = None
    return_prompt_text: bool | None = None
    media_io_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


class Route(_Request):
    """Pick the best pod among candidates, and record the choice (speculative entries)."""

    model: Model
    pods: Annotated[list[str], msgspec.Meta(min_length=1, description="Candidate pods.")]
    prompt: Annotated[
        str | None, msgspec.Meta(description="Completion prompt (or token_ids or messages).")
    ] = None
    token_ids: Annotated[list[TokenId] | None, msgspec.Meta(description="Prompt token ids.")] = None
    messages: (
        Annotated[
            list[dict[str, Any]],
            msgspec.Meta(description="Chat messages (as in score_chat_completions)."),
        ]
        | None
    ) = None
    lora: Lora | None = None
    cache_salt: CacheSalt | None = None
    load: Annotated[
        dict[str, float] | None,
        msgspec.Meta(
            description="Work queued per candidate, in tokens (prefill + decode still to do); "
            "absent: kvray's own estimate from its recent routing decisions."
        ),
    ] = None
    load_weight: (
        Annotated[
            float,
            msgspec.Meta(
                ge=0.0,
                description="A queued token counts as this many tokens of prefill; null: the "
                "deployment's routing.load_weight (1.0: estimated time to first token).",
            ),
        ]
        | None
    ) = None
    record: Annotated[
        bool, msgspec.Meta(description="Record speculative entries for the chosen pod.")
    ] = True


# --- responses ------------------------------------------------------------------------------


class ScoreResponse(_Response):
    """Longest-cached-prefix score per pod (pods lacking block 0 are absent)."""

    model: Annotated[str, msgspec.Meta(description="The model scored for.")]
    scores: Annotated[
        dict[str, float], msgspec.Meta(description="Pod → weighted count of leading cached blocks.")
    ]
    blocks: Annotated[
        int, msgspec.Meta(description="Full blocks in the prompt (the maximum possible score).")
    ]
    tokens: Annotated[int, msgspec.Meta(description="Prompt tokens.")]


class RouteResponse(_Response):
    """The chosen pod and why."""

    pod: Annotated[str, msgspec.Meta(description="The chosen pod.")]
    scores: Annotated[
        dict[str, float], msgspec.Meta(description="Raw scores of the candidates that have any.")
    ]
    blocks: Annotated[int, msgspec.Meta(description="Full blocks in the prompt.")]
    reason: Annotated[
        str,
        msgspec.Meta(
            description="'cache' (the longest cached prefix), 'load' (a shorter prefix won on "
            "queued work or pool fullness) or 'spread' (no candidate has any of it cached: "
            "the least loaded, ties by rendezvous hashing of the first block)."
        ),
    ]
    hit_blocks: Annotated[
        float, msgspec.Meta(description="The chosen pod's cached prefix (blocks).")
    ] = 0.0


class PodInfo(_Response):
    """One holder as kvray sees it."""

    pod: str
    shard: int
    model: str | None
    last_seq: int | None
    idle_s: float
    hash_contract: dict[str, Any]
    blocks: Annotated[
        int, msgspec.Meta(description="GPU blocks the pod holds, per its events.")
    ] = 0
    pool_blocks: Annotated[
        int | None,
        msgspec.Meta(description="Its KV pool size learned from its evictions (null: not yet)."),
    ] = None


class PodsResponse(_Response):
    """Every holder in the index."""

    pods: list[PodInfo]


ZmqEndpoint = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^(tcp|ipc)://\S+$",
        max_length=1024,
        description="A ZMQ endpoint the pod binds, e.g. tcp://10.0.0.7:5557.",
    ),
]
PodId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_POD_ID, pattern=r"^[^#\s]+$")]


class AddPod(_Request):
    """Subscribe to a pod that binds its KV-events PUB socket (vLLM's default topology)."""

    endpoint: ZmqEndpoint
    replay_endpoint: Annotated[
        ZmqEndpoint | None, msgspec.Meta(description="The pod's replay ROUTER endpoint.")
    ] = None
    pod: Annotated[
        PodId | None, msgspec.Meta(description="Pod id, when the pod publishes an empty topic.")
    ] = None
    model: Annotated[
        Model | None, msgspec.Meta(description="Model, when the pod publishes an empty topic.")
    ] = None


class PodChange(_Response):
    """What ``POST /pods`` or ``DELETE /pods/{pod}`` did."""

    action: Literal["added", "removed"]
    endpoint: str | None = None
    pod: str | None = None


class HealthResponse(_Response):
    """Liveness, and which kvray deployment answers."""

    status: str
    app: str
    namespace: str


class ErrorResponse(_Response):
    """What went wrong."""

    detail: str


REQUESTS: tuple[type[msgspec.Struct], ...] = (
    ScoreTokens,
    ScoreCompletions,
    ScoreChat,
    Route,
    AddPod,
)
RESPONSES: tuple[type[msgspec.Struct], ...] = (
    ScoreResponse,
    RouteResponse,
    PodsResponse,
    PodChange,
    HealthResponse,
    ErrorResponse,
)
