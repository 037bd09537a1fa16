"""`python -m export.int8 --model DIR --add-to PKG [--recipes R1,R2,...]`: (re)build a package's int8
variant from its fp32 graph, choosing among the given recipes as the exporter does (`select.choose`),
check it against the fp32 graph on the export's samples and record it in `embedder.json`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .recipes import CANDIDATES, RECIPES
from .select import add_int8


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.int8", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory (for its tokenizer)")
    parser.add_argument(
        "--add-to", type=Path, required=True, help="package whose int8 variant is (re)written from its fp32 graph"
    )
    parser.add_argument("--recipes", default=",".join(CANDIDATES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    names = args.recipes.split(",")
    unknown = [r for r in names if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    entry = add_int8(args.model, args.add_to, names, args.threads)
    print(entry["quantization"], entry["parity"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
