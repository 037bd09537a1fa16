#!/usr/bin/env bash
# The whole test suite on a fresh machine: Python environment, Rust build, fixtures (stand-in
# models, packages, reference outputs; cached in .cache/), then the Python and Rust tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash export/setup.sh
cargo build --quiet --all-targets
fixtures=$(bash tests/fixtures.sh)  # a failing fixture build stops here (set -e)
eval "$fixtures"
export ICL_REQUIRE_FIXTURES=1
echo "== python tests" >&2
.venv/bin/python -m pytest -q tests/python
echo "== rust tests" >&2
cargo test --quiet -- --nocapture
