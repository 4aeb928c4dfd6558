"""Thin Ray actor shells around the core: they own state, wire modules together, count."""
