"""Seeded LLM traffic for the simulator: token-level requests, and JSONL traces of them.

Invariant: ``generate(config)`` is a pure function of ``config`` (one ``random.Random(seed)``
drives every draw), so the same config gives the same trace, request for request and token for
token, on any machine; a saved trace replays exactly.

The traffic mixes what makes prefix caching pay off in practice:

* **Tenants** with long system prompts, chosen with Zipf popularity (a few tenants are hot).
* **Multi-turn chats**: turn k's prompt is turn k-1's prompt + the assistant's reply + a new user
  message, so every turn extends the previous one (the pattern vLLM's prefix cache is built for).
* **RAG**: a few RAG applications (each with its own preamble) put one of a shared pool of
  documents (Zipf popular) in front of a short question; documents are shared across users.
* **LoRA adapters**: some tenants send every request to an adapter, which moves their blocks into
  the adapter's key space (the same tokens under another adapter never match).

Arrivals are a Poisson process at ``rate_rps``. Token ids are random (they only need to be
distinct where real text differs and equal where it repeats).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kvray.errors import ConfigError

TRACE_VERSION = 1
RequestKind = Literal["chat", "rag"]


@dataclass(slots=True, frozen=True)
class WorkloadConfig:
    """Shape of the generated traffic. Token ranges are inclusive ``(low, high)``."""

    seed: int = 0
    """Seed of the one random generator behind every draw."""
    num_requests: int = 1000
    """Requests in the trace."""
    rate_rps: float = 40.0
    """Mean arrival rate (Poisson), requests per simulated second."""
    model: str = "qwen3"
    """Served model name every request targets."""
    vocab_size: int = 150_000
    """Token ids are drawn from ``[0, vocab_size)``."""
    num_tenants: int = 24
    """Tenants, each with its own system prompt."""
    tenant_zipf: float = 1.0
    """Zipf exponent of tenant popularity (0: uniform)."""
    system_tokens: tuple[int, int] = (512, 2048)
    """Length of a tenant's system prompt."""
    continue_prob: float = 0.6
    """Chance that an arrival is the next turn of an open chat (when one is open)."""
    rag_prob: float = 0.3
    """Of the other arrivals: chance of a RAG question (else a new chat starts)."""
    turns: tuple[int, int] = (2, 10)
    """Turns of a chat before it closes."""
    user_tokens: tuple[int, int] = (20, 200)
    """Length of a user message."""
    reply_tokens: tuple[int, int] = (50, 400)
    """Length of an assistant reply (appended to the history of the next turn)."""
    max_prompt_tokens: int = 8192
    """A chat closes instead of growing past this."""
    max_open_chats: int = 64
    """Most chats open at once (a new chat beyond this closes the oldest)."""
    num_docs: int = 40
    """Shared RAG documents."""
    doc_zipf: float = 1.0
    """Zipf exponent of document popularity."""
    doc_tokens: tuple[int, int] = (500, 2000)
    """Length of a RAG document."""
    num_rag_apps: int = 3
    """RAG applications, each with its own preamble."""
    rag_preamble_tokens: tuple[int, int] = (100, 400)
    """Length of a RAG application's preamble."""
    question_tokens: tuple[int, int] = (10, 80)
    """Length of a RAG question."""
    num_loras: int = 3
    """LoRA adapters served next to the base model."""
    lora_tenant_fraction: float = 0.25
    """Share of tenants that send every request to one of the adapters."""

    def __post_init__(self) -> None:
        ranges = {
            "system_tokens": self.system_tokens,
            "turns": self.turns,
            "user_tokens": self.user_tokens,
            "reply_tokens": self.reply_tokens,
            "doc_tokens": self.doc_tokens,
            "rag_preamble_tokens": self.rag_preamble_tokens,
            "question_tokens": self.question_tokens,
        }
        for name, (lo, hi) in ranges.items():
            if not 0 <= lo <= hi:
                raise ConfigError(f"workload {name} must be 0 <= low <= high, got ({lo}, {hi})")
        positive = ("num_requests", "num_tenants", "num_docs", "num_rag_apps", "vocab_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"workload {name} must be > 0")
        if self.rate_rps <= 0:
            raise ConfigError("workload rate_rps must be > 0")
        for name in ("continue_prob", "rag_prob", "lora_tenant_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"workload {name} must be in [0, 1]")


@dataclass(slots=True, frozen=True)
class Request:
    """One prompt arriving at the router."""

    id: int
    """Position in the trace (0-based)."""
    t: float
    """Arrival time, simulated seconds from the trace start."""
    tenant: str
    """Who sent it (a tenant for chats, ``rag-<app>`` for RAG questions)."""
    kind: RequestKind
    """``"chat"`` or ``"rag"``."""
    session: int
    """Chat id (RAG questions get their own id); turns of one chat share it."""
    turn: int
    """Turn number within the chat, from 0 (always 0 for RAG)."""
    tokens: tuple[int, ...]
    """The prompt's token ids."""
    lora: str | None = None
    """LoRA adapter name, or None for the base model."""


@dataclass(slots=True, frozen=True)
class Trace:
    """A replayable sequence of requests, with what a fleet needs to serve them."""

    requests: tuple[Request, ...]
    model: str
    """Served model name."""
    lora_paths: Mapping[str, str] = field(default_factory=dict)
    """Adapter name -> path, as a vLLM pod would load them (they are part of vLLM's hash)."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Where the trace came from (the generator config, or anything a capture recorded)."""

    @property
    def prompt_tokens(self) -> int:
        """Total prompt tokens over the trace."""
        return sum(len(r.tokens) for r in self.requests)

    @property
    def duration_s(self) -> float:
        """Arrival time of the last request."""
        return self.requests[-1].t if self.requests else 0.0


@dataclass(slots=True)
class _Chat:
    session: int
    tenant: int
    prompt: tuple[int, ...]
    turns_left: int
    turn: int = 0


def _zipf_cum_weights(n: int, s: float) -> list[float]:
    return list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n)))


def generate(config: WorkloadConfig | None = None) -> Trace:
    """Generate a trace; the same ``config`` always gives the same trace.

    Args:
        config: traffic shape (defaults: ``WorkloadConfig()``).

    Returns:
        the trace, requests in arrival order.
    """
    cfg = config or WorkloadConfig()
    rng = random.Random(cfg.seed)

    def tokens(bounds: tuple[int, int]) -> tuple[int, ...]:
        return tuple(rng.randrange(cfg.vocab_size) for _ in range(rng.randint(*bounds)))

    # Shared content first, in a fixed order, so it does not depend on the arrival sequence.
    systems = [tokens(cfg.system_tokens) for _ in range(cfg.num_tenants)]
    loras = {f"adapter-{i}": f"/adapters/adapter-{i}" for i in range(cfg.num_loras)}
    names = sorted(loras)
    # Spread adapter tenants evenly over the popularity ranks (every 1/fraction-th tenant), so
    # the adapters' share of traffic does not hinge on whether the hottest tenant drew one.
    frac = cfg.lora_tenant_fraction
    tenant_lora = [
        names[i % len(names)] if names and int((i + 1) * frac) > int(i * frac) else None
        for i in range(cfg.num_tenants)
    ]
    docs = [tokens(cfg.doc_tokens) for _ in range(cfg.num_docs)]
    preambles = [tokens(cfg.rag_preamble_tokens) for _ in range(cfg.num_rag_apps)]
    tenant_w = _zipf_cum_weights(cfg.num_tenants, cfg.tenant_zipf)
    doc_w = _zipf_cum_weights(cfg.num_docs, cfg.doc_zipf)
    tenant_ids = range(cfg.num_tenants)
    doc_ids = range(cfg.num_docs)

    chats: list[_Chat] = []
    sessions = itertools.count()
    out: list[Request] = []
    t = 0.0
    for rid in range(cfg.num_requests):
        t += rng.expovariate(cfg.rate_rps)
        if chats and rng.random() < cfg.continue_prob:
            chat = chats[rng.randrange(len(chats))]
            grown = chat.prompt + tokens(cfg.reply_tokens) + tokens(cfg.user_tokens)
            if chat.turns_left > 0 and len(grown) <= cfg.max_prompt_tokens:
                chat.prompt, chat.turns_left, chat.turn = grown, chat.turns_left - 1, chat.turn + 1
                lora = tenant_lora[chat.tenant]
                who = f"tenant-{chat.tenant}"
                out.append(Request(rid, t, who, "chat", chat.session, chat.turn, grown, lora))
                continue
            chats.remove(chat)  # done or too long: this arrival starts something new instead
        if rng.random() < cfg.rag_prob:
            app = rng.randrange(cfg.num_rag_apps)
            doc = rng.choices(doc_ids, cum_weights=doc_w)[0]
            prompt = preambles[app] + docs[doc] + tokens(cfg.question_tokens)
            out.append(Request(rid, t, f"rag-{app}", "rag", next(sessions), 0, prompt))
            continue
        tenant = rng.choices(tenant_ids, cum_weights=tenant_w)[0]
        prompt = systems[tenant] + tokens(cfg.user_tokens)
        chat = _Chat(next(sessions), tenant, prompt, rng.randint(*cfg.turns) - 1)
        if len(chats) >= cfg.max_open_chats:
            chats.pop(0)
        chats.append(chat)
        lora = tenant_lora[tenant]
        out.append(Request(rid, t, f"tenant-{tenant}", "chat", chat.session, 0, prompt, lora))
    used = {r.lora for r in out if r.lora}
    return Trace(
        tuple(out),
        cfg.model,
        {k: v for k, v in loras.items() if k in used},
        # Through JSON once, so a saved and reloaded trace compares equal (tuples -> lists).
        json.loads(json.dumps({"generator": "kvray.sim.workload", "config": asdict(cfg)})),
    )


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` as JSONL: one header line, then one line per request.

    Args:
        trace: what to save.
        path: destination file (parent directories are created).

    Returns:
        the path written.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "type": "header",
        "version": TRACE_VERSION,
        "model": trace.model,
        "lora_paths": dict(trace.lora_paths),
        "meta": dict(trace.meta),
    }
    with dest.open("w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for r in trace.requests:
            row = {"type": "request", **asdict(r), "tokens": list(r.tokens)}
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    return dest


def load_trace(path: str | Path) -> Trace:
    """Read a trace written by ``save_trace`` (or by anything writing the same JSONL).

    Raises:
        ConfigError: the file is missing, not JSONL, or a line lacks a field; the message
            names the line.
    """
    src = Path(path)
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read trace {src}: {exc}") from exc
    header: dict[str, Any] | None = None
    requests: list[Request] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row.get("type") == "header":
                if row.get("version") != TRACE_VERSION:
                    raise ValueError(f"unsupported trace version {row.get('version')!r}")
                header = row
                continue
            requests.append(_request_from_row(row))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"trace {src} line {no}: {exc}") from exc
    if header is None:
        raise ConfigError(f"trace {src} has no header line")
    if any(b.t < a.t for a, b in itertools.pairwise(requests)):
        raise ConfigError(f"trace {src}: requests are not in arrival order")
    return Trace(
        tuple(requests), str(header["model"]), dict(header["lora_paths"]), dict(header["meta"])
    )


def _request_from_row(row: Mapping[str, Any]) -> Request:
    kind = row["kind"]
    if kind not in ("chat", "rag"):
        raise ValueError(f"unknown request kind {kind!r}")
    toks = row["tokens"]
    if not isinstance(toks, list) or not all(isinstance(x, int) and x >= 0 for x in toks):
        raise ValueError("tokens must be a list of non-negative ints")
    lora = row.get("lora")
    return Request(
        id=int(row["id"]),
        t=float(row["t"]),
        tenant=str(row["tenant"]),
        kind=kind,
        session=int(row["session"]),
        turn=int(row["turn"]),
        tokens=tuple(toks),
        lora=None if lora is None else str(lora),
    )


def describe(trace: Trace, requests: Iterable[Request] | None = None) -> dict[str, Any]:
    """Summary numbers of a trace (for the demo's header and results)."""
    reqs: Sequence[Request] = list(requests) if requests is not None else trace.requests
    n = len(reqs)
    return {
        "requests": n,
        "duration_s": round(reqs[-1].t, 3) if reqs else 0.0,
        "prompt_tokens": sum(len(r.tokens) for r in reqs),
        "mean_prompt_tokens": round(sum(len(r.tokens) for r in reqs) / n, 1) if n else 0.0,
        "chat": sum(r.kind == "chat" for r in reqs),
        "rag": sum(r.kind == "rag" for r in reqs),
        "lora": sum(r.lora is not None for r in reqs),
        "tenants": len({r.tenant for r in reqs}),
        "sessions": len({r.session for r in reqs}),
    }
