"""Ray Serve LLM tests: run in the Serve LLM side environment (``bash scripts/llm_env.sh``;
``.venv-llm/bin/python -m pytest tests/llm``). Elsewhere Serve LLM cannot be imported and they
are not collected."""

from __future__ import annotations

import os

# Serve LLM's OpenAI ingress is served by Serve's proxy here (what build_openai_app users get).
os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"

try:
    import ray.serve.llm  # noqa: F401

    import kvray.serve.llm_engine  # noqa: F401
except ImportError:  # not the Serve LLM environment (CI runs these in .venv-llm)
    collect_ignore_glob = ["test_*.py"]
