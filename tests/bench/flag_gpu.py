"""FlagEmbedding in fp16 on the GPU against icl-embed on CUDA, same inputs (tests/bench/gpu_machine.sh).

    python tests/bench/flag_gpu.py --model DIR --package PKG --binary BIN --work DIR [--runs 3]

--work is the folder tests/gpu.sh kept (GPU_WORK): its docs.txt, queries.txt and examples.json,
and its embeddings (cpu_* fp32 on the CPU, cuda_* fp16 on CUDA). The timed inputs are those
repeated (documents x --copies, queries x half as many) so that one run keeps the GPU busy; each side gets one
untimed warm-up run, then --runs timed runs with its own defaults (FlagICLModel's batch size;
icl-embed's 16384-token batches), and the median is reported. icl-embed's time is its own `done:`
line (compute, without loading); its token count is used for both sides (the tokenization is the
same). Cosines: FlagEmbedding fp16 against icl-embed fp16 on CUDA and against fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TASK = "Given a web search query, retrieve relevant passages that answer the query."
DONE = re.compile(r"^done: (\d+) items, (\d+) tokens, ([0-9.]+) s")


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def cli_run(args: argparse.Namespace, input_path: Path, extra: list[str]) -> tuple[int, float, np.ndarray]:
    out = args.work / "timed.npy"
    cmd = [
        str(args.binary),
        "embed",
        "--model",
        str(args.package),
        "--input",
        str(input_path),
        "--output",
        str(out),
        "--device",
        args.device,
        "--variant",
        args.variant,
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"icl-embed failed ({proc.returncode}): {proc.stderr[-2000:]}")
    m = [DONE.match(line) for line in proc.stderr.splitlines()]
    m = [x for x in m if x]
    if not m:
        sys.exit(f"icl-embed printed no done: line: {proc.stderr[-2000:]}")
    return int(m[-1].group(2)), float(m[-1].group(3)), np.load(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--binary", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--copies", type=int, default=16, help="documents x N, queries x N/2 (default 16)")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of this script")
    p.add_argument("--variant", default="fp16", help="icl-embed's variant; FlagEmbedding runs fp16 unless fp32")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    docs = args.work.joinpath("docs.txt").read_text(encoding="utf-8").splitlines()
    queries = args.work.joinpath("queries.txt").read_text(encoding="utf-8").splitlines()
    examples = json.loads(args.work.joinpath("examples.json").read_text(encoding="utf-8"))
    workloads = {
        "documents": (docs * args.copies, []),
        "3-shot queries": (
            queries * max(1, args.copies // 2),
            ["--queries", "--task", TASK, "--examples", str(args.work / "examples.json")],
        ),
    }

    import torch
    from FlagEmbedding import FlagICLModel

    gpu = args.device == "cuda"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if gpu else 'cpu'}")
    start = time.perf_counter()
    model = FlagICLModel(
        str(args.model),
        query_instruction_for_retrieval=TASK,
        examples_for_task=examples,
        use_fp16=args.variant != "fp32",
        devices="cuda:0" if gpu else "cpu",
        query_max_length=512,
        passage_max_length=512,
    )
    print(f"FlagEmbedding load {time.perf_counter() - start:.1f} s")

    for name, (texts, extra) in workloads.items():
        path = args.work / f"timed_{len(texts)}.txt"
        path.write_text("\n".join(texts) + "\n", encoding="utf-8")
        encode = model.encode_corpus if not extra else model.encode_queries
        flag = np.asarray(encode(texts), dtype=np.float32)  # warm-up
        flag_s = []
        for _ in range(args.runs):
            if gpu:
                torch.cuda.synchronize()
            t = time.perf_counter()
            flag = np.asarray(encode(texts), dtype=np.float32)
            flag_s.append(time.perf_counter() - t)
        cli_run(args, path, extra)  # warm-up
        runs = [cli_run(args, path, extra) for _ in range(args.runs)]
        tokens, ours = runs[-1][0], runs[-1][2]
        cli_s = statistics.median(r[1] for r in runs)
        fs = statistics.median(flag_s)
        print(
            f"{name}: {len(texts)} texts, {tokens} tokens; icl-embed {args.device} {args.variant} {cli_s:.3f} s "
            f"({tokens / cli_s:,.0f} tokens/s; runs {', '.join(f'{r[1]:.3f}' for r in runs)}); "
            f"FlagEmbedding {fs:.3f} s ({tokens / fs:,.0f} tokens/s; runs "
            f"{', '.join(f'{s:.3f}' for s in flag_s)}); icl-embed / FlagEmbedding speed {fs / cli_s:.2f}x"
        )
        print(
            f"{name}: min cosine icl-embed {args.device} {args.variant} vs FlagEmbedding {min_cosine(ours, flag):.6f}"
        )
        short = "docs" if not extra else "q"
        n = len(docs) if not extra else len(queries)
        cpu = np.load(args.work / f"cpu_{short}.npy")
        print(f"{name}: min cosine FlagEmbedding vs icl-embed cpu fp32 {min_cosine(flag[:n], cpu):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
