"""Seeded OpenAI chat traffic (text, not token ids), for runs through a real OpenAI endpoint.

The token-level generator (:mod:`kvray.sim.workload`) drives the simulator directly; this one
produces the request bodies a client sends to ``/v1/chat/completions``, with the same kinds of
sharing:

* **Tenants** with long system prompts, chosen with Zipf popularity; one tenant (or more) sends
  every request to a LoRA adapter (``model: "<base>:<adapter>"``), which moves its blocks into
  the adapter's key space.
* **Multi-turn chats:** each turn resends the conversation so far plus the assistant's reply and
  a new user message.
* **Shared documents:** RAG applications (each with its own preamble) put one of a pool of
  documents (Zipf popular, shared across users) in front of a short question.

Invariant: :func:`generate` is a pure function of its config (one ``random.Random(seed)``), so a
run replays exactly. Text is made of seeded pseudo-words, which tokenize to ~2-3 tokens each.
``salt`` is put at the very start of every system prompt: two runs with different salts share no
block, as if every cache started cold, while the traffic is otherwise identical.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from kvray.sim.workload import _zipf_cum_weights

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


@dataclass(slots=True, frozen=True)
class ChatWorkloadConfig:
    """Shape of the traffic (word ranges are inclusive)."""

    seed: int = 0
    requests: int = 300
    rate_rps: float = 20.0
    model: str = "qwen3"
    tenants: int = 8
    system_words: tuple[int, int] = (300, 450)
    lora_tenants: int = 1
    """The first ``lora_tenants`` tenants (in popularity order: the hottest) use an adapter."""
    adapter: str = "tenant-lora"
    chat_share: float = 0.6
    """Fraction of requests that are chat turns; the rest are document questions."""
    new_chat_prob: float = 0.35
    max_turns: int = 6
    turn_words: tuple[int, int] = (15, 60)
    reply_words: tuple[int, int] = (20, 60)
    documents: int = 24
    document_words: tuple[int, int] = (250, 400)
    rag_apps: int = 2
    preamble_words: tuple[int, int] = (40, 80)
    question_words: tuple[int, int] = (8, 20)
    max_tokens: tuple[int, int] = (8, 32)
    zipf_s: float = 1.1


@dataclass(slots=True)
class ChatRequest:
    """One request: when it is sent (seconds from the start) and its body."""

    i: int
    at_s: float
    kind: str
    tenant: str
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def lora(self) -> str | None:
        model = str(self.body["model"])
        return model.split(":", 1)[1] if ":" in model else None


def generate(
    cfg: ChatWorkloadConfig = ChatWorkloadConfig(), *, salt: str = ""
) -> list[ChatRequest]:
    """The requests of ``cfg``, in arrival order (see the module docstring)."""
    rng = random.Random(cfg.seed)
    vocab = sorted({"".join(rng.choices(_SYLLABLES, k=rng.randint(2, 3))) for _ in range(6000)})

    def text(bounds: tuple[int, int]) -> str:
        return " ".join(rng.choices(vocab, k=rng.randint(*bounds)))

    tenants = [f"tenant-{t}" for t in range(cfg.tenants)]
    systems = {t: f"You are the assistant of {t}. {text(cfg.system_words)}" for t in tenants}
    docs = [text(cfg.document_words) for _ in range(cfg.documents)]
    preambles = [
        f"Answer from the document. {text(cfg.preamble_words)}" for _ in range(cfg.rag_apps)
    ]
    tenant_w, doc_w = (
        _zipf_cum_weights(cfg.tenants, cfg.zipf_s),
        _zipf_cum_weights(cfg.documents, cfg.zipf_s),
    )
    lora = set(tenants[: cfg.lora_tenants])
    chats: list[tuple[str, list[dict[str, str]]]] = []  # open chats: tenant, messages so far
    out: list[ChatRequest] = []
    t = 0.0
    for i in range(cfg.requests):
        t += rng.expovariate(cfg.rate_rps)
        max_tokens = rng.randint(*cfg.max_tokens)
        if rng.random() < cfg.chat_share:
            if not chats or rng.random() < cfg.new_chat_prob:
                tenant = rng.choices(tenants, cum_weights=tenant_w)[0]
                system = f"{salt} {systems[tenant]}" if salt else systems[tenant]
                chats.append((tenant, [{"role": "system", "content": system}]))
            c = rng.randrange(len(chats))
            tenant, messages = chats[c]
            if len(messages) > 1:  # the previous turn's reply comes back with the next turn
                messages.append({"role": "assistant", "content": text(cfg.reply_words)})
            messages.append({"role": "user", "content": text(cfg.turn_words)})
            if len(messages) >= 2 * cfg.max_turns:
                chats.pop(c)
            model = f"{cfg.model}:{cfg.adapter}" if tenant in lora else cfg.model
            body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in messages]}
            kind = "chat"
        else:
            app = rng.randrange(cfg.rag_apps)
            doc = rng.choices(range(cfg.documents), cum_weights=doc_w)[0]
            tenant = f"rag-{app}"
            preamble = f"{salt} {preambles[app]}" if salt else preambles[app]
            body = {
                "model": cfg.model,
                "messages": [
                    {"role": "system", "content": preamble},
                    {
                        "role": "user",
                        "content": f"{docs[doc]}\n\nQuestion: {text(cfg.question_words)}",
                    },
                ],
            }
            kind = "rag"
        body["max_tokens"] = max_tokens
        out.append(ChatRequest(i, t, kind, tenant, body))
    return out
