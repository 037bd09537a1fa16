#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for tests/bench/gpu_machine.sh, the CUDA check on a lent GPU machine
# (tests/bench/GPU.md). Run here, on the CPU machine, after the release build:
#
#   bash tests/bench/gpu_prepare.sh MODEL_DIR     # MODEL_DIR: the slice7b stand-in (export/standins.py)
#
# The GPU machine has PyTorch and CUDA 13 but no network, no Rust, no CUDA build of ONNX Runtime and
# no FlagEmbedding, and one call carries at most 64 MiB. So .gpu/ gets:
# - parts/x00..x03: onnxruntime-gpu 1.31.1's three libraries (runtime, CUDA provider, shared
#   provider), tar | xz -9, split in 54 MB pieces: one piece per call;
# - whl/: the pinned wheels the exporter and FlagEmbedding need beyond the machine's own packages
#   (export/requirements.txt's versions of transformers, tokenizers, huggingface_hub, peft, and
#   FlagEmbedding with datasets, dill, multiprocess); the machine's torch and onnx are used as they are;
# - whl-ort/: the pinned onnxruntime (CPU) for the exporter's checks: the machine's 1.30 refuses the
#   graphs its own onnx writes (IR version 14);
# - slice7b/: the stand-in's config and tokenizer (its tokenizer needs mistral_common, which the
#   machine lacks); the weights are regenerated there from the same seed;
# - data/: the AIR-Bench passages and MSMARCO examples tests/gpu.sh reads;
# - icl-embed.xz: target/release/icl-embed.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
model=${1:?usage: bash tests/bench/gpu_prepare.sh SLICE7B_MODEL_DIR}
cd "$root"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
g=.gpu
rm -rf $g/slice7b $g/data $g/parts
mkdir -p $g/whl $g/whl-ort $g/slice7b $g/data/MTEB $g/parts $g/ort
pin() { grep -i "^$1==" export/requirements.txt; }
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $platforms -d "$@"
}
download $g/whl-ort "$(pin onnxruntime)"
download $g/whl "$(pin transformers)" "$(pin tokenizers)" "$(pin huggingface_hub)" "$(pin peft)" \
  "$(pin FlagEmbedding)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)"
if [ ! -f $g/ort/ortgpu.tar.xz ]; then
  download $g/ort onnxruntime-gpu==1.31.1
  unzip -o -j -q $g/ort/onnxruntime_gpu-1.31.1-*.whl -d $g/ort/libs 'onnxruntime/capi/libonnxruntime.so.1.31.1' \
    'onnxruntime/capi/libonnxruntime_providers_cuda.so' 'onnxruntime/capi/libonnxruntime_providers_shared.so'
  tar -C $g/ort/libs -cf - . | xz -9 -T0 > $g/ort/ortgpu.tar.xz.tmp
  mv $g/ort/ortgpu.tar.xz.tmp $g/ort/ortgpu.tar.xz
  rm -rf $g/ort/libs $g/ort/*.whl
fi
split -b 54000000 -d $g/ort/ortgpu.tar.xz $g/parts/x
cp "$model"/config.json "$model"/tokenizer.json "$model"/tokenizer_config.json "$model"/special_tokens_map.json $g/slice7b/
data=tests/data/flagembedding-icl-examples
cp -r $data/AIR-Bench $g/data/ && cp $data/MTEB/MSMARCO.json $g/data/MTEB/
xz -9 -c target/release/icl-embed > $g/icl-embed.xz
du -sb $g/parts/* $g/whl $g/whl-ort $g/slice7b $g/data $g/icl-embed.xz
