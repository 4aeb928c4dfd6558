#!/usr/bin/env bash
# A side environment with Ray Serve LLM's own stack, for kvray's CPU stand-in engine
# (kvray.serve.llm_engine), the Serve LLM tests (tests/llm/) and examples/serve_llm.py:
#
#   bash scripts/llm_env.sh              # creates .venv-llm (a minute or two)
#   .venv-llm/bin/python examples/serve_llm.py
#
# Ray 2.60's Serve LLM imports vLLM 0.29.0's OpenAI protocol models (ray[llm] pins it). Its
# declared dependencies would pull a CUDA torch and a GPU stack, so vLLM is installed with
# --no-deps next to a CPU torch and the few modules Serve LLM's import path needs. Pinned:
# fastapi 0.133.0, because with fastapi 0.165 Ray 2.60's OpenAI ingress treats `self` as a
# query parameter (every request: 400 "Field required at ('query', 'self')"). moto's S3 server
# stands in for the object store Serve LLM loads LoRA adapters from (it accepts only s3://,
# gs:// and azure:// paths). The project itself comes from .venv (a .pth line), so everything
# runs the same kvray code as the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/side_env.sh
side_env .venv-llm
.venv-llm/bin/pip install -q --no-deps \
  vllm==0.29.0 torch==2.13.0 fastapi==0.133.0 \
  psutil sympy mpmath oss-harmony openai sniffio pybase64 cachetools cloudpickle py-cpuinfo networkx \
  partial-json-parser pyarrow python-multipart
.venv-llm/bin/pip install -q "moto[server,s3]==5.2.5"
.venv-llm/bin/python -c "import ray.serve.llm, kvray.serve.llm_engine, kvray.serve.llm_bench" \
  && echo "llm_env: Ray Serve LLM and kvray's stand-in engine import"
