"""`python -m export`: write a model package (export/FORMAT.md) from a Hugging Face model.

Traces the base model to ONNX in fp32 and fp16, quantizes an 8-bit variant, verifies each against
PyTorch fp32 on built-in samples and writes `embedder.json` last; the package appears only when
every variant passed.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import sys
from pathlib import Path

from . import family
from .int8.recipes import RECIPES
from .package import DEFAULT_VARIANTS, VARIANTS, ExportError, Options, build_package
from .verify import THRESHOLDS

log = logging.getLogger(__name__)


def parse_thresholds(values: list[str]) -> dict[str, float]:
    thresholds = dict(THRESHOLDS)
    for value in values:
        name, _, number = value.partition("=")
        if name not in thresholds or not number:
            raise ValueError(f"--threshold wants VARIANT=MIN_COSINE, got {value!r}")
        thresholds[name] = float(number)
    return thresholds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory or Hugging Face hub id")
    parser.add_argument("--out", type=Path, required=True, help="package directory to create")
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (int8: the fastest faithful 8-bit "
        "recipe for this model, export/README.md)",
    )
    parser.add_argument("--revision", default=None, help="hub revision (recorded in the manifest)")
    parser.add_argument("--force", action="store_true", help="replace an existing package")
    parser.add_argument(
        "--family",
        choices=family.names(),
        default=None,
        help="model family (models/<family>.toml: prompt procedure, default task, max lengths, shortened "
        "vectors; default: detected from the config's model_type or bge-en-icl's ICL tokens)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="max tokens of a query and of a document (default: the family's; bge-en-icl 512)",
    )
    parser.add_argument("--source-id", default=None, help="model id to record (default: --model as given)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for verification")
    parser.add_argument(
        "--int8-recipes",
        default=None,
        help="comma-separated int8 recipes to choose from, fastest first (default: every recipe "
        "of export/int8/recipes.py's CANDIDATES; e.g. nbits8-acc4-b32 for the block-wise one)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    # Tests use this to force a verification failure.
    parser.add_argument("--threshold", action="append", default=[], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def return_freed_memory() -> None:
    """Have glibc map (and unmap on free) every block of 1 MiB or more.

    By default its mmap threshold rises up to 32 MiB as blocks are freed, after which tensors under
    that size (a layer's weights on smaller models) come from heaps that rarely shrink, so the
    layer-by-layer reference and verification kept each layer's freed memory. Full-size weights are
    larger than 32 MiB and were always mapped. No effect outside glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    return_freed_memory()
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("onnxscript", "onnx_ir", "onnxruntime", "torch", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    recipes = [r for r in args.int8_recipes.split(",") if r] if args.int8_recipes else None
    unknown = [r for r in recipes or [] if r not in RECIPES]
    if unknown:
        log.error("--int8-recipes: unknown recipe(s) %s; known: %s", ", ".join(unknown), ", ".join(RECIPES))
        return 2
    try:
        opts = Options(
            variants=[v for v in args.variants.split(",") if v],
            revision=args.revision,
            force=args.force,
            max_length=args.max_length,
            family=args.family,
            source_id=args.source_id,
            int8_recipes=recipes,
            thresholds=parse_thresholds(args.threshold),
            threads=args.threads,
        )
        build_package(args.model, args.out, opts)
    except (ExportError, ValueError, OSError) as e:
        logging.getLogger("export").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
