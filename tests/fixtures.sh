#!/usr/bin/env bash
# Builds what the tests compare against, cached under .cache/ (export/cache.sh): the stand-in
# models, their exported packages, and FlagEmbedding's own outputs on the parity set
# (tests/parity/golden.py). Prints `export` lines naming them for the tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}  # tests/parity/golden.py imports `export` from the root
source export/cache.sh

standin tiny-converted tiny --tokenizer-style converted
standin tiny-legacy tiny --tokenizer-style legacy
standin smollm2 smollm2
standin qwen3-tiny qwen3-tiny
standin e5-tiny e5-tiny
package tiny-converted fp32,fp16,int8
package tiny-legacy fp32
package smollm2 fp32,int8
package qwen3-tiny fp32,fp16,int8
package e5-tiny fp32 --family e5-mistral

golden_key=$(hash_of export/requirements.txt export/data-requirements.txt export/standins.py export/reference.py export/cards.py export/family.py models/*.toml export/io.py tests/parity/*.py tests/parity/edge.jsonl tests/fixtures.sh)
g=$cache/golden-$golden_key
for name in tiny-converted tiny-legacy; do
  build $g/$name $py tests/parity/golden.py --model $models_dir/$name --out $g/$name
done
# smollm2 (real weights, 135M parameters) checks the quantized and fp16 variants and a tokenizer
# without BOS; a subset of the cases keeps FlagEmbedding's CPU time in bounds: q_task_examples
# (3-shot SciFact prompts of ~700 tokens, most of that time) is cut to 12 of its 45 texts, and
# docs_passages (up to 512 tokens each) to 12 of 27.
build $g/smollm2 $py tests/parity/golden.py --model $models_dir/smollm2 --out $g/smollm2 \
  --only docs_edge,docs_passages,q_task_examples,q_truncated \
  --max-texts docs_passages=12 --max-texts q_task_examples=12

# The instruct families' own pipelines: sentence-transformers for Qwen3-Embedding, the model
# card's transformers code for e5-mistral (tests/parity/cases.py, instruct_cases).
build $g/qwen3-tiny $py tests/parity/golden.py --model $models_dir/qwen3-tiny --out $g/qwen3-tiny --family qwen3-embedding
build $g/e5-tiny $py tests/parity/golden.py --model $models_dir/e5-tiny --out $g/e5-tiny --family e5-mistral

cat <<VARS
export ICL_TINY_DIR=$root/$models_dir/tiny-converted
export ICL_SMOLLM2_DIR=$root/$models_dir/smollm2
export ICL_TINY_PKG=$root/$packages_dir/tiny-converted
export ICL_TINY_LEGACY_PKG=$root/$packages_dir/tiny-legacy
export ICL_SMOLLM2_PKG=$root/$packages_dir/smollm2
export ICL_GOLDEN_TINY=$root/$g/tiny-converted
export ICL_GOLDEN_TINY_LEGACY=$root/$g/tiny-legacy
export ICL_GOLDEN_SMOLLM2=$root/$g/smollm2
export ICL_QWEN3_TINY_DIR=$root/$models_dir/qwen3-tiny
export ICL_QWEN3_TINY_PKG=$root/$packages_dir/qwen3-tiny
export ICL_GOLDEN_QWEN3_TINY=$root/$g/qwen3-tiny
export ICL_E5_TINY_DIR=$root/$models_dir/e5-tiny
export ICL_E5_TINY_PKG=$root/$packages_dir/e5-tiny
export ICL_GOLDEN_E5_TINY=$root/$g/e5-tiny
VARS
