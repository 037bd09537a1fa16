#!/usr/bin/env bash
# GPU checks (issue 11), for a machine with an NVIDIA GPU; not part of tests/run.sh (CI has no GPU).
#
#   bash tests/gpu.sh PKG [BIN]
#
# PKG: a package with fp32 and fp16 variants (e.g. the slice7b or smollm2 stand-in exported with
# `--variants fp32,fp16`). BIN: the icl-embed binary (default target/release/icl-embed; the GPU
# machine has no Rust toolchain, so carry the release binary built on the CPU machine).
# ORT_DYLIB_PATH must name a CUDA build of ONNX Runtime (onnxruntime-gpu's libonnxruntime.so.*,
# tests/bench/README.md says how to bring it); the NVIDIA libraries of the torch wheels are put on
# LD_LIBRARY_PATH when python3 finds them.
#
# Checks, each printed as PASS/FAIL/SKIP with its figure:
#   1. fp16 on CUDA against fp32 on the CPU: min cosine >= 0.999 (documents and 3-shot queries);
#   2. the same on TensorRT (SKIP, not PASS, where libnvinfer is absent);
#   3. the prefix cache on CUDA: queries with the cache against --no-prefix-cache, min cosine
#      >= 0.999, and the run says it used the cache;
#   4. --device auto picks a GPU device (not the CPU) and says so;
#   5. tokens/s of fp16 on CUDA against fp32 on the CPU (2 threads), same inputs: printed, not asserted.
# Exit status: 0 when nothing FAILed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pkg=${1:?usage: bash tests/gpu.sh PKG [BIN]}
bin=${2:-$root/target/release/icl-embed}
py=${PYTHON:-python3}
data=${ICL_DATA:-$root/tests/data/flagembedding-icl-examples}
# GPU_WORK: keep the inputs, embeddings and logs in this folder (tests/bench/flag_gpu.py reads them).
if [ -n "${GPU_WORK:-}" ]; then work=$GPU_WORK; mkdir -p "$work"; else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
fail=0
report() { printf '%-5s %s\n' "$1" "$2"; [ "$1" != FAIL ] || fail=1; }

# NVIDIA libraries from the torch wheels (cuBLAS, cuDNN, ...), when present.
nv=$($py - <<'EOF' 2>/dev/null || true
import glob, os
try:
    import nvidia
    base = list(nvidia.__path__)[0]
    print(":".join(sorted(glob.glob(os.path.join(base, "*", "lib")))))
except Exception:
    pass
EOF
)
[ -z "$nv" ] || export LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -n "${ORT_DYLIB_PATH:-}" ] || echo "warning: ORT_DYLIB_PATH is not set; the CPU onnxruntime found first has no CUDA provider" >&2
"$bin" info --model "$pkg"

# Inputs: 32 passages (documents), 16 questions under MSMARCO's instruction and 3 examples.
$py - "$data" "$work" <<'EOF'
import json, pathlib, sys
data, work = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
docs, queries = [], []
for f in sorted((data / "AIR-Bench").glob("*/*.jsonl")):
    for line in f.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        e = json.loads(line)
        pos = e.get("pos")
        docs += [p for p in ([pos] if isinstance(pos, str) else pos or []) if len(p) >= 200]
        if e.get("query"):
            queries.append(e["query"])
msmarco = json.loads((data / "MTEB" / "MSMARCO.json").read_text())[:3]
(work / "docs.txt").write_text("\n".join(d.replace("\n", " ") for d in docs[:32]) + "\n")
(work / "queries.txt").write_text("\n".join(q.replace("\n", " ") for q in queries[:16]) + "\n")
(work / "examples.json").write_text(json.dumps(msmarco))
EOF
task="Given a web search query, retrieve relevant passages that answer the query."

# embed NAME INPUT ARGS...: writes $work/NAME.npy and $work/NAME.err; returns the exit status.
embed() {
  local name=$1 input=$2; shift 2
  "$bin" embed --model "$pkg" --input "$work/$input" --output "$work/$name.npy" "$@" 2>"$work/$name.err"
}
queries=(--queries --task "$task" --examples "$work/examples.json")
cosine() {
  $py - "$work/$1.npy" "$work/$2.npy" <<'EOF'
import sys, numpy as np
a, b = np.load(sys.argv[1]).astype(np.float64), np.load(sys.argv[2]).astype(np.float64)
assert a.shape == b.shape, (a.shape, b.shape)
c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
print(f"{c.min():.6f}")
EOF
}
tps() { [ -f "$work/$1.err" ] && sed -n 's/.* \([0-9.]*\) tokens\/s;.*/\1/p' "$work/$1.err" | tail -1 || true; }
check() {  # check LABEL A B: min cosine of A vs B >= 0.999
  local c; c=$(cosine "$2" "$3")
  if $py -c "import sys; sys.exit(0 if $c >= 0.999 else 1)"; then report PASS "$1: min cosine $c"; else report FAIL "$1: min cosine $c < 0.999"; fi
}

embed cpu_docs docs.txt --device cpu --variant fp32 --threads 2
embed cpu_q queries.txt --device cpu --variant fp32 --threads 2 "${queries[@]}"

for dev in cuda tensorrt; do
  if [ $dev = tensorrt ] && ! $py -c "import ctypes; ctypes.CDLL('libnvinfer.so.10')" 2>/dev/null \
      && ! $py -c "import ctypes; ctypes.CDLL('libnvinfer.so')" 2>/dev/null; then
    report SKIP "tensorrt: libnvinfer is not on this machine (TensorRT not checked)"
    continue
  fi
  if embed ${dev}_docs docs.txt --device $dev --variant fp16 && embed ${dev}_q queries.txt --device $dev --variant fp16 "${queries[@]}"; then
    check "$dev fp16 vs cpu fp32, documents" cpu_docs ${dev}_docs
    check "$dev fp16 vs cpu fp32, 3-shot queries" cpu_q ${dev}_q
  else
    report FAIL "$dev: $(grep error: "$work/${dev}_docs.err" "$work/${dev}_q.err" | head -3 | tr '\n' ' ')"
  fi
done

if embed cuda_q_full queries.txt --device cuda --variant fp16 "${queries[@]}" --no-prefix-cache && [ -f "$work/cuda_q.npy" ]; then
  check "cuda prefix cache vs full computation" cuda_q cuda_q_full
  if grep -q "prefix cache:" "$work/cuda_q.err"; then
    report PASS "cuda: $(grep 'prefix cache:' "$work/cuda_q.err")"
  else
    report FAIL "cuda: the query run did not use the prefix cache"
  fi
else
  report FAIL "cuda --no-prefix-cache: $(grep error: "$work/cuda_q_full.err" | head -2 | tr '\n' ' ')"
fi

if embed auto_docs docs.txt --device auto; then
  line=$(grep '^device ' "$work/auto_docs.err" || true)
  case "$line" in
    "device cuda"*|"device tensorrt"*) report PASS "auto: $line" ;;
    *) report FAIL "auto did not choose a GPU: $line" ;;
  esac
else
  report FAIL "auto: $(grep error: "$work/auto_docs.err" | head -2 | tr '\n' ' ')"
fi

for name in cpu_docs cuda_docs cpu_q cuda_q; do
  [ -f "$work/$name.err" ] && echo "$name: $(grep '^done:' "$work/$name.err" || echo 'no summary')"
done
c=$(tps cpu_docs); g=$(tps cuda_docs)
if [ -n "$c" ] && [ -n "$g" ]; then
  report INFO "documents: cuda fp16 $g tokens/s, cpu fp32 (2 threads) $c tokens/s, ratio $($py -c "print(f'{$g/$c:.1f}')")"
fi
c=$(tps cpu_q); g=$(tps cuda_q)
if [ -n "$c" ] && [ -n "$g" ]; then
  report INFO "3-shot queries (prefix cache): cuda fp16 $g tokens/s, cpu fp32 $c tokens/s, ratio $($py -c "print(f'{$g/$c:.1f}')")"
fi
exit $fail
