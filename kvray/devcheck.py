"""``python -m kvray.devcheck``: the one check command (ruff lint, ruff format check, mypy strict).

The same as ``scripts/check``, runnable from the installed environment on any OS.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TARGETS = ["kvray", "tests", "benchmarks", "examples"]


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    targets = [t for t in TARGETS if (root / t).exists()]
    steps = [
        [sys.executable, "-m", "ruff", "check", *targets],
        [sys.executable, "-m", "ruff", "format", "--check", *targets],
        [sys.executable, "-m", "mypy", "kvray"],
    ]
    for cmd in steps:
        print("check:", " ".join(cmd[2:]), flush=True)
        if subprocess.run(cmd, cwd=root).returncode:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
