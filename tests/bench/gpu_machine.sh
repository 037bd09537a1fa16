#!/usr/bin/env bash
# The CUDA check on a lent GPU machine (tests/bench/GPU.md), run there from the repository root over
# the files tests/bench/gpu_prepare.sh put in .gpu/. Five calls, back to back (the machine keeps
# /tmp while it stays warm; one call carries at most 64 MiB):
#
#   bash tests/bench/gpu_machine.sh stage     # carry .gpu/whl .gpu/slice7b .gpu/data .gpu/icl-embed.xz .gpu/parts/x03
#   bash tests/bench/gpu_machine.sh stage     # carry .gpu/whl-ort, then .gpu/parts/x00, then x01
#   bash tests/bench/gpu_machine.sh check     # carry .gpu/parts/x02
#
# `stage` copies the carried pieces to /tmp/icl-gpu and installs carried wheels; once both wheel
# folders are in, it starts, detached, the slice7b stand-in's build (same seed, machine's torch) and
# its fp32 + fp16 export with the exporter's own checks, so the export runs while the other pieces
# travel. `check`
# joins the pieces, unpacks ONNX Runtime's CUDA build, waits for the export, then runs
# tests/gpu.sh (fp16 on CUDA against fp32 on the CPU, the prefix cache on CUDA, --device auto) and
# tests/bench/flag_gpu.py (FlagEmbedding fp16 on the GPU against icl-embed on CUDA: time and
# cosine). Logs land in $OUT.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
w=/tmp/icl-gpu
mkdir -p $w/parts
cd "$root"

stage() {
  for p in .gpu/parts/x*; do [ -f "$p" ] && cp "$p" $w/parts/; done
  for d in whl whl-ort; do
    if [ -d .gpu/$d ] && [ ! -e $w/$d.done ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $w/site .gpu/$d/*.whl \
        && touch $w/$d.done || return 1
    fi
  done
  [ -f .gpu/icl-embed.xz ] && xz -dc .gpu/icl-embed.xz > $w/icl-embed && chmod +x $w/icl-embed
  [ -d .gpu/slice7b ] && cp -r .gpu/slice7b .gpu/data $w/
  if [ -e $w/whl.done ] && [ -e $w/whl-ort.done ] && [ ! -e $w/started ]; then
    touch $w/started
    cp -r export tests $w/
    setsid nohup bash $w/tests/bench/gpu_machine.sh export > $w/export.log 2>&1 < /dev/null &
    echo "export started (pid $!)"
  fi
  ls -la $w/parts; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
}

export_model() {
  cd $w && export PYTHONPATH=$w/site:$w
  python3 - "$w/slice7b" <<'PY' || { touch $w/export.failed; exit 1; }
import json, sys
from pathlib import Path
from transformers import MistralConfig
from export import standins
out = Path(sys.argv[1])
config = MistralConfig(**json.loads((out / "config.json").read_text()))
standins.write_safetensors(out / "model.safetensors", standins.random_weight_specs(config, 0))
print("slice7b weights written")
PY
  /usr/bin/time -v python3 -m export --model $w/slice7b --out $w/pkg --variants fp32,fp16 --threads 16 --force \
    && touch $w/export.done || touch $w/export.failed
}

check() {
  stage
  mkdir -p $w/ort && cat $w/parts/x* | xz -dc | tar -x -C $w/ort || { echo "FAIL: ONNX Runtime pieces"; ls -la $w/parts; return 1; }
  for _ in $(seq 120); do [ -e $w/export.done ] || [ -e $w/export.failed ] && break; sleep 2; done
  cp $w/export.log "$OUT/" 2>/dev/null
  grep -E "INFO|Elapsed|Maximum resident|Error|error" $w/export.log | cut -c1-200
  [ -e $w/export.done ] || { echo "FAIL: export did not finish"; tail -30 $w/export.log; return 1; }
  export ORT_DYLIB_PATH=$w/ort/libonnxruntime.so.1.31.1 PYTHONPATH=$w/site TQDM_DISABLE=1
  rm -rf $w/work && mkdir -p $w/work
  GPU_WORK=$w/work ICL_DATA=$w/data PYTHON=python3 bash tests/gpu.sh $w/pkg $w/icl-embed 2>&1 | tee "$OUT/gpu.log"
  PYTHONUNBUFFERED=1 python3 tests/bench/flag_gpu.py --model $w/slice7b --package $w/pkg --binary $w/icl-embed \
    --work $w/work --copies ${COPIES:-16} 2>&1 | tee "$OUT/flag_gpu.log"
}

case "${1:-}" in
  stage) stage ;;
  export) export_model ;;
  check) check ;;
  *) echo "usage: bash tests/bench/gpu_machine.sh stage|check" >&2; exit 2 ;;
esac
