"""Tokenization benchmark: a ~32k-token chat, full encode vs extending the cached conversation.

Run: ``python benchmarks/bench_tokenize.py [--out benchmarks/results/tokenize.md]``.
Target: encoding the conversation after one more turn, with the previous turn cached, takes
≤ 0.25× a full encode. Also reported: an exact repeat (a whole-text cache hit), a cold cached
encode (the cache's overhead on a miss) and chat-template rendering, which every request pays.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _util import table, write_report  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kvray.core.prefix_store import DEFAULT_CHUNK_CHARS  # noqa: E402
from kvray.tokenization import Tokenization, find_bundled_qwen3, load_tokenizer  # noqa: E402

TARGET_TOKENS = 32_768
TARGET_RATIO = 0.25
REPEATS = 9  # odd, for a clean median; each repeat re-warms the cache from cold

WORDS = [
    *("the", "a", "of", "to", "and", "in", "that", "is", "for", "it", "with", "as", "on", "by"),
    *("router", "cache", "prefix", "token", "block", "pod", "request", "latency", "replica"),
    *("shard", "index", "event", "model", "vLLM", "Ray", "engine", "scheduler", "throughput"),
    *("memory", "GPU", "batch", "queue", "worker", "cluster", "node"),
]
CODE = '''def score(keys, pods):
    """Longest consecutive prefix held by each pod."""
    best = {}
    for pod in pods:
        n = 0
        while n < len(keys) and keys[n] in pod.blocks:
            n += 1
        best[pod.name] = n
    return best
'''
CJK = "键值缓存感知路由在推理集群中减少重复计算。请解释前缀缓存的工作原理，并给出示例。"


def paragraph(rng: random.Random, words: int) -> str:
    out = " ".join(rng.choice(WORDS) for _ in range(words))
    return out[0].upper() + out[1:] + "."


def user_turn(rng: random.Random, i: int) -> str:
    parts = [f"Question {i}: " + paragraph(rng, rng.randint(40, 120))]
    if rng.random() < 0.3:
        parts.append(CJK)
    return "\n\n".join(parts)


def assistant_turn(rng: random.Random) -> str:
    parts = [paragraph(rng, rng.randint(80, 200)) for _ in range(rng.randint(2, 4))]
    if rng.random() < 0.6:
        parts.insert(1, "```python\n" + CODE + "```")
    return "\n\n".join(parts)


def build_conversation(tk: Tokenization, target: int) -> list[dict[str, Any]]:
    """Alternate user/assistant turns until the rendered chat holds ``target`` tokens."""
    rng = random.Random(7)
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful engineer."}]
    while True:
        messages.append({"role": "user", "content": user_turn(rng, len(messages) // 2)})
        rendered = tk.render_chat(messages)
        if len(tk.encode_full(rendered, add_special_tokens=False)) >= target:
            return messages
        messages.append({"role": "assistant", "content": assistant_turn(rng)})


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def median_s(run: Callable[[], object], prepare: Callable[[], object] | None = None) -> float:
    samples = []
    for _ in range(REPEATS):
        if prepare is not None:
            prepare()
        began = time.perf_counter()
        run()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/tokenize.md")
    parser.add_argument("--tokens", type=int, default=TARGET_TOKENS)
    args = parser.parse_args()

    tk = load_tokenizer(find_bundled_qwen3(), chunk_chars=DEFAULT_CHUNK_CHARS)
    prev = build_conversation(tk, args.tokens)
    rng = random.Random(11)
    turn = [
        {"role": "assistant", "content": assistant_turn(rng)},
        {"role": "user", "content": user_turn(rng, len(prev) // 2)},
    ]
    nxt = prev + turn
    prev_text, next_text = tk.render_chat(prev), tk.render_chat(nxt)
    next_ids = tk.encode_full(next_text, add_special_tokens=False)
    assert next_text.startswith(prev_text), "the template rewrote an earlier turn"

    def warm() -> None:
        tk.clear_cache()
        tk.encode(prev_text, add_special_tokens=False)

    def extend() -> None:
        assert tk.encode(next_text, add_special_tokens=False) == next_ids

    full = median_s(lambda: tk.encode_full(next_text, add_special_tokens=False))
    cold = median_s(lambda: tk.encode(next_text, add_special_tokens=False), tk.clear_cache)
    extension = median_s(extend, warm)
    tk.encode(next_text, add_special_tokens=False)
    repeat = median_s(lambda: tk.encode(next_text, add_special_tokens=False))
    render = median_s(lambda: tk.render_chat(nxt))
    chat_full = median_s(lambda: tk.encode_full(tk.render_chat(nxt), add_special_tokens=False))

    def warm_chat() -> None:
        tk.clear_cache()
        tk.encode_chat(prev)

    chat_extension = median_s(lambda: tk.encode_chat(nxt), warm_chat)

    ratio = extension / full
    rows = [
        ["full encode (no cache)", ms(full), "1.00", ""],
        ["cached encode, cold (miss + insert)", ms(cold), f"{cold / full:.2f}", ""],
        [
            "cached encode, previous turn cached (+1 turn)",
            ms(extension),
            f"{ratio:.3f}",
            f"≤ {TARGET_RATIO} {'✅' if ratio <= TARGET_RATIO else '❌'}",
        ],
        ["cached encode, exact repeat (whole-text hit)", ms(repeat), f"{repeat / full:.3f}", ""],
        ["render chat template", ms(render), f"{render / full:.2f}", ""],
        ["encode_chat end to end, no cache", ms(chat_full), f"{chat_full / full:.2f}", ""],
        [
            "encode_chat end to end, previous turn cached",
            ms(chat_extension),
            f"{chat_extension / full:.2f}",
            "",
        ],
    ]
    stats = tk.stats()
    setup = table(
        ["conversation", "value"],
        [
            ["messages", len(nxt)],
            ["rendered chars", len(next_text)],
            ["tokens", len(next_ids)],
            [
                "new turn tokens",
                len(next_ids) - len(tk.encode_full(prev_text, add_special_tokens=False)),
            ],
            ["chunk chars", DEFAULT_CHUNK_CHARS],
            ["median of", f"{REPEATS} runs"],
            ["cpu cores", os.cpu_count()],
        ],
    )
    results = table(["case", "median ms", "× full", "target"], rows)
    note = (
        f"Every cached result was checked equal to the full encode. "
        f"Splice rejects: {stats.splice_rejects}."
    )
    text = write_report(args.out, "Tokenization benchmark", [setup, results, note])
    print(text)


if __name__ == "__main__":
    main()
