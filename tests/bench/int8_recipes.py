"""Every int8 recipe against the fp32 graph of one model: fidelity on the calibration set and speed
(each text alone, on the fp32 start states as the selection measures), alternating recipes within each run so that a shared machine's load hits them
alike; medians. Asserts nothing; prints a Markdown table.

    PYTHONPATH=. .venv/bin/python tests/bench/int8_recipes.py --model DIR --fp32 PKG/fp32/model.onnx
        [--recipes w8a8,w7a8,...] [--runs 3] [--threads 2]

`--recipes` also takes block-wise recipes at any block size, `nbits8-acc4-b64` (int8 compute) or
`nbits8-acc1-b32` (weight-only). Speeds here are the calibration texts run one at a time (most
are short); documents from the CLI: tests/bench/int8.py.

(formerly `python -m export.quantize --model DIR --fp32 GRAPH`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from export import verify
from export.int8.calibrate import Fp32Model, calibration_rows, quantize
from export.int8.recipes import RECIPES, Recipe
from export.int8.select import fidelity
from export.ortrun.batched import embed_rows

log = logging.getLogger("int8_recipes")


def recipe_named(name: str) -> Recipe:
    """A recipe of RECIPES, or a block-wise one at any block size: `nbits8-acc{1,4}-b{block}`."""
    if name in RECIPES:
        return RECIPES[name]
    m = re.fullmatch(r"nbits8-acc([14])-b(\d+)", name)
    if m is None:
        raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}, nbits8-acc{{1,4}}-b{{block}}")
    settings = {"bits": 8, "block_size": int(m.group(2)), "symmetric": True, "accuracy_level": int(m.group(1))}
    return Recipe(name, "matmulnbits", settings)


def compare(model_dir: Path, fp32_graph: Path, names: list[str], runs: int = 3, threads: int = 2) -> list[dict]:
    """Each recipe's fidelity on the calibration rows and tokens/s (each row alone), alternating
    recipes within each run so that a shared machine's load hits them alike; medians."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = calibration_rows(tokenizer)
    tokens = sum(map(len, rows))
    fp32 = Fp32Model.from_graph(fp32_graph)
    # As the selection measures: on the fp32 states of the ids every text begins with (bge-en-icl's
    # `<s>`; none for smollm2), the fp32 graph too.
    measured = fp32.measure(rows, verify.start_ids(tokenizer, fp32.input_names()), threads)
    reference, stats, start = measured.reference, measured.stats, measured.start
    table = {"fp32": {"recipe": "fp32 graph", "min_cosine": 1.0, "mean_cosine": 1.0, "times": []}}
    with tempfile.TemporaryDirectory(dir=fp32_graph.parent.parent) as tmp:
        graphs = {"fp32": fp32_graph}
        for name in names:
            dst = Path(tmp) / name / "model.onnx"
            quantize(fp32_graph, dst, recipe_named(name), stats)
            emb, _ = embed_rows(dst, rows, threads, start)
            table[name] = {"recipe": name, **fidelity(reference, emb, rows), "times": []}
            graphs[name] = dst
            log.info("%s", table[name])
        for _ in range(runs):
            for name, graph in graphs.items():
                table[name]["times"].append(embed_rows(graph, rows, threads, start)[1])
    if runs:
        fp32_speed = tokens / statistics.median(table["fp32"]["times"])
    for row in table.values():
        row["tokens_per_s"] = tokens / statistics.median(row["times"]) if runs else float("nan")
        row["vs_fp32"] = row["tokens_per_s"] / fp32_speed if runs else float("nan")
    return list(table.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/bench/int8_recipes.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory (for its tokenizer)")
    parser.add_argument("--fp32", type=Path, required=True, help="the exported fp32 model.onnx")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    table = compare(args.model, args.fp32, args.recipes.split(","), args.runs, args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| recipe | min cosine | mean cosine | worst text (tokens) | tokens/s | vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in table:
        print(
            f"| {row['recipe']} | {row['min_cosine']:.4f} | {row['mean_cosine']:.5f} | {row.get('worst_tokens', '-')} "
            f"| {row['tokens_per_s']:.0f} | {row['vs_fp32']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
