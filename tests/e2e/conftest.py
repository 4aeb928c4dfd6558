"""End-to-end tests share the session Ray cluster fixture ``ray_session`` (tests/conftest.py)."""
