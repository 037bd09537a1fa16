"""The MatMuls of one bge-en-icl layer (q, k, v, o, gate, up, down: 4096 x 4096, 4096 x 1024 twice,
4096 x 4096, 4096 x 14336 twice, 14336 x 4096) on ONNX Runtime's CPU provider, fp32 `MatMul`
against the int8 kernels the recipes use: `MatMulNBits` 8-bit weights at each block size and
accuracy level (4: int8 compute, llama.cpp q8_0-like; 1: fp32 compute), symmetric or with zero
points, and the per-token `MatMulIntegerToFloat` of the w8a8 recipes. Random weights and inputs;
each graph times M tokens at a time, alternating graphs within each repetition so that a shared
machine's load hits them alike; medians. Asserts nothing; prints a Markdown table.

    PYTHONPATH=. .venv/bin/python tests/bench/nbits_kernels.py [--tokens 512,8] [--runs 5] [--threads 2]
        [--kernels fp32,nbits-b32-acc4,...]

Under tests/bench/avx2only.sh the same on the AVX2 path of ONNX Runtime (CPUID masked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from export.cpu import cpu_class
from export.int8.tensors import quantize_matmul_weight, quantize_nbits_weight

HIDDEN, KV, INTERMEDIATE = 4096, 1024, 14336
# (name, K, N): the MatMuls of one layer; `down` reads the MLP's activations, the rest the hidden state.
SHAPES = [
    ("q", HIDDEN, HIDDEN),
    ("k", HIDDEN, KV),
    ("v", HIDDEN, KV),
    ("o", HIDDEN, HIDDEN),
    ("gate", HIDDEN, INTERMEDIATE),
    ("up", HIDDEN, INTERMEDIATE),
    ("down", INTERMEDIATE, HIDDEN),
]
KERNELS = [
    "fp32",
    "w8a8",
    "nbits-b32-acc4",
    "nbits-b64-acc4",
    "nbits-b128-acc4",
    "nbits-b256-acc4",
    "nbits-b32-acc4-zp128",
    "nbits-b32-acc4-zp",
    "nbits-b128-acc4-zp",
    "nbits-b32-acc1",
]


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal((k, n), dtype=np.float32) * 0.02) for name, k, n in SHAPES}


def _nbits(name: str, w: np.ndarray, block: int, acc: int, zp_kind: str, x: str, inits: list) -> onnx.NodeProto:
    """`zp_kind`: "" (symmetric, no zero point input: 128 implied), "zp128" (symmetric, the zero
    points given, all 128) or "zp" (asymmetric: each block's own)."""
    s = {"bits": 8, "block_size": block, "symmetric": zp_kind != "zp"}
    packed, scales, zp = quantize_nbits_weight(w, s, zero_points=True)
    if zp_kind == "zp128":
        zp = np.full_like(zp, 128)
    inputs = [x, f"{name}_q8", f"{name}_scales"]
    inits += [numpy_helper.from_array(packed, inputs[1]), numpy_helper.from_array(scales, inputs[2])]
    if zp_kind:
        inputs.append(f"{name}_zp")
        inits.append(numpy_helper.from_array(zp, inputs[3]))
    k, n = w.shape
    return helper.make_node(
        "MatMulNBits",
        inputs,
        [f"{name}_y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=8,
        block_size=block,
        accuracy_level=acc,
    )


def _w8a8(name: str, w: np.ndarray, x: str, nodes: list, inits: list) -> None:
    """Per-token u8 activations (as the w8a8 recipes quantize them) x per-channel s8 weights."""
    parts = quantize_matmul_weight(w)
    inits += [
        numpy_helper.from_array(parts["q"], f"{name}_w8"),
        numpy_helper.from_array(parts["scale"], f"{name}_s"),
        numpy_helper.from_array(np.array(0, np.int8), f"{name}_wzp"),
    ]
    k = w.shape[0]
    t = f"{name}_{x}"
    nodes += [
        helper.make_node("ReduceMax", [x, "axes"], [t + "_hi"], keepdims=1),
        helper.make_node("ReduceMin", [x, "axes"], [t + "_lo"], keepdims=1),
        helper.make_node("Neg", [t + "_lo"], [t + "_neg"]),
        helper.make_node("Max", [t + "_hi", t + "_neg"], [t + "_amax"]),
        helper.make_node("Mul", [t + "_amax", "inv127"], [t + "_scale"]),
        helper.make_node("Shape", [t + "_scale"], [t + "_shape"]),
        helper.make_node("Expand", ["zp_row", t + "_shape"], [t + "_zp"]),
        helper.make_node("QuantizeLinear", [x, t + "_scale", t + "_zp"], [t + "_q"], axis=-1, block_size=k),
        helper.make_node(
            "MatMulIntegerToFloat",
            [t + "_q", f"{name}_w8", "one", f"{name}_s", "zp", f"{name}_wzp"],
            [f"{name}_t"],
            domain="com.microsoft",
        ),
        helper.make_node("Mul", [f"{name}_t", t + "_scale"], [f"{name}_y"]),
    ]


def layer_graph(kernel: str, weights: dict[str, np.ndarray], path: Path) -> None:
    """One graph computing the seven MatMuls of a layer with `kernel`; outputs summed per input."""
    nodes: list = []
    inits: list = [
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1 / 127, np.float32), "inv127"),
        numpy_helper.from_array(np.array([128], np.uint8), "zp_row"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    for name, k, _ in SHAPES:
        x = "h" if k == HIDDEN else "m"
        w = weights[name]
        if kernel == "fp32":
            inits.append(numpy_helper.from_array(w, f"{name}_w"))
            nodes.append(helper.make_node("MatMul", [x, f"{name}_w"], [f"{name}_y"]))
        elif kernel == "w8a8":
            _w8a8(name, w, x, nodes, inits)
        else:
            parts = kernel.split("-")  # nbits-b32-acc4[-zp|-zp128]
            block, acc = int(parts[1][1:]), int(parts[2][3:])
            nodes.append(_nbits(name, w, block, acc, parts[3] if len(parts) > 3 else "", x, inits))
    outputs = [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["M", n]) for name, _, n in SHAPES]
    inputs = [
        helper.make_tensor_value_info("h", TensorProto.FLOAT, ["M", HIDDEN]),
        helper.make_tensor_value_info("m", TensorProto.FLOAT, ["M", INTERMEDIATE]),
    ]
    graph = helper.make_graph(nodes, kernel, inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/bench/nbits_kernels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="512,8", help="comma-separated M (tokens per run)")
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    kernels = args.kernels.split(",")
    weights = _weights()
    rng = np.random.default_rng(1)
    reference: dict[int, list[np.ndarray]] = {}
    times: dict[tuple[str, int], list[float]] = {}
    err: dict[tuple[str, int], float] = {}
    ms = [int(m) for m in args.tokens.split(",")]
    feeds = {
        m: {
            "h": rng.standard_normal((m, HIDDEN), dtype=np.float32),
            "m": rng.standard_normal((m, INTERMEDIATE), dtype=np.float32),
        }
        for m in ms
    }
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for kernel in kernels:
            path = Path(tmp) / f"{kernel}.onnx"
            layer_graph(kernel, weights, path)
            sessions[kernel] = session(path, args.threads)
        for m in ms:
            for kernel, sess in sessions.items():
                out = sess.run(None, feeds[m])  # warm-up, and the error against fp32
                if kernel == "fp32":
                    reference[m] = out
                ref = reference.get(m)
                if ref is not None:
                    err[(kernel, m)] = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(out, ref))
        for _ in range(args.runs):
            for m in ms:
                for kernel, sess in sessions.items():
                    start = time.perf_counter()
                    sess.run(None, feeds[m])
                    times.setdefault((kernel, m), []).append(time.perf_counter() - start)
    print(
        f"load average {os.getloadavg()[0]:.2f}; ONNX Runtime {ort.__version__}; {cpu_class()}; {args.threads} threads"
    )
    print("| kernel | tokens | ms per layer's MatMuls | vs fp32 | max error / max |fp32| |")
    print("| --- | --- | --- | --- | --- |")
    for m in ms:
        base = statistics.median(times[("fp32", m)]) if ("fp32", m) in times else float("nan")
        for kernel in kernels:
            t = statistics.median(times[(kernel, m)])
            print(f"| {kernel} | {m} | {t * 1000:.1f} | {base / t:.2f}x | {err.get((kernel, m), float('nan')):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
