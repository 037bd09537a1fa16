#!/usr/bin/env bash
# The whole test suite on a fresh machine: Python environment, Rust build, fixtures (stand-in
# models, packages, reference outputs; cached in .cache/), then the Python and Rust tests.
# Each stage prints its wall time, so a slow CI run says where the time went.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage() { echo "== $1 (${SECONDS}s so far)" >&2; }
stage "python environment"
bash export/setup.sh
# The tests' own tools (the server's client, ruff): installed only when the pinned list changed (a
# stamp beside the venv's).
test_req=tests/requirements.txt
test_stamp=.venv/.requirements-tests.sha256
if [ "$(cat "$test_stamp" 2>/dev/null)" != "$(sha256sum "$test_req" | cut -d' ' -f1)" ]; then
  .venv/bin/python -m pip install -q -r "$test_req"
  sha256sum "$test_req" | cut -d' ' -f1 > "$test_stamp"
fi
stage "python lint"
.venv/bin/ruff check .  # two lines: set -e ignores a failure on the left of &&
.venv/bin/ruff format --check .
stage "rust build"
cargo build --quiet --all-targets
cargo test --quiet --no-run
stage "python package"
# The `icl_embed` Python package (python/, issue 25) into the venv, in the dev profile: it reuses the
# dependencies `cargo build` just compiled (a release wheel is `pip install .` or `maturin build --release`).
VIRTUAL_ENV=$root/.venv .venv/bin/maturin develop --quiet
.venv/bin/python -c "import icl_embed"  # fails the run if the build did not install
stage "rust lint"
cargo fmt --all --check
cargo clippy --quiet --all-targets -- -D warnings
cargo clippy --quiet -p icl-embed-python -- -D warnings
# The library alone (a program that embeds takes it without the CLI and server crates).
cargo build --quiet --no-default-features --lib
RUSTDOCFLAGS="-D rustdoc::broken_intra_doc_links -D rustdoc::private_intra_doc_links" \
  cargo doc --quiet --no-deps --lib
stage "fixtures"
fixtures=$(bash tests/fixtures.sh)  # a failing fixture build stops here (set -e)
eval "$fixtures"
export ICL_REQUIRE_FIXTURES=1
stage "python tests"
.venv/bin/python -m pytest -q --durations=5 tests/python
stage "rust tests"
cargo test --quiet --lib --bins -- --nocapture
cargo test --quiet --doc
for t in tests/*.rs; do
  name=$(basename "$t" .rs)
  stage "rust tests: $name"
  cargo test --quiet --test "$name" -- --nocapture
done
stage "done"
