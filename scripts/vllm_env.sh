#!/usr/bin/env bash
# A side environment with vLLM's real KVCacheManager for the differential test
# (tests/integration/test_sim_vs_vllm.py), without disturbing the project's .venv:
#
#   bash scripts/vllm_env.sh            # creates .venv-vllm (about a minute)
#   .venv-vllm/bin/python -m pytest -p no:cacheprovider tests/integration/test_sim_vs_vllm.py
#
# vllm==0.33.0 with its declared dependencies would pull a CUDA torch (several GB) and pin
# transformers < 5.21, so it is installed with --no-deps next to a CPU torch and the few
# modules `vllm.v1.core.kv_cache_manager` imports. The project itself comes from .venv (a .pth
# line), so the test runs the same kvray code as the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/side_env.sh
side_env .venv-vllm
.venv-vllm/bin/pip install -q --no-deps \
  vllm==0.33.0 torch==2.13.0 \
  psutil sympy mpmath oss-harmony openai sniffio pybase64 cachetools cloudpickle py-cpuinfo \
  networkx xgrammar==0.2.8 apache-tvm-ffi==0.1.11 partial-json-parser "llguidance>=1.7,<1.8"
.venv-vllm/bin/python -c "import vllm.v1.core.kv_cache_manager" \
  && echo "vllm_env: vLLM's KVCacheManager imports"
