"""icl-embed against the model's own sentence-transformers pipeline on PyTorch (issue 27): tokens/s of
`icl-embed embed` (each variant asked for) and of `SentenceTransformer.encode` (fp32, CPU, the same
threads), same texts, each run its own process, the engines alternating; peak RSS of each process;
and the cosine of each variant's vectors with sentence-transformers' on the same texts.

    PYTHONPATH=. .venv/bin/python tests/bench/st_compare.py --binary target/release/icl-embed \\
        --package PKG --model MODEL_DIR --variants fp32,int8 --docs 32 --queries 32 --runs 3

MODEL_DIR is the checkpoint the package was exported from, laid out as sentence-transformers loads it
(modules.json, the pooling and normalisation modules, `prompts` in config_sentence_transformers.json:
what export/standins.py writes for the Qwen3 stand-ins and the hub repository of Qwen3-Embedding has).

What each figure covers, on the same token count (the CLI's `done:` line's):
- icl-embed: the `done:` time (reading, tokenizing, batching, forwards, writing; not the load).
- sentence-transformers: one `encode` call (tokenizing, its batches sorted by length, the forwards,
  pooling, normalising) after the model was loaded, `torch.set_num_threads(threads)`. Batches of
  `--st-batch` (8) texts: sentence-transformers pads each batch to its longest text, so its default of
  32 on 32 sample texts would pad all of them to the longest (1,737 of Qwen's tokens here, 7x the
  real tokens), which a large corpus, sorted into batches of similar lengths, does not do.
- Peak RSS: the whole process (`ru_maxrss` of the child), load included.
Queries use the task below through the package's `instruct` prompt and sentence-transformers'
`prompt=` argument with the same text. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from speed import DONE, air_bench_queries, document_pool, done_seconds, spaced  # this folder

TASK = "Given a web search query, retrieve relevant passages that answer the query"


def workload(kind: str, n: int) -> list[str]:
    return spaced(document_pool(), n) if kind == "documents" else spaced(air_bench_queries(), n)


def child_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Runs `cmd` in a fresh process under a helper that reports its peak RSS (MiB)."""
    wrapper = [sys.executable, __file__, "rss", *cmd]
    proc = subprocess.run(wrapper, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-2000:]}")
    rss = float(proc.stderr.strip().splitlines()[-1].split()[-1])
    return proc, rss


def cli(a: argparse.Namespace, kind: str, variant: str, scratch: Path) -> dict:
    texts = workload(kind, a.docs if kind == "documents" else a.queries)
    src = scratch / f"{kind}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = scratch / f"{kind}-{variant}.npy"
    out.unlink(missing_ok=True)
    cmd = [a.binary, "embed", "--model", a.package, "--input", str(src), "--output", str(out)]
    cmd += ["--variant", variant, "--device", "cpu", "--threads", str(a.threads)]
    if kind == "queries":
        cmd += ["--queries", "--task", TASK]
    proc, rss = run_measured(cmd)
    m = DONE.search(proc.stderr)
    if m is None:
        raise RuntimeError(f"no done: line in {proc.stderr[-800:]}")
    return {"tokens": int(m.group(2)), "seconds": done_seconds(m), "load": float(m.group(5)), "rss": rss}


def st(a: argparse.Namespace, kind: str, scratch: Path) -> dict:
    n = a.docs if kind == "documents" else a.queries
    out = scratch / f"{kind}-st.npy"
    cmd = [sys.executable, __file__, "worker", kind, a.model, str(a.threads), str(n), str(out), str(a.st_batch)]
    proc, rss = run_measured(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["rss"] = rss
    return r


def worker(argv: list[str]) -> int:
    """One measured sentence-transformers process: `worker KIND MODEL THREADS N OUT BATCH`."""
    kind, model, threads, n, out, batch = argv
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(int(threads))
    start = time.perf_counter()
    m = SentenceTransformer(model, device="cpu")
    load = time.perf_counter() - start
    texts = workload(kind, int(n))
    prompt = f"Instruct: {TASK}\nQuery:" if kind == "queries" else None
    start = time.perf_counter()
    with torch.inference_mode():
        vectors = m.encode(
            texts, prompt=prompt, batch_size=int(batch), convert_to_numpy=True, normalize_embeddings=True
        )
    seconds = time.perf_counter() - start
    np.save(out, vectors.astype(np.float32))
    print(json.dumps({"seconds": seconds, "load": load}))
    return 0


def rss(argv: list[str]) -> int:
    """Runs argv, passes its output through, and prints its peak RSS in MiB last on stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    print(f"\npeak-rss-mib {child_rss_mib():.1f}", file=sys.stderr)
    return proc.returncode


def cosines(scratch: Path, kind: str, variant: str) -> tuple[float, float]:
    a = np.load(scratch / f"{kind}-{variant}.npy")
    b = np.load(scratch / f"{kind}-st.npy")
    c = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(c.min()), float(c.mean())


def measure(a: argparse.Namespace) -> tuple[dict[str, dict[str, list]], dict[str, tuple[float, float]]]:
    engines = [*a.variants, "st"]
    results: dict[str, dict[str, list]] = {}
    agreement: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for rep in range(a.runs):
            for kind in ("documents", "queries"):
                # Rotate the order each repetition: no engine always runs first on a warm machine.
                order = engines[rep % len(engines) :] + engines[: rep % len(engines)]
                for engine in order:
                    r = st(a, kind, scratch) if engine == "st" else cli(a, kind, engine, scratch)
                    for key, value in r.items():
                        results.setdefault(f"{kind}/{engine}", {}).setdefault(key, []).append(value)
                    print(
                        f"rep {rep} {kind:9} {engine:5} {r} load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True
                    )
                for v in a.variants:
                    agreement[f"{kind}/{v}"] = cosines(scratch, kind, v)
    return results, agreement


def report(a: argparse.Namespace, results: dict, agreement: dict) -> None:
    med = statistics.median
    print(
        f"\n{a.threads} threads, medians of {a.runs}; sentence-transformers batch_size {a.st_batch}; tokens/s on the CLI's token count\n"
    )
    print(
        "| workload | engine | tokens | seconds | tokens/s | against sentence-transformers | peak RSS MiB | cosine with ST (min / mean) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for kind in ("documents", "queries"):
        tokens = results[f"{kind}/{a.variants[0]}"]["tokens"][0]
        base = med(results[f"{kind}/st"]["seconds"])
        rows = [(f"icl-embed {v}", f"{kind}/{v}") for v in a.variants] + [("sentence-transformers fp32", f"{kind}/st")]
        for name, key in rows:
            secs = med(results[key]["seconds"])
            cos = agreement.get(key)
            cos_text = f"{cos[0]:.6f} / {cos[1]:.6f}" if cos else ""
            print(
                f"| {kind} | {name} | {tokens} | {secs:.2f} | {tokens / secs:,.0f} | {base / secs:.2f}x "
                f"| {max(results[key]['rss']):,.0f} | {cos_text} |"
            )


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    if argv[:1] == ["rss"]:
        return rss(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", required=True)
    p.add_argument("--package", required=True)
    p.add_argument("--model", required=True, help="the sentence-transformers model directory")
    p.add_argument("--variants", default="fp32,int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--st-batch", type=int, default=8, help="sentence-transformers' batch_size")
    a = p.parse_args(argv)
    a.variants = a.variants.split(",")
    cpu = sorted(set(re.findall(r"avx512_vnni|avx512f|avx2", Path("/proc/cpuinfo").read_text())))
    print(f"CPU: {os.cpu_count()} cores, {' '.join(cpu)}; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    report(a, *measure(a))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
