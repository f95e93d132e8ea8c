#!/usr/bin/env bash
# Sets up .venv (first run only) with the dev and bench extras, adds the CPU build of torch for the
# weight-conversion parity tests when it can be installed (JRET_TEST_TORCH=0 skips that), and runs
# the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,bench
if [ "${JRET_TEST_TORCH:-1}" != "0" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" \
    || echo "torch could not be installed: the torch parity tests will be skipped"
fi
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
exec .venv/bin/python -m pytest "$@"
