"""Tokenization layer: prompts and chats → the exact token ids vLLM sees, with a prefix cache.

Key invariant: cached encodes equal a plain tokenizer call on the same text (see ``hf``).
"""

from kvray.tokenization.hf import (
    Tokenization,
    TokenizationStats,
    find_bundled_qwen3,
    load_tokenizer,
)

__all__ = ["Tokenization", "TokenizationStats", "find_bundled_qwen3", "load_tokenizer"]
