"""The Python package against the CLI (issue 25): tokens/s of `icl_embed.Embedder` and of Ray Data
(`icl_embed.ray.Embed` through `map_batches` on a local `ray.init(num_cpus=2)`) against `icl-embed
embed`, same package, texts and threads, each run its own process, the engines alternating.

    PYTHONPATH=. .venv/bin/python tests/bench/python_api.py --binary target/release/icl-embed \\
        --package .cache/packages-.../slice7b --variant fp32 --docs 32 --queries 16 --runs 3

What each figure covers (all on the same token count, the CLI's `done:` line's):
- CLI: its `done:` time (reading, tokenizing, batching, forwards, writing; not the load), and the
  process's wall time (start, load, run, exit).
- Python: one `embed_documents` / `embed_queries` call after `Embedder(...)` returned (the load),
  the first call of the process like the CLI's; and the load.
- Ray Data: `ds.map_batches(Embed, ...).materialize()` from a dataset already in the object store:
  actor start, package load in each actor, the batches, moving the results; `ray.init` not counted.
  Compared with the CLI's wall time (which also loads the package once), and the load measured in the
  actors is printed beside it.
Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speed import DONE, air_bench_queries, document_pool, done_seconds, load_instructions, spaced  # this folder

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "tests" / "data" / "flagembedding-icl-examples" / "MTEB" / "MSMARCO.json"


def workload(kind: str, n: int) -> tuple[list[str], str | None, list[dict]]:
    if kind == "documents":
        return spaced(document_pool(), n), None, []
    examples = json.loads(EXAMPLES.read_text(encoding="utf-8"))[:3]
    return spaced(air_bench_queries(), n), load_instructions()["MSMARCO"], examples


def cli(a: argparse.Namespace, kind: str, scratch: Path) -> dict:
    texts, task, examples = workload(kind, a.docs if kind == "documents" else a.queries)
    src = scratch / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = scratch / "out.npy"
    out.unlink(missing_ok=True)
    cmd = [a.binary, "embed", "--model", a.package, "--input", str(src), "--output", str(out)]
    cmd += ["--variant", a.variant, "--device", "cpu", "--threads", str(a.threads)]
    if task is not None:
        ex = scratch / "examples.json"
        ex.write_text(json.dumps(examples), encoding="utf-8")
        cmd += ["--queries", "--task", task, "--examples", str(ex)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    m = DONE.search(proc.stderr)
    if m is None:
        raise RuntimeError(f"no done: line in {proc.stderr[-800:]}")
    return {"tokens": int(m.group(2)), "seconds": done_seconds(m), "wall": wall, "load": float(m.group(5))}


def worker(argv: list[str]) -> int:
    """One measured process: `worker python|ray-1x2|ray-2x1 KIND PACKAGE VARIANT THREADS N`."""
    engine, kind, package, variant, threads, n = argv
    texts, task, examples = workload(kind, int(n))
    if engine == "python":
        from icl_embed import Embedder

        start = time.perf_counter()
        embedder = Embedder(package, variant=variant, device="cpu", threads=int(threads))
        load = time.perf_counter() - start
        start = time.perf_counter()
        if task is None:
            embedder.embed_documents(texts)
        else:
            embedder.embed_queries(embedder.query_prompt(task, examples), texts)
        print(json.dumps({"seconds": time.perf_counter() - start, "load": load}))
        return 0
    import ray

    from icl_embed.ray import Embed

    class TimedEmbed(Embed):
        """Embed, with the seconds its constructor (the package load) took in a column."""

        def __init__(self, *args, **kwargs):
            start = time.perf_counter()
            super().__init__(*args, **kwargs)
            self.load = time.perf_counter() - start

        def __call__(self, batch):
            out = super().__call__(batch)
            out["load"] = [self.load] * len(out["embedding"])
            return out

    actors, cpus = {"ray-1x2": (1, 2), "ray-2x1": (2, 1)}[engine]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"text": t} for t in texts]).materialize()
    kwargs = {"model": package, "variant": variant, "device": "cpu"}
    if task is not None:
        kwargs.update(queries=True, task=task, examples=examples)
    start = time.perf_counter()
    out = ds.map_batches(
        TimedEmbed,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        batch_size=max(1, len(texts) // (2 * actors)),
    ).materialize()
    seconds = time.perf_counter() - start
    loads = sorted(set(out.to_pandas()["load"]))
    ray.shutdown()
    print(json.dumps({"seconds": seconds, "load": max(loads), "actors": len(loads)}))
    return 0


def measure(a: argparse.Namespace) -> dict[str, dict[str, list]]:
    engines = ["cli", "python", "ray-1x2", "ray-2x1"]
    results: dict[str, dict[str, list]] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.runs):
            for kind in ("documents", "queries"):
                # Rotate the order each repetition: no engine always runs first on a warm machine.
                order = engines[rep % len(engines) :] + engines[: rep % len(engines)]
                for engine in order:
                    if engine == "cli":
                        r = cli(a, kind, Path(tmp))
                    else:
                        n = a.docs if kind == "documents" else a.queries
                        cmd = [sys.executable, __file__, "worker", engine, kind, a.package, a.variant]
                        cmd += [str(a.threads), str(n)]
                        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        if proc.returncode != 0:
                            raise RuntimeError(f"{engine} {kind} failed:\n{proc.stderr[-2000:]}")
                        r = json.loads(proc.stdout.strip().splitlines()[-1])
                    for key, value in r.items():
                        results.setdefault(f"{kind}/{engine}", {}).setdefault(key, []).append(value)
                    print(f"rep {rep} {kind:9} {engine:8} {r}", file=sys.stderr, flush=True)
    return results


def report(a: argparse.Namespace, results: dict[str, dict[str, list]]) -> None:
    med = statistics.median
    print(f"\n{a.variant}, {a.threads} threads, medians of {a.runs}; tokens/s on the CLI's token count\n")
    print("| workload | engine | tokens | seconds | tokens/s | against the CLI | load s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in ("documents", "queries"):
        c = results[f"{kind}/cli"]
        tokens = c["tokens"][0]
        cli_run, cli_wall = med(c["seconds"]), med(c["wall"])
        rows = [
            ("CLI (`done:` time)", cli_run, None, med(c["load"])),
            ("CLI (process wall)", cli_wall, None, med(c["load"])),
            ("Python API (one call)", med(results[f"{kind}/python"]["seconds"]), cli_run, None),
            ("Ray Data, 1 actor x 2 threads", med(results[f"{kind}/ray-1x2"]["seconds"]), cli_wall, None),
            ("Ray Data, 2 actors x 1 thread", med(results[f"{kind}/ray-2x1"]["seconds"]), cli_wall, None),
        ]
        loads = {
            "Python API (one call)": results[f"{kind}/python"]["load"],
            "Ray Data, 1 actor x 2 threads": results[f"{kind}/ray-1x2"]["load"],
            "Ray Data, 2 actors x 1 thread": results[f"{kind}/ray-2x1"]["load"],
        }
        for name, secs, base, load in rows:
            ratio = f"{base / secs:.2f}x" if base else ""
            load = load if load is not None else med(loads[name])
            print(f"| {kind} | {name} | {tokens} | {secs:.2f} | {tokens / secs:,.0f} | {ratio} | {load:.2f} |")


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", required=True)
    p.add_argument("--package", required=True)
    p.add_argument("--variant", default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    cpu = sorted(set(re.findall(r"avx512_vnni|avx512f|avx2", Path("/proc/cpuinfo").read_text())))
    print(f"CPU: {os.cpu_count()} cores, {' '.join(cpu)}; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    report(a, measure(a))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
