"""The fixed cost of one forward (issue 26): one 1 x N-token forward of a stand-in's fp32 graph and
of its int8 recipes, Python onnxruntime, each graph written straight from the checkpoint (no
checks, no export), the graphs alternating within each repetition; min and median per graph.
A recipe that expands its weights on every run (`nbits8-acc1`) shows it here: its 1 x 8 forward
costs about what a long one does. Asserts nothing; prints a Markdown table.

    PYTHONPATH=. .venv/bin/python tests/bench/one_forward.py --model STANDIN_DIR
        [--recipes nbits8-acc1,nbits8-acc4-b32] [--tokens 8,512] [--runs 5] [--threads 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from export import stream
from export.cpu import cpu_class
from export.int8 import calibrate
from export.int8.recipes import RECIPES
from export.ortrun.batch import right_padded
from export.ortrun.session import onnx_hidden, session


def write_graphs(model_dir: Path, names: list[str], work: Path) -> dict[str, Path]:
    """The fp32 graph and each recipe's (recipes with outliers need calibration: not offered)."""
    checkpoint = stream.Checkpoint(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    fp32 = work / "fp32" / "model.onnx"
    stream.write_variants(checkpoint, {"fp32": stream.trace(stream.skeleton(config), torch.float32)}, {"fp32": fp32})
    graphs = {"fp32": fp32}
    for name in names:
        graphs[name] = work / name / "model.onnx"
        calibrate.quantize(fp32, graphs[name], RECIPES[name])
    return graphs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/bench/one_forward.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a stand-in model directory (export.standins)")
    p.add_argument("--recipes", default="nbits8-acc1,nbits8-acc4-b32")
    p.add_argument("--tokens", default="8,512")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="where the graphs go (default: a temporary folder)")
    args = p.parse_args(argv)
    lengths = [int(n) for n in args.tokens.split(",")]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        graphs = write_graphs(args.model, args.recipes.split(","), Path(tmp))
        sessions = {name: session(graph, args.threads) for name, graph in graphs.items()}
        batches = {n: right_padded([list(range(100, 100 + n))], pad_id=0) for n in lengths}
        times: dict[tuple[str, int], list[float]] = {}
        for sess in sessions.values():  # warm-up
            for n in lengths:
                onnx_hidden(sess, batches[n])
        for _ in range(args.runs):
            for n in lengths:
                for name, sess in sessions.items():
                    start = time.perf_counter()
                    onnx_hidden(sess, batches[n])
                    times.setdefault((name, n), []).append(time.perf_counter() - start)
    layers = AutoConfig.from_pretrained(args.model).num_hidden_layers
    print(f"load average {os.getloadavg()[0]:.2f}; {cpu_class()}; {args.threads} threads; {layers} layers")
    print("| graph | tokens | min ms | median ms | median vs fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for n in lengths:
        base = statistics.median(times[("fp32", n)])
        for name in graphs:
            t = times[(name, n)]
            med = statistics.median(t)
            print(f"| {name} | 1 x {n} | {min(t) * 1000:.0f} | {med * 1000:.0f} | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
