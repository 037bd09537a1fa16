"""Memory and time of very long inputs (issue 24), for one or more binaries in the same run.

    PYTHONPATH=. .venv/bin/python tests/bench/long_inputs.py --model PKG \
        --binary new=target/release/icl-embed --binary old=/path/to/old/icl-embed

For each binary:
- the CLI: `icl-embed embed` on one line of --line-mb MB (real text from
  tests/data/flagembedding-icl-examples, repeated), peak RSS and wall time from `/usr/bin/time`;
  and the same on a one-line file of ordinary length, the figure the long line should approach;
- the server: `icl-embed serve` receiving --requests concurrent `/v1/embeddings` requests of
  --request-mb MB of text each (under the default 2,000,000-byte payload limit), its peak RSS
  (VmHWM from /proc) against its RSS once loaded, and how many requests answered 200.

Loopback only; the requests are bounded in number and time. Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from server import Server  # this script's folder

DATA = Path(__file__).resolve().parents[1] / "data" / "flagembedding-icl-examples"


def long_text(n_bytes: int) -> str:
    """Real prose (the AIR-Bench long documents), repeated to `n_bytes` and cut at a space."""
    parts = []
    for path in sorted((DATA / "AIR-Bench" / "long-doc").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                parts.append(json.loads(line)["pos"].replace("\n", " "))
    base = " ".join(parts)
    text = (base + " ") * (n_bytes // len(base.encode("utf-8")) + 1)
    return text.encode("utf-8")[:n_bytes].decode("utf-8", "ignore").rsplit(" ", 1)[0]


def kib(status: Path, field: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cli_run(binary: str, model: str, text: str, scratch: Path) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of `embed` on one line holding `text`."""
    src, out = scratch / "line.txt", scratch / "line.npy"
    src.write_text(text + "\n", encoding="utf-8")
    out.unlink(missing_ok=True)
    cmd = ["/usr/bin/time", "-f", "%M %e", binary, "embed", "--model", model, "--input", str(src)]
    cmd += ["--output", str(out), "--device", "cpu", "--variant", "fp32", "--threads", "2", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    peak_kib, wall = r.stderr.strip().splitlines()[-1].split()
    return int(peak_kib) / 1024, float(wall)


async def burst(url: str, text: str, requests: int) -> list[int]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> int:
            body = {"model": "m", "input": text, "encoding_format": "float"}
            async with session.post(f"{url}/v1/embeddings", json=body) as r:
                await r.read()
                return r.status

        return await asyncio.gather(*(one() for _ in range(requests)))


def server_run(binary: str, model: str, text: str, requests: int) -> dict:
    server = Server(binary, model, ["--device", "cpu", "--variant", "fp32", "--threads", "2"], [])
    try:
        status = Path(f"/proc/{server.proc.pid}/status")
        loaded = kib(status, "VmRSS") / 1024
        started = time.perf_counter()
        codes = asyncio.run(burst(server.url, text, requests))
        wall = time.perf_counter() - started
        return {
            "loaded_mib": loaded,
            "peak_mib": kib(status, "VmHWM") / 1024,
            "after_mib": kib(status, "VmRSS") / 1024,
            "ok": sum(c == 200 for c in codes),
            "codes": sorted(set(codes)),
            "wall_s": wall,
        }
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model package directory")
    p.add_argument("--binary", action="append", required=True, help="NAME=PATH, repeatable")
    p.add_argument("--line-mb", type=float, default=50)
    p.add_argument("--request-mb", type=float, default=1.9)
    p.add_argument("--requests", type=int, default=64)
    a = p.parse_args()
    line, request = long_text(int(a.line_mb * 1e6)), long_text(int(a.request_mb * 1e6))
    short = long_text(3000)
    print(f"line {len(line.encode()) / 1e6:.1f} MB, request {len(request.encode()) / 1e6:.2f} MB x {a.requests}")
    print(
        "| binary | CLI 50 MB line: peak RSS MiB, s | CLI 3 kB line: peak RSS MiB, s | server: loaded, peak, after MiB | 200s | server s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        for spec in a.binary:
            name, binary = spec.split("=", 1)
            big = cli_run(binary, a.model, line, Path(scratch))
            small = cli_run(binary, a.model, short, Path(scratch))
            s = server_run(binary, a.model, request, a.requests)
            print(
                f"| {name} | {big[0]:,.0f}, {big[1]:.2f} | {small[0]:,.0f}, {small[1]:.2f} | "
                f"{s['loaded_mib']:,.0f}, {s['peak_mib']:,.0f}, {s['after_mib']:,.0f} | "
                f"{s['ok']}/{a.requests} {s['codes']} | {s['wall_s']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
