"""kvray's HTTP surface: a Ray Serve FastAPI ingress (``app``), its schemas, the LLM router."""
