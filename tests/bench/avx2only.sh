#!/usr/bin/env bash
# Runs COMMAND as if on an x86-64 CPU with AVX2 but without AVX-512 or VNNI (issue 13): builds
# tests/bench/avx2only.c into target/avx2only/ and runs COMMAND with it preloaded, so that ONNX
# Runtime, the runtime's VNNI check and NumPy take their AVX2 paths, natively, on this CPU. Needs
# Linux's CPUID faulting (`cpuid_fault` in /proc/cpuinfo) and gcc.
#
#   bash tests/bench/avx2only.sh COMMAND [ARGS...]
#   e.g. bash tests/bench/avx2only.sh .venv/bin/python tests/bench/int8.py --binary target/release/icl-embed --package PKG
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
[ $# -gt 0 ] || { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
grep -qw cpuid_fault /proc/cpuinfo || { echo "avx2only.sh: this CPU or kernel has no CPUID faulting (cpuid_fault)" >&2; exit 2; }
lib=$root/target/avx2only/avx2only.so
if [ ! -f "$lib" ] || [ "$root/tests/bench/avx2only.c" -nt "$lib" ]; then
  mkdir -p "$(dirname "$lib")"
  gcc -O2 -shared -fPIC -Wall -Wextra -Werror -o "$lib" "$root/tests/bench/avx2only.c"
fi
# Check that the emulation holds, the way the runtime and ONNX Runtime look (CPUID), before measuring.
# `export` (here and in a Python COMMAND) is imported from the repository root.
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
LD_PRELOAD=$lib "$root/.venv/bin/python" - <<'PY'
import sys
from export import cpu
f = cpu.features()
if f & {"avx512vnni", "avxvnni"} or "avx2" not in f:
    sys.exit(f"avx2only.sh: emulation failed, CPUID still reports {sorted(f)}")
print(f"avx2only.sh: CPUID now reports {sorted(f)} (of avx2, avx512vnni, avxvnni)", file=sys.stderr)
PY
export LD_PRELOAD=$lib${LD_PRELOAD:+:$LD_PRELOAD}
exec "$@"
