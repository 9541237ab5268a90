#!/usr/bin/env bash
# Issue 10's GPU check: every method on CUDA against the CPU on Llama-3-8B-shaped tensors, the gesvd
# fallback on CUDA, DRM-H/V time and peak GPU memory per layer (benchmarks/gpu_check.py).
# Needs a CUDA build of torch in the venv; PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_check.py "$@"
