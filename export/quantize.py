"""8-bit variants of the fp32 graph, and the measurement that chose the shipped one.

The shipped `int8` is weight-only: every constant MatMul weight becomes a `MatMulNBits` node with
8-bit symmetric blocks of 32 along the input dimension; activations stay fp32. Per-tensor dynamic
activation quantization (`quantize_dynamic`) is fast but not faithful on real LLM activations, whose
few huge values wipe out one shared scale (export/README.md has the table).

`python -m export.quantize --model DIR --fp32 GRAPH` rebuilds that table: each recipe's last-token
embeddings against the fp32 graph on the built-in samples, and its speed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str  # "matmulnbits" or "dynamic"
    settings: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The manifest's `quantization` field."""
        return {"method": self.method, **self.settings}


RECIPES = {
    "nbits8-acc1": Recipe("nbits8-acc1", "matmulnbits",
                          {"bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 1}),
    "nbits8-acc4": Recipe("nbits8-acc4", "matmulnbits",
                          {"bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 4}),
    "nbits4-acc4": Recipe("nbits4-acc4", "matmulnbits",
                          {"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4}),
    "dynamic-int8": Recipe("dynamic-int8", "dynamic",
                           {"weight_type": "int8", "per_channel": True, "reduce_range": False,
                            "ops": ["MatMul"]}),
}

SHIPPED_INT8 = RECIPES["nbits8-acc1"]


def quantize(src: Path, dst: Path, recipe: Recipe) -> None:
    """Write `dst` (+ `dst.name + ".data"`) from the fp32 graph `src`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if recipe.method == "matmulnbits":
        _matmul_nbits(src, dst, recipe.settings)
    elif recipe.method == "dynamic":
        _dynamic(src, dst, recipe.settings)
    else:
        raise ValueError(f"unknown quantization method {recipe.method!r}")
    gc.collect()
    log.info("quantized %s -> %s with %s", src, dst, recipe.describe())


def _matmul_nbits(src: Path, dst: Path, s: dict) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(os.fspath(src)),
        bits=s["bits"],
        block_size=s["block_size"],
        is_symmetric=s["symmetric"],
        accuracy_level=s["accuracy_level"],
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    # One external data file named after the graph: model.onnx -> model.onnx.data.
    quantizer.model.save_model_to_file(os.fspath(dst), use_external_data_format=True)
    del quantizer


def _dynamic(src: Path, dst: Path, s: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        os.fspath(src),
        os.fspath(dst),
        op_types_to_quantize=s["ops"],
        per_channel=s["per_channel"],
        reduce_range=s["reduce_range"],
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
    )


# --- the comparison (not part of an export) -----------------------------------------------------


def _embed_and_time(graph: Path, rows: list[list[int]], runs: int, threads: int) -> tuple[np.ndarray, float]:
    """Embeddings of one right-padded batch, and tokens/s of running each row alone (median of runs)."""
    from . import verify

    sess = verify.session(graph, threads)
    batch = verify.right_padded(rows, pad_id=0)
    emb = verify.last_token(verify.onnx_hidden(sess, batch), batch.attention_mask)
    singles = [batch.row(i) for i in range(len(rows))]
    verify.onnx_hidden(sess, singles[0])  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for single in singles:
            verify.onnx_hidden(sess, single)
        times.append(time.perf_counter() - start)
    tokens = sum(len(r) for r in rows)
    return emb, tokens / statistics.median(times)


def compare(model_dir: Path, fp32_graph: Path, recipes: list[Recipe], runs: int = 3, threads: int = 2) -> list[dict]:
    from transformers import AutoTokenizer

    from . import samples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [s.ids for s in samples.samples(tokenizer)]
    reference, fp32_speed = _embed_and_time(fp32_graph, rows, runs, threads)
    table = [{"recipe": "fp32 graph", "min_cosine": 1.0, "mean_cosine": 1.0, "tokens_per_s": fp32_speed}]
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            dst = Path(tmp) / recipe.name / "model.onnx"
            start = time.perf_counter()
            quantize(fp32_graph, dst, recipe)
            seconds = time.perf_counter() - start
            emb, speed = _embed_and_time(dst, rows, runs, threads)
            cos = np.sum(reference * emb, axis=1)
            table.append({"recipe": recipe.name, "settings": recipe.describe(), "min_cosine": float(cos.min()),
                          "mean_cosine": float(cos.mean()), "tokens_per_s": speed, "quantize_s": seconds})
            log.info("%s", table[-1])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory (for its tokenizer)")
    parser.add_argument("--fp32", type=Path, required=True, help="the exported fp32 model.onnx")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    recipes = [RECIPES[name] for name in args.recipes.split(",")]
    table = compare(args.model, args.fp32, recipes, args.runs, args.threads)
    print("| recipe | min cosine | mean cosine | tokens/s |")
    print("| --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['recipe']} | {row['min_cosine']:.4f} | {row['mean_cosine']:.4f} | {row['tokens_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
