"""Load test of `icl-embed serve` on the loopback interface (issue 14), against the CLI on the same texts.

    .venv/bin/python tests/bench/server.py --binary target/release/icl-embed --model PKG [--runs 3]

Measures, with the same package, variant and thread count:
- documents/s of `icl-embed embed` (its `done:` line, load excluded) on N passages;
- documents/s and p50/p99 request latency of the server at 1, 8 and 64 concurrent clients, each
  request one passage (`POST /v1/embeddings`, base64 as the `openai` client asks by default);
- few-shot queries (MSMARCO's instruction and first 3 examples as a `--tasks` preset) from 64
  clients, one query per request, on a server with the shared prefix cache and on one with
  `--no-prefix-cache`, with the CLI's query throughput (with and without the cache) beside them.

The load generator is this script: asyncio + aiohttp (already in .venv), so every request carries its
own text from tests/data (oha and wrk repeat one body) and latencies are per request. Bounded:
each phase sends at most --docs / --queries requests and stops after --max-seconds; only 127.0.0.1.
Runs alternate CLI and server phases; figures are medians over --runs. The client shares the
machine's cores with the server, as a real client on the same host would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from speed import DATA, SHOTS, air_bench_queries, document_pool, load_instructions, spaced  # this script's folder

TASK = "MSMARCO"
DONE = re.compile(r"done: (\d+) items, (\d+) tokens, ([0-9.]+) s")


def cli_rate(binary: str, package: str, texts: list[str], scratch: Path, common: list[str], extra: list[str]) -> float:
    """Items/s of `icl-embed embed` from its `done:` line (compute time, load excluded)."""
    src, out = scratch / "cli.jsonl", scratch / "cli.npy"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out.unlink(missing_ok=True)
    r = subprocess.run(
        [binary, "embed", "--model", package, "--input", str(src), "--output", str(out), *common, *extra],
        capture_output=True,
        text=True,
        check=True,
    )
    m = DONE.search(r.stderr)
    assert m, r.stderr
    return int(m.group(1)) / float(m.group(3))


class Server:
    """`icl-embed serve` on a free loopback port."""

    def __init__(self, binary: str, package: str, common: list[str], extra: list[str]):
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", package, "--host", "127.0.0.1", "--port", "0", *common, *extra],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = None
        for line in self.proc.stderr:
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                break
        if not self.url:
            raise SystemExit(f"serve exited with {self.proc.wait()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def load(url: str, bodies: list[dict], clients: int, max_seconds: float) -> dict:
    """Sends `bodies` from `clients` concurrent clients (one request each at a time); per-request latency."""
    latencies: list[float] = []
    next_body = iter(bodies)
    deadline = time.perf_counter() + max_seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def client() -> None:
            for body in next_body:
                if time.perf_counter() > deadline:
                    return
                t = time.perf_counter()
                async with session.post(f"{url}/v1/embeddings", json=body) as r:
                    payload = await r.read()
                    if r.status != 200:
                        raise SystemExit(f"status {r.status}: {payload[:500]!r}")
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "rate": len(latencies) / wall,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/icl-embed")
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--variant", default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--docs", type=int, default=256, help="passages per phase (requests)")
    p.add_argument("--queries", type=int, default=128, help="few-shot queries per phase (requests)")
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--query-clients", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=300, help="cap on each phase")
    p.add_argument("--output", help="also write the Markdown section here")
    a = p.parse_args()

    docs = spaced(document_pool(), a.docs)
    queries = spaced(air_bench_queries(), a.queries)
    instruction = load_instructions()[TASK]
    examples = json.loads((DATA / "MTEB" / f"{TASK}.json").read_text(encoding="utf-8"))[:SHOTS]
    clients = [int(c) for c in a.clients.split(",")]
    common = ["--variant", a.variant, "--device", "cpu", "--threads", str(a.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        (scratch / "examples.json").write_text(json.dumps(examples), encoding="utf-8")
        (scratch / "tasks.json").write_text(
            json.dumps({"msmarco": {"instruction": instruction, "examples": "examples.json"}}), encoding="utf-8"
        )
        query_args = ["--queries", "--task", instruction, "--examples", str(scratch / "examples.json")]
        tasks = ["--tasks", str(scratch / "tasks.json")]
        doc_bodies = [{"input": [t], "model": "bench", "encoding_format": "base64"} for t in docs]
        query_bodies = [{"input": [q], "task": "msmarco", "encoding_format": "base64"} for q in queries]
        results: dict[str, list] = {}

        def add(key: str, value) -> None:
            results.setdefault(key, []).append(value)

        cached = Server(a.binary, a.model, common, tasks)
        full = Server(a.binary, a.model, common, tasks + ["--no-prefix-cache"])
        try:
            # Warm-up: each server's first batches (and the prefix) before anything is timed.
            asyncio.run(load(cached.url, doc_bodies[:8] + query_bodies[:8], 4, a.max_seconds))
            asyncio.run(load(full.url, query_bodies[:8], 4, a.max_seconds))
            for run in range(a.runs):
                print(f"run {run + 1}/{a.runs}", file=sys.stderr)
                add("cli docs", cli_rate(a.binary, a.model, docs, scratch, common, []))
                for c in clients:
                    add(f"server docs {c}", asyncio.run(load(cached.url, doc_bodies, c, a.max_seconds)))
                add("cli queries", cli_rate(a.binary, a.model, queries, scratch, common, query_args))
                add(
                    "cli queries full",
                    cli_rate(a.binary, a.model, queries, scratch, common, query_args + ["--no-prefix-cache"]),
                )
                add("server queries", asyncio.run(load(cached.url, query_bodies, a.query_clients, a.max_seconds)))
                add("server queries full", asyncio.run(load(full.url, query_bodies, a.query_clients, a.max_seconds)))
                print(json.dumps({k: v[-1] for k, v in results.items()}), file=sys.stderr)
        finally:
            cached.stop()
            full.stop()

    def row(label: str, key: str, base: float) -> str:
        rs = results[key]
        rate = med([r["rate"] for r in rs])
        return (
            f"| {label} | {med([r['requests'] for r in rs]):.0f} | {rate:.3f} | {med([r['p50'] for r in rs]):,.0f} | "
            f"{med([r['p99'] for r in rs]):,.0f} | {rate / base:.2f}x |"
        )

    def clients_label(c: int, requests: int) -> str:
        # More clients than requests: at most `requests` are ever in flight.
        return str(c) if c <= requests else f"{c} ({requests} in flight)"

    cli_docs = med(results["cli docs"])
    cli_q = med(results["cli queries"])
    cli_q_full = med(results["cli queries full"])
    lines = [
        f"Package `{Path(a.model).name}`, variant {a.variant}, `--threads {a.threads}`, CPU; medians of {a.runs} runs; "
        f"`{' '.join(['python', 'tests/bench/server.py'] + sys.argv[1:])}`.",
        "",
        f"Documents: {len(docs)} passages, one per request (`/v1/embeddings`, base64). "
        f"CLI `embed` on the same passages: **{cli_docs:.3f} documents/s** (its `done:` line, load excluded).",
        "",
        "| clients | requests | documents/s | p50 ms | p99 ms | vs CLI |",
        "| --- | --- | --- | --- | --- | --- |",
        *[row(clients_label(c, len(docs)), f"server docs {c}", cli_docs) for c in clients],
        "",
        f"Few-shot queries: {len(queries)} AIR-Bench questions under {TASK}'s instruction and first {SHOTS} examples "
        f"(a `--tasks` preset), one per request, {clients_label(a.query_clients, len(queries))} clients. "
        f"CLI `embed --queries` on the same: {cli_q:.3f} queries/s with the prefix cache, {cli_q_full:.3f} with "
        "`--no-prefix-cache`.",
        "",
        "| server | requests | queries/s | p50 ms | p99 ms | vs CLI (cache) |",
        "| --- | --- | --- | --- | --- | --- |",
        row("shared prefix cache", "server queries", cli_q),
        row("`--no-prefix-cache`", "server queries full", cli_q),
        "",
        f"Prefix cache on the server: {med([r['rate'] for r in results['server queries']]) / med([r['rate'] for r in results['server queries full']]):.2f}x "
        "the queries/s of `--no-prefix-cache`.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.output:
        Path(a.output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
