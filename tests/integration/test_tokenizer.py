"""The real Qwen3 tokenizer: cached encodes equal full encodes; chat rendering as vLLM does it."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, pre_tokenizers

from kvray.errors import BadRequest, ConfigError
from kvray.tokenization import Tokenization, find_bundled_qwen3, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHUNK = 16  # small chunks, so that short texts cross many chunk boundaries

# Pieces chosen to sit on the pre-tokenizer's edges: whitespace runs longer than the back-off
# reach (19), special tokens and halves of them, contractions, digits, CJK and its punctuation,
# combining marks and Hangul jamo (NFC composes them), emoji (multi-token characters), code.
FRAGMENTS = [
    "a", "ab", "The", " the", "don't", "'s", "'", "’", "1", "2024", "3.14", ".", ",", "(", ")",
    " ", "  ", "\t", "\n", "\n\n", "\r\n", " " * 21, "\n" + " " * 23, " " * 30 + "\n", "\t" * 20,
    "中", "文字", "。", "，", "「", "」", "가", "\u1100", "\u1161", "\u11a8", "e\u0301", "\u0301",
    "é", "Ω", "\u212b", "😀", "👍🏽", "\u00a0", "\u200b", "\u3000",
    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "<|im_", "start|>",
    "def f(x):\n    return x + 1\n", "    ", "if (a && b) {", "}", "/*", "*/", "->", "==", "_",
]  # fmt: skip


@pytest.fixture(scope="module")
def qwen_dir() -> Path:
    return find_bundled_qwen3()


@pytest.fixture(scope="module")
def qwen(qwen_dir: Path) -> Tokenization:
    return load_tokenizer(qwen_dir, chunk_chars=CHUNK)


@pytest.fixture(scope="module")
def hf_qwen(qwen_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True)


@pytest.fixture
def tk(qwen: Tokenization) -> Iterator[Tokenization]:
    qwen.clear_cache()
    yield qwen
    assert qwen.stats().splice_rejects == 0  # the cut rules never picked a non-boundary


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(n))


def random_walk(tk: Tokenization, seed: int, steps: int) -> None:
    """Grow, branch, repeat and replace texts; every cached encode must equal a full encode."""
    rng = random.Random(seed)
    text = ""
    for _ in range(steps):
        roll = rng.random()
        if roll < 0.45:
            text += random_text(rng, rng.randint(0, 12))
        elif roll < 0.8:
            text = text[: rng.randint(0, len(text))] + random_text(rng, rng.randint(0, 12))
        elif roll < 0.9:
            text = random_text(rng, rng.randint(0, 40))
        special = rng.random() < 0.2
        got = tk.encode(text, add_special_tokens=special)
        assert got == tk.encode_full(text, add_special_tokens=special), repr(text)


# --- completions ------------------------------------------------------------------------------


texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=30).map(
    "".join
)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["grow", "branch", "repeat"]), texts, st.floats(0, 1)),
        min_size=1,
        max_size=6,
    )
)
def test_cached_encode_equals_full_encode(qwen: Tokenization, steps: list[Any]) -> None:
    qwen.clear_cache()  # each example starts cold, so a failure shrinks on its own steps
    text = ""
    for op, piece, where in steps:
        if op == "grow":
            text += piece
        elif op == "branch":
            text = text[: int(where * len(text))] + piece
        assert qwen.encode(text, add_special_tokens=False) == qwen.encode_full(
            text, add_special_tokens=False
        ), repr(text)


def test_random_growth_of_shared_prefixes(tk: Tokenization) -> None:
    before = tk.stats()  # the module's tokenizer is shared: compare counters, not totals
    random_walk(tk, seed=0, steps=600)
    stats = tk.stats()
    reused = stats.reused_tokens - before.reused_tokens
    encoded = stats.encoded_tokens - before.encoded_tokens
    # A third of the steps branch at a random point or start afresh, so expect ~half, not all.
    assert reused > 0.3 * (reused + encoded)
    assert stats.cache.complete_hits > before.cache.complete_hits


def test_offsets_are_ordered(qwen_dir: Path) -> None:
    # The store slices tokens by end offset: ends must be non-decreasing and inside the text.
    # They need not tile it: NFC maps "e\u0301" to one token with offsets (0, 1).
    raw = Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    assert raw.encode("e\u0301x", add_special_tokens=False).offsets == [(0, 1), (2, 3)]
    rng = random.Random(1)
    for _ in range(100):
        text = random_text(rng, 30)
        offsets = raw.encode(text, add_special_tokens=False).offsets
        ends = [e for _, e in offsets]
        assert ends == sorted(ends) and all(0 <= s <= e <= len(text) for s, e in offsets)


def test_long_prompt_reuses_its_prefix(qwen_dir: Path) -> None:
    tk = Tokenization(Tokenizer.from_file(str(qwen_dir / "tokenizer.json")))  # 256-char chunks
    rng = random.Random(2)
    text = random_text(rng, 2000)
    assert tk.encode(text) == tk.encode_full(text)
    longer = text + " and one more question?"
    assert tk.encode(longer) == tk.encode_full(longer)
    stats = tk.stats()
    assert stats.reused_tokens > 0.9 * len(tk.encode_full(text))
    assert tk.encode(longer) == tk.encode_full(longer)  # exact repeat: served whole
    assert tk.stats().cache.complete_hits == 1
    assert stats.latency_samples == 2 and stats.latency_p99_s >= stats.latency_p50_s > 0


def test_matches_transformers_for_completions(qwen: Tokenization, hf_qwen: Any) -> None:
    for prompt in ["Hello, world!", "中文 <think>x</think>\n\n  code()", ""]:
        assert qwen.encode(prompt) == hf_qwen.encode(prompt)


# Other pre-tokenizers of the proven family (Llama-3's regex, GPT-2's byte-level regex) on the
# Qwen vocabulary: the cut rules depend on the pre-tokenizer, not on the merges.
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VARIANTS = {
    "llama3": (
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        True,
    ),
    "gpt2": (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), True),
    "unknown-regex": (
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\s+|\S+"), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        False,
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_pre_tokenizers(qwen_dir: Path, variant: str) -> None:
    raw = Tokenizer.from_file(str(qwen_dir / "tokenizer.json"))
    raw.pre_tokenizer, proven = VARIANTS[variant]
    tk = Tokenization(raw, chunk_chars=CHUNK)
    assert tk.stats().splice_enabled is proven
    random_walk(tk, seed=3, steps=200)
    stats = tk.stats()
    assert stats.splice_rejects == 0
    assert stats.cache.complete_hits > 0  # exact repeats are served even with the splice off


# --- chat ---------------------------------------------------------------------------------------


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def turn_text(rng: random.Random, i: int) -> str:
    return f"Turn {i}: " + random_text(rng, rng.randint(5, 60))


def test_growing_conversation(tk: Tokenization, hf_qwen: Any) -> None:
    before = tk.stats()
    rng = random.Random(4)
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    for i in range(12):
        messages.append({"role": "user", "content": turn_text(rng, i)})
        variants: list[dict[str, Any]] = [{}, {"chat_template_kwargs": {"enable_thinking": False}}]
        for kwargs in variants:
            ids = tk.encode_chat(messages, **kwargs)
            rendered = tk.render_chat(messages, **kwargs)
            assert ids == tk.encode_full(rendered, add_special_tokens=False)
        reference = hf_qwen.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert tk.encode_chat(messages) == list(reference)
        # Qwen3 drops the reasoning of earlier turns: the rendered prefix is not append-only.
        reply = turn_text(rng, i)
        if i % 3 == 0:
            reply = f"<think>\nreasoning {i}\n</think>\n\n{reply}"
        messages.append({"role": "assistant", "content": reply})
    stats = tk.stats()
    reused = stats.reused_tokens - before.reused_tokens
    encoded = stats.encoded_tokens - before.encoded_tokens
    assert reused > 2 * encoded  # most of each turn came from the cache


def test_tools_and_kwargs_change_the_rendering(tk: Tokenization) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    plain = tk.render_chat(messages)
    with_tools = tk.render_chat(messages, tools=TOOLS)
    assert "# Tools" in with_tools and '"name": "get_weather"' in with_tools
    assert "# Tools" not in plain
    assert tk.encode_chat(messages, tools=TOOLS) == tk.encode_full(
        with_tools, add_special_tokens=False
    )
    assert plain.endswith("<|im_start|>assistant\n")
    no_think = tk.render_chat(messages, chat_template_kwargs={"enable_thinking": False})
    assert no_think == plain + "<think>\n\n</think>\n\n"
    assert tk.render_chat(messages, add_generation_prompt=False).endswith("<|im_end|>\n")


def test_tool_call_round_trip(tk: Tokenization) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "18C, sunny"},
    ]
    rendered = tk.render_chat(messages, tools=TOOLS)
    assert "<tool_call>" in rendered and "<tool_response>" in rendered
    assert tk.encode_chat(messages, tools=TOOLS) == tk.encode_full(
        rendered, add_special_tokens=False
    )


def test_text_parts_are_joined(tk: Tokenization) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert tk.render_chat([{"role": "user", "content": parts}]) == tk.render_chat(
        [{"role": "user", "content": "one\ntwo"}]
    )


@pytest.mark.parametrize(
    ("messages", "kwargs", "match"),
    [
        ("hello", {}, "non-empty list"),
        ([], {}, "non-empty list"),
        ({"role": "user", "content": "x"}, {}, "non-empty list"),
        (["hi"], {}, r"messages\[0\] must be"),
        ([{"content": "x"}], {}, "role"),
        ([{"role": "user"}], {}, "no content"),
        ([{"role": "user", "content": 5}], {}, "content must be"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], {}, "only text parts"),
        ([{"role": "user", "content": "x"}], {"tools": "x"}, "tools must be"),
        ([{"role": "user", "content": "x"}], {"tools": [1]}, r"tools\[0\]"),
        ([{"role": "user", "content": "x"}], {"chat_template_kwargs": [1]}, "string keys"),
        ([{"role": "user", "content": "x"}], {"chat_template_kwargs": {"tokenize": 1}}, "tokenize"),
    ],
)
def test_bad_chat_requests(tk: Tokenization, messages: Any, kwargs: Any, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        tk.encode_chat(messages, **kwargs)


def test_bad_prompt(tk: Tokenization) -> None:
    with pytest.raises(BadRequest, match="prompt must be a string"):
        tk.encode(123)  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="lone surrogate at character 1"):
        tk.encode("a\ud800b")
    with pytest.raises(BadRequest, match="lone surrogate"):
        tk.encode_chat([{"role": "user", "content": "\udc00"}])


# --- loading ------------------------------------------------------------------------------------


def test_bundled_files(qwen_dir: Path) -> None:
    assert (qwen_dir / "tokenizer.json").is_file()
    assert (qwen_dir / "tokenizer_config.json").is_file()


def test_unloadable_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(ConfigError, match="cannot load"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match="cannot load"):
        load_tokenizer(tmp_path / "no-such-model")


def test_no_chat_template(qwen_dir: Path) -> None:
    tk = Tokenization(Tokenizer.from_file(str(qwen_dir / "tokenizer.json")))
    with pytest.raises(ConfigError, match="no chat template"):
        tk.render_chat([{"role": "user", "content": "x"}])
