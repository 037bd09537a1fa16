"""8-bit variants of the fp32 graph, and the measurement that chose the shipped one.

Method "w8a8" (`_w8a8`) rewrites every MatMul whose second input is a 2-D float initializer into
per-token dynamic int8 activations x per-output-channel int8 weights (com.microsoft
MatMulIntegerToFloat + a row-scale Mul), streaming one weight at a time; pair it with SmoothQuant
(`export/smooth.py`) applied to the PyTorch model before the fp32 graph is traced.

The shipped `int8` is weight-only: every constant MatMul weight becomes a `MatMulNBits` node with
8-bit symmetric blocks of 32 along the input dimension; activations stay fp32. Per-tensor dynamic
activation quantization (`quantize_dynamic`) is fast but not faithful on real LLM activations, whose
few huge values wipe out one shared scale (export/README.md has the table).

`python -m export.quantize --model DIR --fp32 GRAPH` rebuilds that table: each recipe's last-token
embeddings against the fp32 graph on the built-in samples, and its speed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str  # "matmulnbits" or "dynamic"
    settings: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The manifest's `quantization` field."""
        return {"method": self.method, **self.settings}


RECIPES = {
    "nbits8-acc1": Recipe("nbits8-acc1", "matmulnbits",
                          {"bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 1}),
    "nbits8-acc4": Recipe("nbits8-acc4", "matmulnbits",
                          {"bits": 8, "block_size": 32, "symmetric": True, "accuracy_level": 4}),
    "nbits4-acc4": Recipe("nbits4-acc4", "matmulnbits",
                          {"bits": 4, "block_size": 32, "symmetric": True, "accuracy_level": 4}),
    # Per-token dynamic int8 activations x per-output-channel int8 weights (method "w8a8", _w8a8).
    # u8 activations (zero point 128) with u8 weights (zero point 128) use ORT's exact u8u8 kernel;
    # u8 x s8 is faster but its AVX2 kernel (vpmaddubsw) saturates int16 pair sums, wrong on CPUs
    # without VNNI (measured: max abs error 93348 on random full-range inputs on the dev machine).
    "w8a8-token": Recipe("w8a8-token", "w8a8",
                         {"activations": "u8", "weights": "u8", "quant_op": "div", "matmul": "mmitf"}),
    "w8a8-token-s7": Recipe("w8a8-token-s7", "w8a8",
                            {"activations": "u8", "weights": "s7", "quant_op": "div", "matmul": "mmitf"}),
    # The shipped one: w8a8-token on the MLP's gate/up and the attention output (o), which carry
    # 61% of a layer's MatMul work and the least error; q/k/v and down (the most sensitive, measured
    # one kind at a time) stay fp32.
    "w8a8-mixed": Recipe("w8a8-mixed", "w8a8",
                         {"activations": "u8", "weights": "u8", "quant_op": "div", "matmul": "mmitf",
                          "keep": [r"[./]down[./]", r"[./](q|k|v)[./]"]}),
    "dynamic-int8": Recipe("dynamic-int8", "dynamic",
                           {"weight_type": "int8", "per_channel": True, "reduce_range": False,
                            "ops": ["MatMul"]}),
}

# export/README.md has the measurements: w8a8-token on every MatMul (even with SmoothQuant,
# export/smooth.py, and the 4 most sensitive MatMuls kept fp32) stays near min cosine 0.98 on
# smollm2; w8a8-mixed reaches 0.995 on the shared texts and is 1.3-1.5x fp32 on AVX2, but a
# one-token input (an empty text on a tokenizer without BOS) falls to 0.958, so `int8` stays the
# weight-only nbits8-acc1 (faithful everywhere, slower than fp32 on this CPU, a third of its size)
# and w8a8-mixed is the opt-in variant `w8a8` (`--variants ...,w8a8`).
SHIPPED_INT8 = RECIPES["nbits8-acc1"]
SHIPPED_W8A8 = RECIPES["w8a8-mixed"]


def with_keep(recipe: Recipe, patterns: list[str]) -> Recipe:
    """`recipe` (method w8a8) with MatMuls matching `patterns` (e.g. smooth.keep_patterns(...)) left fp32."""
    return Recipe(recipe.name + f"-keep{len(patterns)}", recipe.method,
                  {**recipe.settings, "keep": list(recipe.settings.get("keep", [])) + list(patterns)})


def quantize(src: Path, dst: Path, recipe: Recipe) -> None:
    """Write `dst` (+ `dst.name + ".data"`) from the fp32 graph `src`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if recipe.method == "matmulnbits":
        _matmul_nbits(src, dst, recipe.settings)
    elif recipe.method == "dynamic":
        _dynamic(src, dst, recipe.settings)
    elif recipe.method == "w8a8":
        _w8a8(src, dst, recipe.settings)
    else:
        raise ValueError(f"unknown quantization method {recipe.method!r}")
    gc.collect()
    log.info("quantized %s -> %s with %s", src, dst, recipe.describe())


def _matmul_nbits(src: Path, dst: Path, s: dict) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(os.fspath(src)),
        bits=s["bits"],
        block_size=s["block_size"],
        is_symmetric=s["symmetric"],
        accuracy_level=s["accuracy_level"],
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    # One external data file named after the graph: model.onnx -> model.onnx.data.
    quantizer.model.save_model_to_file(os.fspath(dst), use_external_data_format=True)
    del quantizer


def int8_matmul_weight(node: onnx.NodeProto, weight: np.ndarray,
                       recipe: Recipe | None = None) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """Quantize ONE MatMul weight for the streaming exporter (export/stream.py): `node` is the graph's
    MatMul (A x W), `weight` its fp32 W [in, out]; returns the nodes that replace `node` and the new
    initializers by name. This is the single place where int8 is chosen per tensor (the recipe may
    change here without touching the exporter). The shipped recipe (`SHIPPED_INT8`, MatMulNBits):
    ONNX Runtime's own block quantizer (`quantize_matmul_8bits`, what `MatMulNBitsQuantizer` calls),
    and the node and initializers that quantizer makes, named as it names them; a test checks the
    result against quantizing the whole graph with `MatMulNBitsQuantizer`."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    recipe = recipe or SHIPPED_INT8
    if recipe.method != "matmulnbits":
        raise ValueError(f"per-tensor quantization supports method matmulnbits, not {recipe.method!r}")
    s = recipe.settings
    bits, block = s["bits"], s["block_size"]
    if weight.ndim != 2:
        raise ValueError(f"{node.name}: a MatMul weight must be 2-D, got shape {weight.shape}")
    rows, cols = weight.shape
    kpack = 8 // bits
    k_blocks = (rows + block - 1) // block
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if k_blocks * block != rows:
        w = np.pad(w, ((0, k_blocks * block - rows), (0, 0)), "constant")
    packed = np.zeros((cols, k_blocks, (block + kpack - 1) // kpack), dtype=np.uint8)
    zero_points = np.zeros((cols, (k_blocks + kpack - 1) // kpack), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    pack = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    pack(packed, w, scales, zero_points, block, cols, rows, s["symmetric"])
    w_name = node.input[1]
    arrays = {f"{w_name}_Q{bits}": packed, f"{w_name}_scales": scales}
    inputs = [node.input[0], f"{w_name}_Q{bits}", f"{w_name}_scales"]
    if not s["symmetric"]:
        arrays[f"{w_name}_zero_points"] = zero_points
        inputs.append(f"{w_name}_zero_points")
    attrs = {"K": rows, "N": cols, "bits": bits, "block_size": block}
    if s["accuracy_level"]:
        attrs["accuracy_level"] = s["accuracy_level"]
    new = onnx.helper.make_node("MatMulNBits", inputs=inputs, outputs=[node.output[0]],
                                name=node.name + f"_Q{bits}" if node.name else "", domain="com.microsoft", **attrs)
    return [new], arrays


def _dynamic(src: Path, dst: Path, s: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        os.fspath(src),
        os.fspath(dst),
        op_types_to_quantize=s["ops"],
        per_channel=s["per_channel"],
        reduce_range=s["reduce_range"],
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
    )



# --- w8a8: per-token dynamic int8 activations x per-channel int8 weights ------------------------


def _eligible(graph: onnx.GraphProto, inits: dict) -> list[onnx.NodeProto]:
    """MatMul nodes whose second input is a 2-D float32 initializer and whose first is not."""
    out = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        w = inits.get(node.input[1])
        if w is None or node.input[0] in inits:
            continue
        if len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            out.append(node)
    return out


class _DataWriter:
    """Appends tensors to one external data file and points their protos at it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def put(self, tensor: onnx.TensorProto, raw: bytes) -> None:
        align = 4096 if len(raw) >= 1 << 20 else 64
        pad = (-self.offset) % align
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        self.file.write(raw)
        tensor.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(f)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(raw)

    def close(self) -> None:
        self.file.close()


def _read_raw(tensor: onnx.TensorProto, base: Path) -> bytes:
    info = {e.key: e.value for e in tensor.external_data}
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        length = info.get("length")
        return f.read(int(length)) if length is not None else f.read()


def _weight(tensor: onnx.TensorProto, base: Path) -> np.ndarray:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raw = _read_raw(tensor, base)
        return np.frombuffer(raw, dtype=np.float32).reshape(tuple(tensor.dims))
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def quantize_weight(w: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel (column of a [in, out] weight) int8: (q int8 [in, out], scale f32 [out])."""
    qmax = float(2 ** (bits - 1) - 1)
    scale = np.abs(w).max(axis=0).astype(np.float32) / qmax
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return q, scale


def _w8a8(src: Path, dst: Path, s: dict) -> None:
    """Rewrite every eligible MatMul(x, W) into per-token int8 x per-channel int8.

    Streams: weights are read, quantized and written one tensor at a time, so the peak memory is
    one weight matrix, not a copy of the model. Nodes named in `s["keep"]` (regexes on the MatMul's
    node name or weight name) stay fp32.
    """
    from onnx import helper

    act = s.get("activations", "u8")  # "u8" (zero point 128) or "s8"
    qop = s.get("quant_op", "div")  # "div" (Div/Round/Cast) or "qlinear" (per-axis QuantizeLinear)
    mm = s.get("matmul", "mmitf")  # "mmitf" (com.microsoft MatMulIntegerToFloat) or "mmi" (MatMulInteger)
    wtype = s.get("weights", "s8")  # "s8", "s7" (7-bit range, no u8s8 overflow on AVX2) or "u8" (zero point 128)
    keep = [re.compile(p) for p in s.get("keep", [])]

    model = onnx.load(os.fspath(src), load_external_data=False)
    g = model.graph
    base = src.parent
    inits = {t.name: t for t in g.initializer}
    targets = [n for n in _eligible(g, inits)
               if not any(p.search(n.name) or p.search(n.input[1]) for p in keep)]
    _eligible_names = [n.name for n in _eligible(g, inits)]
    target_ids = {id(n) for n in targets}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in g.output:
        uses[o.name] = uses.get(o.name, 0) + 1

    dst.parent.mkdir(parents=True, exist_ok=True)
    data_path = dst.parent / (dst.name + ".data")
    writer = _DataWriter(data_path)
    new_inits: list[onnx.TensorProto] = []
    counter = [0]

    def fresh(stem: str) -> str:
        counter[0] += 1
        return f"w8a8_{stem}_{counter[0]}"

    def const(name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        t = numpy_helper.from_array(arr, name)
        if t.ByteSize() > 4096:
            raw = t.raw_data
            writer.put(t, raw)
        new_inits.append(t)
        return name

    zp_dtype = np.uint8 if act == "u8" else np.int8
    zp_value = 128 if act == "u8" else 0
    c_axes = const("w8a8_axes_last", np.array([-1], dtype=np.int64))
    c_inv127 = const("w8a8_inv127", np.array(1.0 / 127.0, dtype=np.float32))
    c_eps = const("w8a8_eps", np.array(1e-12, dtype=np.float32))
    c_zp = const("w8a8_zp", np.array(zp_value, dtype=zp_dtype))
    c_one = const("w8a8_one", np.array(1.0, dtype=np.float32))
    c_128f = const("w8a8_128f", np.array(128.0, dtype=np.float32))
    c_wzp = const("w8a8_wzp", np.array(128 if wtype == "u8" else 0, dtype=np.uint8 if wtype == "u8" else np.int8))
    quantized_inputs: dict[str, tuple[str, str]] = {}  # activation -> (q, row scale [..., 1])
    weights: dict[str, tuple[str, str]] = {}  # weight -> (q name, scale name)

    def quant_activation(a: str, k: int, out: list) -> tuple[str, str]:
        if a in quantized_inputs:
            return quantized_inputs[a]
        stem = a.replace("/", "_")
        absn, amax, scale = fresh(stem + "_abs"), fresh(stem + "_amax"), fresh(stem + "_scale")
        out.append(helper.make_node("Abs", [a], [absn]))
        out.append(helper.make_node("ReduceMax", [absn, c_axes], [amax], keepdims=1))
        sc0 = fresh(stem + "_sc0")
        out.append(helper.make_node("Mul", [amax, c_inv127], [sc0]))
        out.append(helper.make_node("Max", [sc0, c_eps], [scale]))
        q = fresh(stem + "_q")
        if qop == "div":
            d, r = fresh(stem + "_div"), fresh(stem + "_round")
            out.append(helper.make_node("Div", [a, scale], [d]))
            out.append(helper.make_node("Round", [d], [r]))
            if act == "u8":
                r2 = fresh(stem + "_shift")
                out.append(helper.make_node("Add", [r, c_128f], [r2]))
                r = r2
            out.append(helper.make_node("Cast", [r], [q], to=onnx.TensorProto.UINT8 if act == "u8" else onnx.TensorProto.INT8))
        elif qop == "qlinear":
            # Per-axis QuantizeLinear over rows: flatten to [rows, K], 1-D scale per row.
            shape2 = const(fresh("shape2"), np.array([-1, k], dtype=np.int64))
            flat_a, flat_s, q2 = fresh(stem + "_flat"), fresh(stem + "_sflat"), fresh(stem + "_q2")
            out.append(helper.make_node("Reshape", [a, shape2], [flat_a]))
            shape1 = const(fresh("shape1"), np.array([-1], dtype=np.int64))
            out.append(helper.make_node("Reshape", [scale, shape1], [flat_s]))
            zpv = const(fresh("zpv"), np.array([zp_value], dtype=zp_dtype))
            # zero point must match the scale's shape for per-axis: expand it.
            zp_full = fresh(stem + "_zpfull")
            out.append(helper.make_node("Expand", [zpv, helper_shape(flat_s, out)], [zp_full]))
            out.append(helper.make_node("QuantizeLinear", [flat_a, flat_s, zp_full], [q2], axis=0))
            shp = fresh(stem + "_shape")
            out.append(helper.make_node("Shape", [a], [shp]))
            out.append(helper.make_node("Reshape", [q2, shp], [q]))
        else:
            raise ValueError(f"unknown quant_op {qop!r}")
        quantized_inputs[a] = (q, scale)
        return q, scale

    def helper_shape(name: str, out: list) -> str:
        s_ = fresh("shapeof")
        out.append(helper.make_node("Shape", [name], [s_]))
        return s_

    def quant_weight(wname: str) -> tuple[str, str]:
        if wname not in weights:
            w = _weight(inits[wname], base)
            q, scale = quantize_weight(w, 7 if wtype == "s7" else 8)
            del w
            if wtype == "u8":
                q = (q.astype(np.int16) + 128).astype(np.uint8)
            qn = const(wname + "_w8", q)
            sn = const(wname + "_w8_scale", scale)
            weights[wname] = (qn, sn)
        return weights[wname]

    new_nodes: list[onnx.NodeProto] = []
    replaced_weight_uses: dict[str, int] = {}
    for node in g.node:
        if id(node) not in target_ids:
            new_nodes.append(node)
            continue
        a, wname = node.input[0], node.input[1]
        (y,) = node.output
        k = int(inits[wname].dims[0])
        q, rs = quant_activation(a, k, new_nodes)
        qw, cs = quant_weight(wname)
        replaced_weight_uses[wname] = replaced_weight_uses.get(wname, 0) + 1
        stem = node.name or y
        if mm == "mmitf":
            t = fresh(stem + "_mm")
            new_nodes.append(helper.make_node("MatMulIntegerToFloat", [q, qw, c_one, cs, c_zp, c_wzp], [t],
                                              domain="com.microsoft", name=stem + "_w8a8"))
            new_nodes.append(helper.make_node("Mul", [t, rs], [y], name=stem + "_rowscale"))
        elif mm == "mmi":
            i32, f, t = fresh(stem + "_i32"), fresh(stem + "_f"), fresh(stem + "_cs")
            new_nodes.append(helper.make_node("MatMulInteger", [q, qw, c_zp, c_wzp], [i32], name=stem + "_w8a8"))
            new_nodes.append(helper.make_node("Cast", [i32], [f], to=onnx.TensorProto.FLOAT))
            new_nodes.append(helper.make_node("Mul", [f, cs], [t]))
            new_nodes.append(helper.make_node("Mul", [t, rs], [y], name=stem + "_rowscale"))
        else:
            raise ValueError(f"unknown matmul {mm!r}")

    # Initializers: drop weights no longer used, copy the rest into the new data file.
    kept = []
    for t in g.initializer:
        if t.name in replaced_weight_uses and replaced_weight_uses[t.name] >= uses.get(t.name, 0):
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            writer.put(t, _read_raw(t, base))
        kept.append(t)
    writer.close()
    referenced = {i for n in new_nodes for i in n.input}
    del g.initializer[:]
    g.initializer.extend(kept + [t for t in new_inits if t.name in referenced])
    del g.node[:]
    g.node.extend(new_nodes)
    if mm == "mmitf" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, os.fspath(dst))
    log.info("w8a8: %d MatMuls rewritten (%d activations quantized once each), %d kept fp32",
             len(targets), len(quantized_inputs), len(_eligible_names) - len(targets))


# --- the comparison (not part of an export) -----------------------------------------------------


def _embed_and_time(graph: Path, rows: list[list[int]], runs: int, threads: int) -> tuple[np.ndarray, float]:
    """Embeddings of one right-padded batch, and tokens/s of running each row alone (median of runs)."""
    from . import verify

    sess = verify.session(graph, threads)
    batch = verify.right_padded(rows, pad_id=0)
    emb = verify.last_token(verify.onnx_hidden(sess, batch), batch.attention_mask)
    singles = [batch.row(i) for i in range(len(rows))]
    verify.onnx_hidden(sess, singles[0])  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for single in singles:
            verify.onnx_hidden(sess, single)
        times.append(time.perf_counter() - start)
    tokens = sum(len(r) for r in rows)
    return emb, tokens / statistics.median(times)


def compare(model_dir: Path, fp32_graph: Path, recipes: list[Recipe], runs: int = 3, threads: int = 2) -> list[dict]:
    from transformers import AutoTokenizer

    from . import samples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [s.ids for s in samples.samples(tokenizer)]
    reference, fp32_speed = _embed_and_time(fp32_graph, rows, runs, threads)
    table = [{"recipe": "fp32 graph", "min_cosine": 1.0, "mean_cosine": 1.0, "tokens_per_s": fp32_speed}]
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            dst = Path(tmp) / recipe.name / "model.onnx"
            start = time.perf_counter()
            quantize(fp32_graph, dst, recipe)
            seconds = time.perf_counter() - start
            emb, speed = _embed_and_time(dst, rows, runs, threads)
            cos = np.sum(reference * emb, axis=1)
            table.append({"recipe": recipe.name, "settings": recipe.describe(), "min_cosine": float(cos.min()),
                          "mean_cosine": float(cos.mean()), "tokens_per_s": speed, "quantize_s": seconds})
            log.info("%s", table[-1])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model directory (for its tokenizer)")
    parser.add_argument("--fp32", type=Path, required=True, help="the exported fp32 model.onnx")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    recipes = [RECIPES[name] for name in args.recipes.split(",")]
    table = compare(args.model, args.fp32, recipes, args.runs, args.threads)
    print("| recipe | min cosine | mean cosine | tokens/s |")
    print("| --- | --- | --- | --- |")
    for row in table:
        print(f"| {row['recipe']} | {row['min_cosine']:.4f} | {row['mean_cosine']:.4f} | {row['tokens_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
