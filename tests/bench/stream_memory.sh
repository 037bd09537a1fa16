#!/usr/bin/env bash
# Peak RSS of a whole `icl-embed embed` run on 10 000 and 1 000 000 short lines (issue 6: memory
# must stay flat whatever the input size). Uses the tiny stand-in package so that the run measures
# the streaming machinery, not the model. Prints a Markdown table for BENCHMARKS.md.
#   bash tests/bench/stream_memory.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
bash export/setup.sh
cargo build --release --quiet
source export/cache.sh
standin tiny-converted tiny --tokenizer-style converted
package tiny-converted fp32,fp16,int8
pkg=$packages_dir/tiny-converted
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$py - "$work" <<'PY'
import sys
words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
for n in (10_000, 1_000_000):
    with open(f"{sys.argv[1]}/lines-{n}.txt", "w") as f:
        for i in range(n):
            f.write(" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 9)) + "\n")
PY
echo "| lines | output | peak RSS (MiB) | wall (s) | items/s |"
echo "| --- | --- | --- | --- | --- |"
for n in 10000 1000000; do
  for ext in npy jsonl; do
    out=$work/out-$n.$ext
    /usr/bin/time -f "%M %e" -o "$work/time" target/release/icl-embed embed --model "$pkg" \
      --input "$work/lines-$n.txt" --output "$out" --device cpu --variant fp32 --threads 2 -q
    read -r kb secs < "$work/time"
    rate=$(awk -v n=$n -v s=$secs 'BEGIN { printf "%.0f", n / s }')
    echo "| $n | .$ext | $((kb / 1024)) | $secs | $rate |"
    rm -f "$out"
  done
done
