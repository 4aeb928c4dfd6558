"""Head to head with NVIDIA Dynamo's standalone KV indexer: ``python benchmarks/bench_dynamo.py
--help``. The code is the package ``benchmarks/dynamo/`` (``python -m benchmarks.dynamo``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from benchmarks.dynamo.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
