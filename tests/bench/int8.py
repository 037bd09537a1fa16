"""int8 against fp32 from the CLI, alternating, for a shared machine (issue 13). Asserts nothing.

    PYTHONPATH=. .venv/bin/python tests/bench/int8.py --binary target/release/icl-embed --package PKG
        [--docs 16] [--runs 3]

Uses speed.py's workloads (passages spread over the shared data; MSMARCO's instruction and 3
examples over 16 AIR-Bench questions). Each repetition runs, in turn, every (workload, variant)
pair, so that other load on the machine hits them alike; the figures are medians of the CLI's own
`done:` seconds. Also: the peak RSS of each process (`/usr/bin/time -f %M`), the variant's files on
disk, and one 1 x 8-token forward (Python onnxruntime on the package's graphs, 2 threads, min of 5
after a warm-up): the per-run fixed cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import speed  # this script's folder, which Python puts first on sys.path

from export.cpu import cpu_class
from export.ortrun.batch import right_padded
from export.ortrun.session import onnx_hidden, session


def one_forward(package: Path, variant: str, tokens: int, threads: int) -> float:
    sess = session(package / variant / "model.onnx", threads)
    batch = right_padded([list(range(100, 100 + tokens))], pad_id=0)
    onnx_hidden(sess, batch)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        onnx_hidden(sess, batch)
        times.append(time.perf_counter() - start)
    del sess
    return float(np.min(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--binary", required=True)
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--variants", default="fp32,int8")
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.warmup = 0
    variants = args.variants.split(",")
    docs, queries = speed.make_workloads(args.docs, ["MSMARCO"], args.queries, "air-bench")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for work in (docs, queries):
            speed.prepare(work, args.binary, str(args.package), scratch / work.kind)
        cases = [(docs, [], "documents")] + [
            (queries, [], "queries, prefix cache"),
            (queries, ["--no-prefix-cache"], "queries, --no-prefix-cache"),
        ]
        rows = {(label, v): speed.Row("icl-embed", v) for _, _, label in cases for v in variants}
        runs = argparse.Namespace(**{**vars(args), "runs": 1, "warmup": 0})
        for rep in range(args.runs):
            for work, extra, label in cases:
                for v in variants:
                    speed.run_cli(rows[(label, v)], runs, env, str(args.package), work, extra, scratch)
            print(f"repetition {rep + 1} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
        forward = {v: {n: one_forward(args.package, v, n, args.threads) for n in (8, 512)} for v in variants}
    load1 = os.getloadavg()
    tokens = {label: sum(len(i) for part in work.parts for i in part.ids) for work, _, label in cases}
    result = {
        "package": str(args.package),
        "runs": args.runs,
        "threads": args.threads,
        "load_average_start": load0[0],
        "load_average_end": load1[0],
        "cpu": cpu(),
        "rows": [],
    }
    for (label, v), row in rows.items():
        secs = statistics.median(row.times)
        result["rows"].append(
            {
                "workload": label,
                "variant": v,
                "tokens": tokens[label],
                "seconds": secs,
                "tokens_per_s": tokens[label] / secs,
                "all_seconds": row.times,
                "peak_rss_mib": row.rss_kb / 1024,
                "disk_mib": speed.variant_bytes(args.package, v) / 2**20,
            }
        )
    result["forward_s"] = forward
    print(json.dumps(result, indent=1))
    by = {(r["workload"], r["variant"]): r for r in result["rows"]}
    print(f"\nload average {load0[0]:.2f} at start, {load1[0]:.2f} at end; {result['cpu']}")
    print("| workload | variant | tokens/s | vs fp32 | peak RSS (MiB) | files (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (label, v), r in by.items():
        base = by.get((label, "fp32"))
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        print(
            f"| {label} | {v} | {r['tokens_per_s']:.1f} | {ratio:.2f}x | {r['peak_rss_mib']:.0f} | {r['disk_mib']:.0f} |"
        )
    for v in variants:
        a, b = by[("queries, prefix cache", v)], by[("queries, --no-prefix-cache", v)]
        print(
            f"{v}: prefix cache / no cache {a['tokens_per_s'] / b['tokens_per_s']:.2f}x; "
            f"one 1 x 8 forward {forward[v][8] * 1000:.1f} ms, 1 x 512 {forward[v][512] * 1000:.0f} ms"
        )
    return 0


def cpu() -> str:
    flags = set()
    model = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags") and not flags:
            flags = set(line.split())
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    # CPUID as the processes read it: under tests/bench/avx2only.sh it is masked to AVX2.
    masked = " (CPUID masked by tests/bench/avx2only.sh)" if "avx2only" in os.environ.get("LD_PRELOAD", "") else ""
    return f"{model}, {os.cpu_count()} logical cores, {' '.join(isa)}; processes see {cpu_class()}{masked}"


if __name__ == "__main__":
    sys.exit(main())
