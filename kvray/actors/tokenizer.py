"""``TokenizerActor``: one pool member turning prompts and chats into token ids, per model.

Tokenizers load lazily per model (the model's configured ``tokenizer`` directory or hub name,
else the model name itself). Requests are routed to pool members by ``first_chunk_route`` of the
text, so repeats of a prefix meet the same prefix cache.
"""

from __future__ import annotations

import os
from typing import Any

from kvray.config import Config
from kvray.errors import BadRequest, ConfigError
from kvray.tokenization import Tokenization, load_tokenizer


class TokenizerActor:
    """The tokenizer actor's body (wrapped with ``ray.remote`` by ``kvray.runtime``)."""

    def __init__(self, index: int, config: dict[str, Any]) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.index = index
        self.config = Config.model_validate(config)
        self._toks: dict[str, Tokenization] = {}

    def _tok(self, model: str) -> Tokenization:
        tok = self._toks.get(model)
        if tok is None:
            source = self.config.index.model(model).tokenizer or model
            try:
                tok = load_tokenizer(source)
            except ConfigError as exc:
                raise BadRequest(f"no tokenizer for model {model[:200]!r}: {exc}") from exc
            except Exception as exc:  # e.g. OSError for a name too long to be a path
                raise BadRequest(
                    f"no tokenizer for model {model[:200]!r}: {type(exc).__name__}: {exc}"
                ) from exc
            self._toks[model] = tok
        return tok

    def encode(self, model: str, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completion prompt, as vLLM encodes it."""
        return self._tok(model).encode(prompt, add_special_tokens=add_special_tokens)

    def encode_chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of a rendered chat conversation."""
        return self._tok(model).encode_chat(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
        )

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokenizer": self.index, "models": {}}
        for model, tok in self._toks.items():
            st = tok.stats()
            out["models"][model] = {
                "encodes": st.encodes,
                "reused_tokens": st.reused_tokens,
                "encoded_tokens": st.encoded_tokens,
                "hit_rate": st.hit_rate,
                "latency_p50_s": st.latency_p50_s,
                "latency_p99_s": st.latency_p99_s,
                "latency_hist": st.latency_hist,
            }
        return out
