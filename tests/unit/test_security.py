"""No network input is ever unpickled, eval'd or loaded with an unsafe YAML loader."""

from __future__ import annotations

import re
from pathlib import Path

KVRAY = Path(__file__).resolve().parents[2] / "kvray"
FORBIDDEN = [
    r"pickle\.loads?\(",
    r"(?<![\w.])eval\(",
    r"(?<![\w.])exec\(",
    r"yaml\.load\(",
    r"yaml\.unsafe_load",
    r"marshal\.loads?\(",
]


def test_no_unsafe_deserialisation_in_the_package() -> None:
    hits = []
    for path in KVRAY.rglob("*.py"):
        text = path.read_text()
        for pattern in FORBIDDEN:
            for m in re.finditer(pattern, text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{path.relative_to(KVRAY.parent)}:{line}: {m.group(0)}")
    assert hits == []
