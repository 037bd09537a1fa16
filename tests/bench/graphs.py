"""Two or more graphs of one model, alternating in one process: are they the same, and which is faster?

    PYTHONPATH=. .venv/bin/python tests/bench/graphs.py --shape 8x200 --runs 8 OLD/model.onnx NEW/model.onnx [...]

Every graph gets the same random ids (a leading 1, then ids 100..29999) as one `rows x tokens`
batch without padding and without a prefix, with the exporter's session options (2 threads by
default; `session.x64quantprecision` where the CPU lacks VNNI, export/cpu.py). It prints the largest
difference of each output from the first graph's, then per graph the min and median of `--runs`
forwards, run in turn so that other load on the machine hits them alike. For changes to how a
graph is written (issue 13's quantization passes); asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from export import cpu
from export.ortrun.batch import right_padded
from export.ortrun.session import onnx_hidden, session


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("graphs", nargs="+", type=Path)
    p.add_argument("--shape", default="8x200", help="rows x tokens")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rows, tokens = (int(x) for x in args.shape.split("x"))
    rng = np.random.default_rng(0)
    batch = right_padded([[1] + rng.integers(100, 30000, tokens - 1).tolist() for _ in range(rows)], 0)
    sessions = [session(g, args.threads) for g in args.graphs]
    outs = [onnx_hidden(s, batch) for s in sessions]
    for g, o in zip(args.graphs[1:], outs[1:]):
        print(f"{g}: largest difference from {args.graphs[0]}: {np.abs(o - outs[0]).max():.3g}")
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(args.runs):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            onnx_hidden(s, batch)
            times[i].append(time.perf_counter() - start)
    print(f"{cpu.cpu_class()}, {args.threads} threads, {rows} x {tokens} tokens, {args.runs} runs each")
    for g, t in zip(args.graphs, times):
        print(f"{g}: min {min(t) * 1000:.1f} ms, median {statistics.median(t) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
