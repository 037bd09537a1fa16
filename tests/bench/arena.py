"""The server's memory after one large request, and the cost on small ones (issue 24).

    PYTHONPATH=. .venv/bin/python tests/bench/arena.py --model PKG --binary target/release/icl-embed \
        --mode default= --mode keep=--keep-cpu-arena --rounds 3

For each mode (a name and the extra `serve` arguments, comma-separated), in alternating rounds:
a fresh server (fp32, --threads 2); 16 short document requests from 8 clients as a warm-up; RSS once
warm; one few-shot request on --example-tokens tokens of inline examples (the package's attention
window must be absent or larger); RSS right after the answer and --settle seconds later (VmRSS from
/proc/PID/status) and the peak (VmHWM); then --requests short requests (a passage's first --short-chars
characters each, 8 clients), their requests/s and p50 latency. Loopback only; bounded in requests and time. Nothing
here asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import aiohttp
from speed import document_pool  # this script's folder

from server import Server, load  # this script's folder

DATA = Path(__file__).resolve().parents[1] / "data" / "flagembedding-icl-examples"


def mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def examples(tokens: int) -> list[dict]:
    """MSMARCO's examples repeated until their text is about `tokens` tokens (4 bytes a token)."""
    base = json.loads((DATA / "MTEB" / "MSMARCO.json").read_text(encoding="utf-8"))
    out, size = [], 0
    while size < tokens * 4:
        e = base[len(out) % len(base)]
        out.append({"query": e["query"], "response": e["response"]})
        size += len(e["query"]) + len(e["response"])
    return out


async def one(url: str, body: dict) -> tuple[int, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        t = time.perf_counter()
        async with s.post(f"{url}/embed", json=body) as r:
            await r.read()
            return r.status, time.perf_counter() - t


def round_for(binary: str, model: str, extra: list[str], args, docs: list[str]) -> dict:
    common = [
        "--device",
        "cpu",
        "--variant",
        "fp32",
        "--threads",
        "2",
        "--max-prompt-tokens",
        str(args.max_prompt_tokens),
    ]
    server = Server(binary, model, common, extra)
    pid = server.proc.pid
    try:
        small = [{"model": "m", "input": [t]} for t in docs]
        asyncio.run(load(server.url, small[:16], 8, 120))
        warm = mib(pid, "VmRSS")
        body = {
            "inputs": ["what is the capital of france"],
            "instruction": "Retrieve passages.",
            "examples": examples(args.example_tokens),
        }
        status, took = asyncio.run(one(server.url, body))
        after = mib(pid, "VmRSS")
        time.sleep(args.settle)
        settled, peak = mib(pid, "VmRSS"), mib(pid, "VmHWM")
        r = asyncio.run(load(server.url, small[: args.requests], 8, 300))
        return {
            "warm": warm,
            "large_status": status,
            "large_s": took,
            "after": after,
            "settled": settled,
            "peak": peak,
            "rate": r["rate"],
            "p50": r["p50"],
            "end": mib(pid, "VmRSS"),
        }
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/release/icl-embed")
    p.add_argument("--model", required=True)
    p.add_argument("--mode", action="append", required=True, help="NAME=ARG,ARG (extra serve arguments)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--example-tokens", type=int, default=7000)
    p.add_argument("--max-prompt-tokens", type=int, default=8192)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--short-chars", type=int, default=300, help="characters of each short request's passage")
    p.add_argument("--settle", type=float, default=5.0)
    args = p.parse_args()
    modes = [(m.split("=", 1)[0], [a for a in m.split("=", 1)[1].split(",") if a]) for m in args.mode]
    docs = [t[: args.short_chars] for t in (document_pool() * 4)[: args.requests]]
    results: dict[str, list[dict]] = {name: [] for name, _ in modes}
    for i in range(args.rounds):
        for name, extra in modes if i % 2 == 0 else modes[::-1]:
            r = round_for(args.binary, args.model, extra, args, docs)
            results[name].append(r)
            print(json.dumps({"round": i, "mode": name, **{k: round(v, 3) for k, v in r.items()}}), flush=True)
    print("mode | RSS warm | right after | after settle | peak | large request | small req/s | p50 ms")
    for name, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(
            f"{name} | {med['warm']:.0f} | {med['after']:.0f} | {med['settled']:.0f} | {med['peak']:.0f} | "
            f"{med['large_s']:.2f} s ({med['large_status']:.0f}) | {med['rate']:.1f} | {med['p50']:.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
