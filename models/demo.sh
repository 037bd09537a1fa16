#!/usr/bin/env bash
# The main job on a fresh machine: sets up Python and the Rust build, makes the `smollm2` stand-in
# (real trained weights) and its model package, then embeds a passage corpus and few-shot queries
# from tests/data with icl-embed and prints a small similarity table.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash export/setup.sh
cargo build --release --quiet
source export/cache.sh
standin smollm2 smollm2
package smollm2 fp32,int8
pkg=$packages_dir/smollm2

out=${DEMO_OUT:-$cache/demo}
mkdir -p "$out"
$py models/demo.py prepare --out "$out"
bin=target/release/icl-embed
$bin embed --model "$pkg" --input "$out/passages.jsonl" --output "$out/passages.npy"
$bin embed --model "$pkg" --input "$out/queries.jsonl" --output "$out/queries.npy" \
  --queries --task "$(cat "$out/task.txt")" --examples "$out/examples.json"
$py models/demo.py report --out "$out"
