"""Speed and memory of `icl-embed` against Python ONNX Runtime and FlagEmbedding (issues 4 and 5).

Driven by `bash tests/bench/run.sh` (which builds the stand-ins, packages and the release binary);
this script measures and writes BENCHMARKS.md. Nothing here asserts a timing.

    python tests/bench/speed.py check-instructions
    python tests/bench/speed.py run --binary B --model NAME=MODEL_DIR,PACKAGE_DIR ... --output FILE
    python tests/bench/speed.py worker-ort ... | worker-flag ...     (one measured process; internal)

Every row of every table is its own process (or processes, for the CLI), run under
`/usr/bin/time -f %M` for its peak RSS. Each row runs `--warmup` unmeasured repetitions of the whole
workload, then `--runs` measured ones; the tables give medians. What each engine's time covers:

- `icl-embed`: the CLI's own `done:` line (everything after the package and session are loaded:
  reading, tokenizing, batching, the forward runs, writing the output); its `load` figure is the
  CLI's load time (manifest, tokenizer, ONNX Runtime session). "whole run" is the process wall time.
- Python `onnxruntime`: the forward runs (plus pooling) on the ids `icl-embed tokenize` printed,
  right-padded in the batches the CLI would make (longest first, rows x padded length <= 4096,
  at most 64 rows, cut to least padding + per-batch overhead); load is `InferenceSession` creation.
- FlagEmbedding: `encode_corpus` / `encode_queries` of `FlagICLModel(use_fp16=False, devices="cpu")`
  with its default batching (including its batch-size probe, one extra forward of the first batch
  per call); load is the constructor.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "flagembedding-icl-examples"
INSTRUCTIONS = ROOT / "tests" / "data" / "mteb_instructions.json"
STREAM_BEGIN = "<!-- stream-memory:begin -->"
STREAM_END = "<!-- stream-memory:end -->"
MAX_LENGTH = 512
SHOTS = 3
REAL_LAYERS = 32
# CLI defaults on CPU (README): rows x padded length per batch, rows per batch.
BATCH_TOKENS = 4096
MAX_ROWS = 64
BATCH_OVERHEAD = 64  # src/engine/plan.rs
GIB_MIB = 1024


# ----------------------------------------------------------------------------------------------
# instructions


def mteb_tasks() -> list[str]:
    return sorted(Path(p).stem for p in glob.glob(str(DATA / "MTEB" / "*.json")))


def load_instructions() -> dict[str, str]:
    with open(INSTRUCTIONS, encoding="utf-8") as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if not k.startswith("_")}


def check_instructions() -> list[str]:
    """Problems with tests/data/mteb_instructions.json (empty when it is complete)."""
    with open(INSTRUCTIONS, encoding="utf-8") as f:
        data = json.load(f)
    tasks = mteb_tasks()
    problems = []
    if not tasks:
        problems.append(f"no MTEB example files under {DATA / 'MTEB'}")
    entries = {k: v for k, v in data.items() if not k.startswith("_")}
    for task in tasks:
        value = entries.get(task)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{task}: no instruction")
    for task in sorted(set(entries) - set(tasks)):
        problems.append(f"{task}: an instruction without an MTEB example file")
    written = data.get("_written_by_us", [])
    if not isinstance(written, list) or any(t not in entries for t in written):
        problems.append("_written_by_us must list tasks of this file")
    return problems


# ----------------------------------------------------------------------------------------------
# workloads


@dataclass
class Part:
    """One CLI invocation's worth of input: documents, or the queries of one task."""

    name: str
    texts: list[str]
    task: str | None = None
    examples: list[dict[str, str]] | None = None
    texts_file: Path | None = None
    examples_file: Path | None = None
    ids_file: Path | None = None
    ids: list[list[int]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.ids)


@dataclass
class Workload:
    kind: str  # "documents" or "queries"
    parts: list[Part]
    source: str = ""  # where query texts come from (queries)

    @property
    def items(self) -> int:
        return sum(len(p.texts) for p in self.parts)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.parts)


def spaced(pool: list[Any], n: int, offset: int = 0, stride: int = 1) -> list[Any]:
    """n items spread evenly over pool (deterministic); offset/stride interleave several picks."""
    if n <= 0 or not pool:
        return []
    total = n * stride
    return [pool[((i * stride + offset) * len(pool)) // total] for i in range(n)]


MIN_PASSAGE_CHARS = 200


def document_pool() -> list[str]:
    """Passages: MTEB example `response` fields (tasks sorted, file order), then AIR-Bench `pos`
    fields, of at least MIN_PASSAGE_CHARS characters (the shorter ones are class labels and titles)."""
    pool = []
    for task in mteb_tasks():
        with open(DATA / "MTEB" / f"{task}.json", encoding="utf-8") as f:
            pool += [e["response"] for e in json.load(f) if e.get("response")]
    for path in sorted(glob.glob(str(DATA / "AIR-Bench" / "*" / "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    pos = json.loads(line).get("pos")
                    pool += [pos] if isinstance(pos, str) else list(pos or [])
    return [text for text in pool if len(text) >= MIN_PASSAGE_CHARS]


def air_bench_queries() -> list[str]:
    """The AIR-Bench `query` fields (qa, then long-doc; files sorted): real retrieval questions."""
    pool = []
    for kind in ("qa", "long-doc"):
        for path in sorted(glob.glob(str(DATA / "AIR-Bench" / kind / "*.jsonl"))):
            with open(path, encoding="utf-8") as f:
                pool += [json.loads(line)["query"] for line in f if line.strip()]
    return pool


def make_workloads(
    n_docs: int, tasks: list[str], per_task: int, query_source: str = "mteb"
) -> tuple[Workload, Workload]:
    docs = Workload("documents", [Part("documents", spaced(document_pool(), n_docs))])
    instructions = load_instructions()
    examples = {}
    for task in tasks:
        with open(DATA / "MTEB" / f"{task}.json", encoding="utf-8") as f:
            examples[task] = json.load(f)[:SHOTS]
    # Query texts, spread evenly and interleaved between the measured tasks: the AIR-Bench
    # questions (`air-bench`), or the example queries of the other MTEB tasks (`mteb`: tasks sorted,
    # file order; a length mix from short questions to whole reviews and arguments).
    if query_source == "air-bench":
        pool = air_bench_queries()
    else:
        pool = []
        for task in mteb_tasks():
            if task in tasks:
                continue
            with open(DATA / "MTEB" / f"{task}.json", encoding="utf-8") as f:
                pool += [e["query"] for e in json.load(f) if e.get("query")]
    parts = [
        Part(task, spaced(pool, per_task, k, len(tasks)), instructions[task], examples[task])
        for k, task in enumerate(tasks)
    ]
    return docs, Workload("queries", parts, query_source)


def prepare(work: Workload, binary: str, package: str, directory: Path) -> None:
    """Writes each part's texts and examples and gets its final ids from `icl-embed tokenize`."""
    directory.mkdir(parents=True, exist_ok=True)
    for part in work.parts:
        stem = f"{work.kind}-{part.name}"
        part.texts_file = directory / f"{stem}.jsonl"
        with open(part.texts_file, "w", encoding="utf-8") as f:
            for text in part.texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        cmd = [binary, "tokenize", "--model", package, "--input", str(part.texts_file), "--max-length", str(MAX_LENGTH)]
        if part.task is not None:
            part.examples_file = directory / f"{stem}.examples.json"
            with open(part.examples_file, "w", encoding="utf-8") as f:
                json.dump(part.examples, f, ensure_ascii=False)
            cmd += ["--queries", "--task", part.task, "--examples", str(part.examples_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        out = proc.stdout
        rows = sorted((json.loads(line) for line in out.splitlines() if line.strip()), key=lambda r: r["index"])
        part.ids = [r["ids"] for r in rows]
        if len(part.ids) != len(part.texts):
            raise SystemExit(f"tokenize gave {len(part.ids)} rows for {len(part.texts)} texts")
        part.ids_file = directory / f"{stem}.ids.json"
        part.ids_file.write_text(json.dumps(part.ids))


# ----------------------------------------------------------------------------------------------
# measured processes


@dataclass
class Row:
    engine: str
    variant: str
    load_s: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # measured seconds per repetition
    walls: list[float] = field(default_factory=list)  # process wall seconds per repetition (CLI)
    rss_kb: int = 0
    weights: int = 0
    embeddings: Any = None  # [N, hidden] in workload order, for the cosine column
    prefix_line: str | None = None  # the CLI's `prefix cache: ...` summary (queries)
    error: str | None = None


def timed(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int, float]:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M %e", "-o", tf.name, *cmd], capture_output=True, text=True, env=env
        )
        fields = (tf.read().strip().splitlines() or ["0 0"])[-1].split()
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()]
        print(f"    {shlex.join(cmd)}\n" + "\n".join(lines[-20:]), file=sys.stderr)
        raise RuntimeError(f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}")
    try:
        return proc, int(fields[0]), float(fields[1])
    except (ValueError, IndexError):
        return proc, 0, 0.0


# `done: N items, T tokens, S s, K skipped (I items/s, R tokens/s; load L s) -> OUT`. S has two
# decimals; T / R recovers the unrounded seconds when R is large enough to be precise.
DONE = re.compile(r"done: (\d+) items, (\d+) tokens, ([\d.]+) s,.*?([\d.]+) tokens/s; load ([\d.]+) s")


def done_seconds(m: re.Match) -> float:
    tokens, secs, rate = int(m.group(2)), float(m.group(3)), float(m.group(4))
    return tokens / rate if rate >= 1000 and tokens else secs


def run_cli(
    row: Row,
    args: argparse.Namespace,
    env: dict[str, str],
    package: str,
    work: Workload,
    extra: list[str],
    scratch: Path,
) -> None:
    import numpy as np

    for rep in range(args.warmup + args.runs):
        compute = wall = 0.0
        loads, outs = [], []
        for part in work.parts:
            out = scratch / f"cli-{work.kind}-{part.name}.npy"
            out.unlink(missing_ok=True)
            for stale in scratch.glob(out.name + ".partial*"):  # left by an interrupted bench
                stale.unlink()
            cmd = [
                args.binary,
                "embed",
                "--model",
                package,
                "--input",
                str(part.texts_file),
                "--output",
                str(out),
                "--device",
                "cpu",
                "--threads",
                str(args.threads),
                "--variant",
                row.variant,
                "--max-length",
                str(MAX_LENGTH),
                *extra,
            ]
            if part.task is not None:
                cmd += ["--queries", "--task", part.task, "--examples", str(part.examples_file)]
            proc, kb, secs = timed(cmd, env)
            m = DONE.search(proc.stderr)
            if m is None:
                raise RuntimeError(f"no `done:` summary from {shlex.join(cmd)}:\n{proc.stderr[-1000:]}")
            compute += done_seconds(m)
            cached = re.findall(r"prefix cache: (.*)", proc.stderr)
            if cached:
                row.prefix_line = cached[-1].strip()
            loads.append(float(m.group(5)))
            wall += secs
            row.rss_kb = max(row.rss_kb, kb)
            outs.append(np.load(out))
        if rep >= args.warmup:
            row.times.append(compute)
            row.walls.append(wall)
            row.load_s += loads
            row.embeddings = np.concatenate(outs)


def run_worker(row: Row, args: argparse.Namespace, env: dict[str, str], worker: list[str], scratch: Path) -> None:
    import numpy as np

    result = scratch / "worker.json"
    emb = scratch / "worker.npy"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *worker,
        "--threads",
        str(args.threads),
        "--runs",
        str(args.runs),
        "--warmup",
        str(args.warmup),
        "--result",
        str(result),
        "--save",
        str(emb),
    ]
    _, kb, _ = timed(cmd, env)
    data = json.loads(result.read_text())
    row.load_s = [data["load_s"]]
    row.times = data["times"]
    row.rss_kb = kb
    row.embeddings = np.load(emb)


def worker_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--save", type=Path, required=True)


def timed_runs(a: argparse.Namespace, once, load: float) -> int:
    """A worker's measurement: `once()` warm-up and measured runs; saves the last embeddings and
    the load and run times for the parent."""
    import numpy as np

    times, emb = [], None
    for rep in range(a.warmup + a.runs):
        t = time.perf_counter()
        emb = once()
        if rep >= a.warmup:
            times.append(time.perf_counter() - t)
    np.save(a.save, emb)
    a.result.write_text(json.dumps({"load_s": load, "times": times}))
    return 0


def worker_ort(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="speed.py worker-ort")
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--ids", type=Path, action="append", required=True, help="JSON list of id lists; repeatable")
    worker_common(p)
    a = p.parse_args(argv)
    import numpy as np
    import onnxruntime as ort

    from export.cpu import session_options

    manifest = json.loads((a.package / "embedder.json").read_text())
    spec = manifest["variants"][a.variant]
    pad_id = int(manifest["special_tokens"].get("pad_id") or 0)
    start = time.perf_counter()
    # As the runtime sets them: exact int8 (session.x64quantprecision) on a CPU without VNNI.
    session = ort.InferenceSession(
        str(a.package / spec["file"]), session_options(a.threads), providers=["CPUExecutionProvider"]
    )
    load = time.perf_counter() - start
    names = {i.name for i in session.get_inputs()}
    # Graphs exported with a prefix cache also take past keys/values ([1, kv heads, past, head dim]);
    # an empty past (length 0) is the plain forward over the whole prompt.
    empty_past = {}
    for i in session.get_inputs():
        if i.name.startswith("past"):
            dims = [d if isinstance(d, int) else 0 for d in i.shape]
            dims[0] = 1
            dtype = np.float16 if "float16" in i.type else np.float32
            empty_past[i.name] = np.zeros(dims, dtype=dtype)
    output = spec.get("output") or session.get_outputs()[0].name
    ids = [row for path in a.ids for row in json.loads(path.read_text())]
    lengths = [len(r) for r in ids]
    batches = []
    for rows in plan(lengths, BATCH_TOKENS, MAX_ROWS):  # padded once, outside the timed region
        seq = max(lengths[r] for r in rows)
        input_ids = np.full((len(rows), seq), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), seq), dtype=np.int64)
        for i, r in enumerate(rows):
            input_ids[i, : lengths[r]] = ids[r]
            mask[i, : lengths[r]] = 1
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        feed = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
        batches.append((rows, {**{k: v for k, v in feed.items() if k in names}, **empty_past}))

    def once() -> np.ndarray:
        out = np.zeros((len(ids), 0), dtype=np.float32)
        for rows, feed in batches:
            hidden = session.run([output], feed)[0]
            last = hidden[np.arange(len(rows)), feed["attention_mask"].sum(axis=1) - 1].astype(np.float32)
            last /= np.maximum(np.linalg.norm(last, axis=1, keepdims=True), 1e-12)
            if out.shape[1] == 0:
                out = np.zeros((len(ids), last.shape[1]), dtype=np.float32)
            out[rows] = last
        return out

    return timed_runs(a, once, load)


def plan(lengths: list[int], budget: int, max_rows: int) -> list[list[int]]:
    """The CLI's batch plan (src/engine/plan.rs `plan`): longest first, ties in input order, rows x longest
    <= budget, at most max_rows rows, cut where padded tokens + BATCH_OVERHEAD per batch is least."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best, end = [None] * n + [0], [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        longest = max(lengths[order[i]], 1)
        for j in range(i + 1, n + 1):
            rows = j - i
            if rows > max(max_rows, 1) or (rows > 1 and rows * longest > budget):
                break
            cost = rows * longest + BATCH_OVERHEAD + best[j]
            if best[i] is None or cost <= best[i]:
                best[i], end[i] = cost, j
    batches, i = [], 0
    while i < n:
        batches.append(order[i : end[i]])
        i = end[i]
    return batches


def worker_flag(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="speed.py worker-flag")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument(
        "--part",
        type=Path,
        action="append",
        required=True,
        help="JSON {texts, task, examples} (task null: documents); repeatable",
    )
    worker_common(p)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from FlagEmbedding import FlagICLModel

    parts = [json.loads(path.read_text()) for path in a.part]
    start = time.perf_counter()
    model = FlagICLModel(
        str(a.model),
        query_instruction_for_retrieval=parts[0]["task"],
        examples_for_task=parts[0]["examples"],
        use_fp16=False,
        devices="cpu",
        query_max_length=MAX_LENGTH,
        passage_max_length=MAX_LENGTH,
    )
    load = time.perf_counter() - start

    def once() -> np.ndarray:
        outs = []
        for part in parts:
            if part["task"] is None:
                outs.append(model.encode_corpus(part["texts"]))
            else:
                model.query_instruction_for_retrieval = part["task"]
                model.set_examples(part["examples"])
                outs.append(model.encode_queries(part["texts"]))
        return np.concatenate([np.asarray(o, dtype=np.float32) for o in outs])

    return timed_runs(a, once, load)


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class Model:
    name: str
    model_dir: Path
    package: Path
    n_docs: int


def variant_bytes(package: Path, variant: str) -> int:
    spec = json.loads((package / "embedder.json").read_text())["variants"][variant]
    return sum((package / spec[k]).stat().st_size for k in ("file", "data") if spec.get(k))


def safetensors_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def cli_flags(binary: str) -> set[str]:
    out = subprocess.run([binary, "embed", "--help"], capture_output=True, text=True).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


def measure(model: Model, work: Workload, args: argparse.Namespace, scratch: Path, log) -> list[Row]:
    env = dict(
        os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false"
    )
    rows: list[Row] = []

    def attempt(row: Row, fn, *a) -> None:
        log(f"  {model.name} {work.kind}: {row.engine} {row.variant}")
        try:
            fn(row, *a)
        except Exception as err:  # a failing row is reported in its table, the others still run
            row.error = str(err).strip().splitlines()[0][:400]
            log(f"    failed: {err}")
        rows.append(row)

    flag_parts = []
    for part in work.parts:
        path = scratch / f"flag-{work.kind}-{part.name}.json"
        path.write_text(json.dumps({"texts": part.texts, "task": part.task, "examples": part.examples}))
        flag_parts += ["--part", str(path)]
    fe = Row("FlagEmbedding (PyTorch)", "fp32", weights=safetensors_bytes(model.model_dir))
    attempt(fe, run_worker, args, env, ["worker-flag", "--model", str(model.model_dir), *flag_parts], scratch)
    cache_flag = "--no-prefix-cache" in args.flags
    for variant in args.variants:
        row = Row("icl-embed", variant, weights=variant_bytes(model.package, variant))
        attempt(row, run_cli, args, env, str(model.package), work, [], scratch)
        if work.kind == "queries" and cache_flag:
            row = Row("icl-embed --no-prefix-cache", variant, weights=variant_bytes(model.package, variant))
            attempt(row, run_cli, args, env, str(model.package), work, ["--no-prefix-cache"], scratch)
    ids = []
    for part in work.parts:
        ids += ["--ids", str(part.ids_file)]
    for variant in args.ort_variants:
        row = Row("onnxruntime (Python)", variant, weights=variant_bytes(model.package, variant))
        attempt(
            row,
            run_worker,
            args,
            env,
            ["worker-ort", "--package", str(model.package), "--variant", variant, *ids],
            scratch,
        )
    return rows


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def min_cos(a: Any, b: Any) -> float | None:
    import numpy as np

    if a is None or b is None or a.shape != b.shape:
        return None
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(a * b, axis=1)))


def flag_row(rows: list[Row]) -> Row | None:
    """The table's FlagEmbedding row, if it ran: what the "vs FlagEmbedding" ratios divide by."""
    return next((r for r in rows if r.engine.startswith("FlagEmbedding") and r.times), None)


def table(model: Model, work: Workload, rows: list[Row]) -> list[str]:
    fe = flag_row(rows)
    fe_rate = work.tokens / med(fe.times) if fe else None
    head = [
        "engine",
        "variant",
        "tokens/s",
        "embeddings/s",
        "vs FlagEmbedding",
        "load (s)",
        "whole run (s)",
        "peak RSS (MiB)",
        "weights (MiB)",
        "min cos vs FlagEmbedding",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        if r.error:
            cells = [r.engine, r.variant, f"failed: {r.error}"] + [""] * (len(head) - 3)
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
            continue
        t = med(r.times)
        rate = work.tokens / t if t else None
        cells = [
            r.engine,
            r.variant,
            fmt(rate),
            fmt(work.items / t if t else None, 2),
            fmt(rate / fe_rate, 2) + "x" if rate and fe_rate else "-",
            fmt(med(r.load_s), 2),
            fmt(med(r.walls), 2) if r.walls else "-",
            f"{r.rss_kb / 1024:,.0f}",
            mib(r.weights),
            fmt(min_cos(r.embeddings, fe.embeddings if fe else None), 4) if r is not fe else "(reference)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def prefix_cache_table(work: Workload, rows: list[Row]) -> list[str]:
    fe = flag_row(rows)
    lines = [
        "| variant | queries/s with prefix cache | without (`--no-prefix-cache`) | ratio | "
        "with cache vs FlagEmbedding | the CLI's `prefix cache:` line |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for with_row in (r for r in rows if r.engine == "icl-embed" and r.times):
        without = next(
            (
                r
                for r in rows
                if r.engine == "icl-embed --no-prefix-cache" and r.variant == with_row.variant and r.times
            ),
            None,
        )
        if without is None:
            continue
        a, b = work.items / med(with_row.times), work.items / med(without.times)
        vs_fe = f"{a / (work.items / med(fe.times)):.2f}x" if fe else "-"
        lines.append(
            f"| {with_row.variant} | {a:,.2f} | {b:,.2f} | {a / b:.2f}x | {vs_fe} | "
            f"{(with_row.prefix_line or '-').replace('|', '/')} |"
        )
    if len(lines) <= 2:
        return []
    # What the cache can save: per (task, examples), N queries with a P-token shared prefix and q new
    # tokens each cost N(P + q) without it and P + Nq with it (attention to the prefix aside).
    bounds = []
    for part in work.parts:
        lengths = [len(r) for r in part.ids]
        prefix = len(os.path.commonprefix(part.ids)) if len(part.ids) > 1 else 0
        new = sum(lengths) - prefix * len(lengths)
        if prefix and new:
            bounds.append(
                f"{part.name}: {len(lengths)} queries, {prefix}-token shared prefix, {new / len(lengths):.1f} "
                f"new tokens per query on average: at most {sum(lengths) / (prefix + new):.1f}x"
            )
    if bounds:
        lines += [
            "",
            "Token arithmetic (the ratio's ceiling if every token cost the same): "
            + "; ".join(bounds)
            + ". The ceiling grows with the queries per (task, examples), toward (P + q) / q.",
        ]
    return lines


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def machine() -> list[str]:
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in sh(["lscpu"]).splitlines() if ln.startswith("Model name")),
        platform.processor() or "unknown CPU",
    )
    mem = next((int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    flags = open("/proc/cpuinfo").read()
    isa = [
        name
        for name, flag in (
            ("AVX2", "avx2"),
            ("AVX-512", "avx512f"),
            ("AVX-512 VNNI", "avx512_vnni"),
            ("AVX-VNNI", "avx_vnni"),
            ("AMX", "amx_int8"),
        )
        if re.search(rf"\b{flag}\b", flags)
    ]
    versions = {}
    for mod in ("onnxruntime", "torch", "transformers", "FlagEmbedding", "numpy"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod.lower() if mod != "FlagEmbedding" else "FlagEmbedding")
        except Exception:
            versions[mod] = "?"
    commit = sh(["git", "rev-parse", "--short", "HEAD"]) or "?"
    dirty = " with uncommitted changes" if sh(["git", "status", "--porcelain", "--untracked-files=no"]) else ""
    load = os.getloadavg()[0]
    from export.cpu import cpu_class

    seen = cpu_class()  # CPUID as this process reads it: differs from /proc/cpuinfo under avx2only.sh
    if "avx2only" in os.environ.get("LD_PRELOAD", ""):
        isa.append(f"**CPUID masked by tests/bench/avx2only.sh: every process ran as {seen}**")
    return [
        f"- CPU: {cpu}{' (' + ', '.join(isa) + ')' if isa else ''}; {os.cpu_count()} logical cores visible "
        f"(`nproc`: {sh(['nproc']) or '?'}); {mem / 2**20:.1f} GiB RAM; no GPU used (`--device cpu`)",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"load average when the run started: {load:.2f}",
        f"- software: onnxruntime {versions['onnxruntime']}, torch {versions['torch']}, transformers "
        f"{versions['transformers']}, FlagEmbedding {versions['FlagEmbedding']}, numpy {versions['numpy']}, "
        f"{sh(['rustc', '--version']) or 'rustc ?'}, Python {platform.python_version()}",
        f"- code: git commit {commit}{dirty}",
    ]


def stream_section(args: argparse.Namespace) -> list[str]:
    if args.stream_table:
        table_lines = [ln for ln in Path(args.stream_table).read_text().splitlines() if ln.startswith("|")]
        rss = {}
        for ln in table_lines[2:]:
            cells = [c.strip() for c in ln.strip("|").split("|")]
            rss.setdefault(cells[0], []).append(int(cells[2]))
        growth = ""
        if "10000" in rss and "1000000" in rss:
            growth = (
                f"From 10 000 to 1 000 000 lines the peak grows by "
                f"{max(rss['1000000']) - max(rss['10000'])} MiB (the goal: under 50 MB). "
            )
        return [
            "## Streaming memory (issue 6)",
            "",
            "`bash tests/bench/stream_memory.sh` (rerun by `bash tests/bench/run.sh --stream-memory`): peak RSS",
            "(`/usr/bin/time -f %M`) of one whole `icl-embed embed` run (release build, `--device cpu --variant fp32",
            "--threads 2`, default `--chunk-records 1024`) over 10 000 and 1 000 000 short lines (3 to 11 words), on",
            "the `tiny` stand-in so that the run measures reading, tokenizing, batching and writing rather than the",
            "model. Machine: as in the header.",
            "",
            *table_lines,
            "",
            growth + "What stays resident is one chunk of texts, ids and embeddings, the tokenizer and the ONNX",
            "Runtime session; with `--id-field` a set of 64-bit id hashes is added for the duplicate check (about",
            "16-32 bytes per record).",
        ]
    text = Path(args.previous).read_text() if args.previous and Path(args.previous).exists() else ""
    if STREAM_BEGIN in text and STREAM_END in text:
        body = text.split(STREAM_BEGIN, 1)[1].split(STREAM_END, 1)[0].strip("\n")
        return body.splitlines()
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line.startswith("## Streaming memory")
        if inside:
            lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines or [
        "## Streaming memory (issue 6)",
        "",
        "Not measured: run `bash tests/bench/run.sh --stream-memory`.",
    ]


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="speed.py run")
    p.add_argument("--binary", required=True)
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="NAME=MODEL_DIR,PACKAGE_DIR[,N_DOCS[,VARIANTS]]; VARIANTS joined by '+' override --variants",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tasks", default="SciFact,Banking77Classification")
    p.add_argument("--queries-per-task", type=int, default=4)
    p.add_argument(
        "--query-source",
        choices=("mteb", "air-bench"),
        default="mteb",
        help="query texts: other MTEB tasks' example queries, or the AIR-Bench questions",
    )
    p.add_argument("--variants", default="fp32,fp16,int8")
    p.add_argument("--ort-variants", default="fp32,int8")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument(
        "--previous", default=str(ROOT / "BENCHMARKS.md"), help="file whose streaming-memory section is carried over"
    )
    p.add_argument("--stream-table", default=None, help="fresh output of tests/bench/stream_memory.sh")
    p.add_argument("--command", default="bash tests/bench/run.sh", help="the command to print above tables")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench" / "work")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    all_variants = args.variants
    args.ort_variants = [v for v in args.ort_variants.split(",") if v]
    problems = check_instructions()
    if problems:
        print("tests/data/mteb_instructions.json: " + "; ".join(problems), file=sys.stderr)
        return 1
    args.flags = cli_flags(args.binary)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in load_instructions()]
    if unknown:
        p.error(f"no MTEB task {unknown}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    header = machine()
    started = time.time()
    sections: list[str] = []
    memory_rows: list[tuple[str, str, Row]] = []
    for spec in args.model:
        name, rest = spec.split("=", 1)
        fields = rest.split(",")
        n_docs = int(fields[2]) if len(fields) > 2 else {"slice7b": 16}.get(name, 64)
        model = Model(name, Path(fields[0]), Path(fields[1]), n_docs)
        args.variants = fields[3].split("+") if len(fields) > 3 else all_variants
        config = json.loads((model.model_dir / "config.json").read_text())
        docs, queries = make_workloads(model.n_docs, tasks, args.queries_per_task, args.query_source)
        scratch = args.work / name
        sections += [f"### {name}", "", model_blurb(name, config, model), ""]
        for work in (docs, queries):
            prepare(work, args.binary, str(model.package), scratch)
            rows = measure(model, work, args, scratch, log)
            memory_rows += [(name, work.kind, r) for r in rows if r.engine == "icl-embed" and not r.error]
            sections += [
                f"#### {name}: {work_title(work)}",
                "",
                workload_blurb(work, model),
                "",
                f"`{args.command}`",
                "",
                *table(model, work, rows),
                "",
            ]
            if work.kind == "queries":
                cache = prefix_cache_table(work, rows)
                if cache:
                    sections += [
                        "Prefix cache: the `icl-embed` rows above with and without `--no-prefix-cache` "
                        "(tokens/s counts every prompt token, whether its prefix was computed or reused).",
                        "",
                        f"`{args.command}`",
                        "",
                        *cache,
                        "",
                    ]
                elif "--no-prefix-cache" not in args.flags:
                    sections += [
                        "`icl-embed embed --help` lists no `--no-prefix-cache` in this build, so there "
                        "is no with/without prefix-cache comparison.",
                        "",
                    ]
    doc = render(args, header, sections, memory_rows, time.time() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(doc)
    log(f"wrote {args.output}")
    return 0


def model_blurb(name: str, config: dict[str, Any], model: Model) -> str:
    shape = (
        f"{config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}, MLP "
        f"{config.get('intermediate_size')}, {config.get('num_attention_heads')}/"
        f"{config.get('num_key_value_heads')} heads, vocabulary {config.get('vocab_size')}"
    )
    if name.startswith("slice7b"):
        layers = int(config.get("num_hidden_layers") or 2)
        return (
            f"`slice7b`: bge-en-icl's exact layer shapes with {layers} of its {REAL_LAYERS} layers ({shape}), "
            f"random weights: the per-layer speed of the real model's shapes. What the real model does at "
            f'all {REAL_LAYERS} layers is measured, not extrapolated, in the section "bge-en-icl at full '
            f'size" below (a full-depth stand-in).'
        )
    if name.startswith("smollm2"):
        return f"`smollm2`: SmolLM2-135M-Instruct with its real weights ({shape}), the stand-in with real activations."
    return f"`{name}` ({shape})."


QUERY_SOURCES = {
    "air-bench": "the AIR-Bench `query` fields of `tests/data/flagembedding-icl-examples` (qa, then long-doc; "
    "real retrieval questions)",
    "mteb": "MTEB example queries of the other tasks",
}


def work_title(work: Workload) -> str:
    return "documents" if work.kind == "documents" else "few-shot queries"


def workload_blurb(work: Workload, model: Model) -> str:
    lengths = [len(r) for p in work.parts for r in p.ids]
    stats = (
        f"{work.items} text{'' if work.items == 1 else 's'}, {work.tokens:,} tokens (min {min(lengths)}, median "
        f"{statistics.median(lengths):.0f}, max {max(lengths)} per text), max length {MAX_LENGTH}"
    )
    if work.kind == "documents":
        return (
            f"{stats}: passages spread evenly over the MTEB example `response` fields and the AIR-Bench `pos` "
            f"fields of `tests/data/flagembedding-icl-examples` of at least {MIN_PASSAGE_CHARS} characters "
            f"(the shorter `response` fields are class labels and titles)."
        )
    tasks = "; ".join(
        f"{p.name} ({len(p.texts)} quer{'y' if len(p.texts) == 1 else 'ies'}, {SHOTS}-shot prefix of "
        f"{len(p.examples or [])} examples, instruction from tests/data/mteb_instructions.json)"
        for p in work.parts
    )
    return (
        f"{stats}, counted over the whole prompts (prefix + instruction + query + suffix), what each engine "
        f"embeds: {tasks}. Query texts: {QUERY_SOURCES[work.source]}, spread evenly. `icl-embed` "
        f"runs once per task (`--queries --task T --examples E`); its load time is counted once per run."
    )


def render(
    args: argparse.Namespace,
    header: list[str],
    sections: list[str],
    memory_rows: list[tuple[str, str, Row]],
    elapsed: float,
) -> str:
    out = [
        "# Benchmarks",
        "",
        f"Generated by `{args.command}` ({elapsed / 60:.0f} min); edit tests/bench/speed.py, not this file. "
        "Every table says the command that regenerates it. Speeds are never asserted in tests.",
        "",
    ]
    if args.quick:
        out += ["**Smoke run (`--quick`): tiny inputs and one repetition; these numbers mean nothing.**", ""]
    out += [
        "## Machine",
        "",
        *header,
        "",
        STREAM_BEGIN,
        *stream_section(args),
        STREAM_END,
        "",
        "## Speed against FlagEmbedding and Python ONNX Runtime (issue 4)",
        "",
        f"{args.threads} threads everywhere, CPU. Each figure is the median of {args.runs} measured "
        f"repetition(s) after {args.warmup} warm-up(s); every row is its own process(es). tokens/s and "
        'embeddings/s exclude loading; "load" is the time to load the package or model; "whole run" is '
        'the wall time of the `icl-embed` process(es) of one repetition, load included; "vs FlagEmbedding" '
        "is the tokens/s ratio against the FlagEmbedding row of the same table; peak RSS is the largest "
        "`/usr/bin/time -f %M` of the row's processes; weights are the files the row loads (graph and "
        "external data, or safetensors); the cosine is the minimum over the inputs of each embedding against "
        "FlagEmbedding's. What each engine's time covers:",
        "",
        "- `icl-embed embed --device cpu --threads N --variant V` (release build): the CLI's own `done:` "
        "figure, everything after loading (reading, tokenizing, batching, forward runs, writing `.npy`);",
        "- Python `onnxruntime` on the same graphs: the forward runs and pooling only, on the ids "
        "`icl-embed tokenize` prints, right-padded in the batches the CLI makes (src/engine/plan.rs: longest first, "
        f"rows x padded length <= {BATCH_TOKENS}, at most {MAX_ROWS} rows);",
        '- FlagEmbedding `FlagICLModel(use_fp16=False, devices="cpu")`, `encode_corpus` / `encode_queries` '
        "with its default batching, as a user runs it (it probes the batch size with one extra forward of "
        "its first batch on every call).",
        "",
        *sections,
    ]
    out += [
        "## Peak memory against the weights (issue 4)",
        "",
        "Goal: peak RSS <= weights + 1 GiB (1024 MiB) for `icl-embed`. From the tables above.",
        "",
        f"`{args.command}`",
        "",
        "| model | input | variant | weights (MiB) | peak RSS (MiB) | RSS - weights (MiB) | <= weights + 1 GiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, kind, r in memory_rows:
        over = r.rss_kb / 1024 - r.weights / 2**20
        out.append(
            f"| {name} | {kind} | {r.variant} | {mib(r.weights)} | {r.rss_kb / 1024:,.0f} | "
            f"{over:,.0f} | {'yes' if over <= GIB_MIB else '**no**'} |"
        )
    for block in carried_blocks(args):
        out += ["", *block]
    return "\n".join(out).rstrip() + "\n"


def carried_blocks(args: argparse.Namespace) -> list[list[str]]:
    """Sections other harnesses write (the server's, the full-size run's), each between
    `<!-- NAME:begin -->` and `<!-- NAME:end -->` in the previous file: carried over verbatim, markers
    included, since this run does not measure them."""
    text = Path(args.previous).read_text() if args.previous and Path(args.previous).exists() else ""
    blocks = []
    for name in re.findall(r"<!-- ([\w-]+):begin -->", text):
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin == STREAM_BEGIN or end not in text:
            continue
        body = text.split(begin, 1)[1].split(end, 1)[0].strip("\n")
        blocks.append([begin, *body.splitlines(), end])
    return blocks


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "check-instructions":
        problems = check_instructions()
        for problem in problems:
            print(f"tests/data/mteb_instructions.json: {problem}", file=sys.stderr)
        if not problems:
            print(f"tests/data/mteb_instructions.json: {len(mteb_tasks())} MTEB tasks, all with an instruction")
        return 1 if problems else 0
    if command == "run":
        return run(rest)
    if command == "worker-ort":
        return worker_ort(rest)
    if command == "worker-flag":
        return worker_flag(rest)
    print(f"unknown command {command!r}; see --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
