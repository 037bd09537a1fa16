"""A well-behaved client's latency and success rate with and without stalled connections (issue 24).

    .venv/bin/python tests/bench/slow_clients.py --binary target/debug/icl-embed --model PKG \
        [--stalled 512] [--requests 300] [--clients 4]

Starts `icl-embed serve` on 127.0.0.1 (CPU, one thread, default limits: 512 concurrent requests,
10 s header and 30 s body read timeouts), then runs the same load twice: `--clients` concurrent
clients sending `--requests` one-passage `POST /v1/embeddings` requests in all, first alone, then
while `--stalled` connections hold a request open (headers and "{" of a 100-byte body, never
finished). Before the fix those connections held every concurrency slot and the server answered
429 to everyone else. Prints p50/p99 latency, requests/s and the share answered 200 for each phase.
Bounded: only loopback, at most --requests per phase, and the stalled connections live under the
server's 30 s body timeout (a phase that would outlast it stops early and says so).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp

from server import Server  # this script's folder

PASSAGE = "The quick brown fox jumps over the lazy dog near the riverbank in the early morning {}."


async def load(addr: str, requests: int, clients: int, budget: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    started = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.perf_counter() - started > budget:
                return
            t = time.perf_counter()
            try:
                async with session.post(f"http://{addr}/v1/embeddings", json={"input": PASSAGE.format(i)}) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError:
                status = 0
            latencies.append(time.perf_counter() - t)
            statuses[status] = statuses.get(status, 0) + 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    took = time.perf_counter() - started
    latencies.sort()
    done = len(latencies)
    return {
        "requests": done,
        "ok": statuses.get(200, 0) / max(done, 1),
        "statuses": statuses,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(done - 1, int(0.99 * done))],
        "per_s": done / took,
    }


async def stall(addr: str, n: int) -> list[asyncio.StreamWriter]:
    host, port = addr.rsplit(":", 1)
    writers = []
    for _ in range(n):
        _, w = await asyncio.open_connection(host, int(port))
        w.write(
            f"POST /v1/embeddings HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n{".encode()
        )
        await w.drain()
        writers.append(w)
    return writers


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default="target/debug/icl-embed")
    p.add_argument("--model", required=True)
    p.add_argument("--stalled", type=int, default=512)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=4)
    a = p.parse_args()
    server = Server(a.binary, a.model, ["--variant", "fp32", "--device", "cpu", "--threads", "1"], [])
    try:
        addr = server.url.removeprefix("http://")
        await load(addr, 20, 2, 10)  # warm-up
        alone = await load(addr, a.requests, a.clients, 25)
        t = time.perf_counter()
        writers = await stall(addr, a.stalled)
        opened = time.perf_counter() - t
        stalled = await load(addr, a.requests, a.clients, 25 - opened)
        for w in writers:
            w.close()
        for name, r in [("alone", alone), (f"with {a.stalled} stalled", stalled)]:
            print(
                f"{name:>18}: {r['requests']} requests, {100 * r['ok']:.1f}% 200 {r['statuses']}, "
                f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['per_s']:.1f}/s"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
