#!/usr/bin/env bash
# Sets up .venv (first run only) and runs the main job: the end-to-end retrieval pipeline on the
# embedded synthetic benchmark. Extra arguments go to experiments/retrieve.py (e.g. --set ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
exec .venv/bin/python experiments/retrieve.py --config configs/quickstart.py --workdir runs/quickstart "$@"
