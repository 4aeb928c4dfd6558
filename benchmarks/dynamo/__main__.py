"""``python -m benchmarks.dynamo`` (from the repository root): the same as
``python benchmarks/bench_dynamo.py``."""

from benchmarks.dynamo.cli import main

main()
