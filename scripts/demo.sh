#!/usr/bin/env bash
# End-to-end demo: tiny base model, three adapters (LoRA, NoRA, dynamic-rank DoRA) trained with
# nora-train, served together by nora-serve --enable-nora and queried through the OpenAI client.
# Output goes to ./demo_out. Extra arguments go to the demo (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/python -m nora_serve.demo "$@"
