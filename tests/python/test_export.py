"""The exporter (`python -m export`) on the tiny stand-in: package contents, manifest, graph
signatures, parity, batching, and the atomic/refusal behaviour.

Set ICL_TINY_DIR to reuse a built tiny model directory and ICL_TINY_PKG to reuse an exported package
(all three variants); otherwise both are built once per session (about a minute and a half), unless
ICL_REQUIRE_FIXTURES=1, under which they must be given (conftest.py).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from export import cpu, manifest, samples, stream, verify
from export.int8 import calibrate, recipes, rewrite, select, tensors
from export.ortrun.batch import last_token, right_padded, without_start
from export.ortrun.batched import batched, batches, embed_rows, embed_segmented
from export.ortrun.segmented import Run, SegmentedGraph
from export.ortrun.session import empty_past, onnx_hidden, past_inputs, prefix_states, session
from export.stream import Checkpoint

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = ("fp32", "fp16", "int8")
ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, cached) -> Path:
    if (built := cached("ICL_TINY_DIR")) is not None:
        return built
    out = tmp_path_factory.mktemp("standin") / "tiny"
    subprocess.run([sys.executable, "-m", "export.standins", "tiny", "--out", str(out)], cwd=ROOT, check=True)
    return out


@pytest.fixture(scope="session")
def package(tiny_dir, tmp_path_factory, cached) -> Path:
    if (built := cached("ICL_TINY_PKG")) is not None:
        return built
    out = tmp_path_factory.mktemp("pkg") / "tiny"
    result = run_export("--model", str(tiny_dir), "--out", str(out), "--variants", ",".join(VARIANTS))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.fixture(scope="session")
def meta(package) -> dict:
    return json.loads((package / "embedder.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_package_files_present(package):
    assert (package / "embedder.json").is_file()
    assert (package / "tokenizer.json").is_file()
    for v in VARIANTS:
        assert (package / v / "model.onnx").is_file()
        assert (package / v / "model.onnx.data").stat().st_size > 0
    assert not list(package.parent.glob(f"{package.name}.partial-*"))


def test_tokenizer_copied_unchanged(package, tiny_dir):
    assert (package / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_manifest_fields(package, meta):
    assert meta["format"] == "icl-embed/2"
    assert set(meta["source"]) == {"model", "revision", "model_type", "architecture", "family"}
    assert meta["source"]["family"] == "bge-en-icl"  # detected by its three ICL tokens
    assert meta["source"]["model_type"] == "mistral"
    assert meta["source"]["architecture"] == "MistralModel"
    arch = meta["architecture"]
    assert arch == {
        "layers": 2,
        "hidden": 64,
        "intermediate": arch["intermediate"],
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "vocab": 32003,
        "rope_theta": 10000.0,
        "rms_norm_eps": arch["rms_norm_eps"],
        "sliding_window": None,
    }  # the tiny stand-in's config has no window
    assert isinstance(arch["intermediate"], int) and isinstance(arch["rms_norm_eps"], float)
    assert meta["pooling"] == "last_token" and meta["normalize"] is True and meta["padding_side"] == "right"
    # bge-en-icl's prompt as format 1 wrote it (issue 27: unchanged), plus the procedure and no default task.
    assert meta["prompt"] == {
        "procedure": "flagembedding-icl",
        "query": "<instruct>{task}\n<query>{query}",
        "default_task": None,
        "example": "<instruct>{instruct}\n<query>{query}\n<response>{response}",
        "example_separator": "\n\n",
        "suffix": "\n<response>",
    }
    assert meta["dimensions"] is None
    assert meta["max_length"] == {"query": 512, "document": 512}
    assert isinstance(meta["clean_up_tokenization_spaces"], bool)
    assert meta["tokenizer"]["file"] == "tokenizer.json"
    assert set(meta["variants"]) == set(VARIANTS)
    for name, v in meta["variants"].items():
        assert v["file"] == f"{name}/model.onnx" and v["data"] == f"{name}/model.onnx.data"
        assert v["inputs"] == ["input_ids", "attention_mask", "position_ids"]
        assert v["output"] == "last_hidden_state"
        assert v["output_dtype"] in ONNX_TYPES
    assert meta["variants"]["fp32"]["dtype"] == "float32" and meta["variants"]["fp32"]["quantization"] is None
    assert meta["variants"]["fp16"]["dtype"] == "float16"
    quant = meta["variants"]["int8"]["quantization"]
    sel = quant["selection"]
    recipe = recipes.RECIPES[quant["recipe"]]
    assert {k: v for k, v in quant.items() if k != "selection"} == recipe.describe()
    assert sel["chosen"] == quant["recipe"] and sel["thresholds"] == select.FIDELITY
    tried = {t["recipe"]: t for t in sel["tried"]}
    assert len(tried) == len(sel["tried"]) and quant["recipe"] in tried and set(tried) <= set(recipes.CANDIDATES)
    assert sel["faithful"] == select.meets(tried[quant["recipe"]])
    faster = recipes.CANDIDATES[: recipes.CANDIDATES.index(quant["recipe"])]
    for name in faster:  # each faster recipe missed, or one at least as precise as it did
        missed = tried.get(name) or tried[sel["skipped"][name]]
        assert not select.meets(missed), f"{name} passed over, though {missed['recipe']} was faithful"
        assert missed["recipe"] == name or recipes.at_least_as_precise(
            recipes.RECIPES[missed["recipe"]], recipes.RECIPES[name]
        )
    graph = onnx.load(str(package / meta["variants"]["int8"]["file"]), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    if recipe.method == "w8a8":
        assert "MatMulIntegerToFloat" in ops
        s8 = [t for t in graph.initializer if t.name.endswith("_w8")]
        assert s8 and all(t.data_type == onnx.TensorProto.INT8 for t in s8)


def test_w8a8_loads_and_is_exact_where_the_cpu_lacks_vnni(package, tokenizer, tmp_path):
    """Without VNNI the runtime sets `session.x64quantprecision` (src/backend/runtime.rs), and ONNX Runtime
    then rewrites every MatMulIntegerToFloat's int8 weight and zero point to uint8 at load. A w8a8
    graph must load that way and give what the session of this CPU gives (both exact products)."""
    graph = tmp_path / "w8a8" / "model.onnx"
    calibrate.quantize(package / "fp32" / "model.onnx", graph, recipes.RECIPES["w8a8"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry(cpu.X64_QUANT_PRECISION, "1")
    forced = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    batch = right_padded([s.ids for s in samples.samples(tokenizer, 512)], pad_id=0)
    np.testing.assert_allclose(onnx_hidden(forced, batch), onnx_hidden(session(graph), batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["w8a8-o8", "nbits8-acc4-b32"])
def test_int8_from_the_checkpoint_equals_int8_from_the_fp32_graph(name, package, tiny_dir, tokenizer, tmp_path):
    """The exporter quantizes tensor by tensor from the checkpoint (`Fp32Model.from_checkpoint`),
    without an fp32 graph on disk (issue 12), the weight-only last resort too: the same int8
    graph, to the bit, as quantizing the fp32 graph (outlier channels and int8 embedding rows
    included)."""
    recipe = recipes.RECIPES[name]
    fp32 = package / "fp32" / "model.onnx"
    stats = calibrate.calibrate(fp32, calibrate.calibration_rows(tokenizer)[:6])
    from_graph, from_checkpoint = tmp_path / "graph" / "model.onnx", tmp_path / "checkpoint" / "model.onnx"
    calibrate.quantize(fp32, from_graph, recipe, stats)
    traced = stream.trace(stream.skeleton(AutoConfig.from_pretrained(tiny_dir)), torch.float32)
    calibrate.Fp32Model.from_checkpoint(traced, stream.Checkpoint(tiny_dir)).quantize(recipe, from_checkpoint, stats)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "graph"], "no fp32 graph written on the way"
    ops = [n.op_type for n in onnx.load(str(from_checkpoint), load_external_data=False).graph.node]
    if recipe.method == "w8a8":
        assert "MatMulIntegerToFloat" in ops and "MatMul" in ops  # int8 products and fp32 outlier products
    else:
        assert "MatMulNBits" in ops and "MatMul" in ops  # block-wise products; attention stays MatMul
    batch = right_padded([s.ids for s in samples.samples(tokenizer, 512)], pad_id=0)
    np.testing.assert_array_equal(onnx_hidden(session(from_checkpoint), batch), onnx_hidden(session(from_graph), batch))


def test_int8_selection_measures_the_checkpoint_as_the_fp32_graph(package, tiny_dir, tokenizer):
    """`choose` measures against the fp32 model run one layer at a time with its weights read from
    the checkpoint (no fp32 graph written): the same reference embeddings, start states and
    calibration statistics as the exported fp32 graph gives."""
    config = AutoConfig.from_pretrained(tiny_dir)
    traced = stream.trace(stream.skeleton(config), torch.float32)
    rows = calibrate.calibration_rows(tokenizer)[:8] + calibrate.calibration_rows(tokenizer)[-3:]
    ids = [tokenizer.bos_token_id]
    streamed = calibrate.Fp32Model.from_checkpoint(traced, stream.Checkpoint(tiny_dir)).measure(rows, ids)
    graph = calibrate.Fp32Model.from_graph(package / "fp32" / "model.onnx").measure(rows, ids)
    whole = session(package / "fp32" / "model.onnx")
    np.testing.assert_allclose(streamed.reference, graph.reference, rtol=0, atol=1e-6)
    for i, row in enumerate(rows):  # each row alone, as a whole-graph session runs it
        b = right_padded([row], 0)
        np.testing.assert_allclose(
            streamed.reference[i], last_token(onnx_hidden(whole, b), b.attention_mask)[0], rtol=0, atol=1e-5
        )
    assert streamed.start[0] == ids and sorted(streamed.start[1]) == sorted(graph.start[1])
    for name, value in graph.start[1].items():
        np.testing.assert_allclose(streamed.start[1][name], value, rtol=0, atol=1e-6)
    assert sorted(streamed.stats) == sorted(graph.stats) and streamed.stats
    for name, value in graph.stats.items():
        np.testing.assert_allclose(streamed.stats[name], value, rtol=1e-5, atol=1e-6)


def test_cpuid_agrees_with_the_kernel():
    """export/cpu.py reads CPUID itself (as ONNX Runtime and the runtime do); /proc/cpuinfo is the
    kernel's reading of the same bits."""
    if not cpu._x86_64():
        assert cpu.features() == frozenset() and not cpu.needs_quant_precision()
        return
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    f = cpu.features()
    assert ("avx2" in f) == ("avx2" in flags)
    assert ("avx512vnni" in f) == ("avx512_vnni" in flags)
    assert ("avxvnni" in f) == ("avx_vnni" in flags)
    assert cpu.needs_quant_precision() == (not {"avx512_vnni", "avx_vnni"} & flags)


def test_quantize_matmul_weight_per_tensor():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 48)).astype(np.float32)
    w[5] *= 40  # an input channel with huge weights
    plain = tensors.quantize_matmul_weight(w)
    assert plain["q"].dtype == np.int8 and plain["q"].shape == w.shape and set(plain) == {"q", "scale"}
    assert np.abs(plain["q"]).max() == 127 and plain["q"].min() >= -127
    assert np.abs(plain["q"] * plain["scale"] - w).max() <= plain["scale"].max() / 2 + 1e-6
    parts = tensors.quantize_matmul_weight(w, np.array([5, 9]))
    assert not parts["q"][[5, 9]].any(), "outlier rows leave the int8 weight"
    assert np.array_equal(parts["outlier_rows"], w[[5, 9]])
    assert parts["scale"].max() < plain["scale"].max() / 10, "the scale no longer covers the outlier row"
    x = rng.normal(size=(3, 64)).astype(np.float32)
    approx = x @ (parts["q"] * parts["scale"]) + x[:, [5, 9]] @ parts["outlier_rows"]
    assert np.abs(approx - x @ w).max() < np.abs(x @ (plain["q"] * plain["scale"]) - x @ w).max()
    # 7-bit weights (the w7a8 recipes): -63..63, so that u8 x s7 pair sums fit in int16.
    seven = tensors.quantize_matmul_weight(w, bits=7)
    assert np.abs(seven["q"]).max() == 63
    assert np.abs(seven["q"] * seven["scale"] - w).max() <= seven["scale"].max() / 2 + 1e-6
    assert 2 * 255 * int(np.abs(seven["q"]).max()) <= 32767
    with pytest.raises(ValueError, match="2-D float32"):
        tensors.quantize_matmul_weight(w.astype(np.float64))


def test_nbits_graph_equals_onnxruntimes_quantizer(package, tokenizer, tmp_path):
    """The block-wise recipes are written one weight at a time (`rewrite.rewrite_nbits`); ONNX
    Runtime's `MatMulNBitsQuantizer`, which needs the whole fp32 graph in memory, gives the same
    weights, scales and embeddings."""
    recipe = recipes.RECIPES["nbits8-acc4-b32"]
    fp32 = package / "fp32" / "model.onnx"
    ours = tmp_path / "ours" / "model.onnx"
    calibrate.quantize(fp32, ours, recipe)
    s = recipe.settings
    reference = MatMulNBitsQuantizer(
        onnx.load(str(fp32)),
        bits=s["bits"],
        block_size=s["block_size"],
        is_symmetric=s["symmetric"],
        accuracy_level=s["accuracy_level"],
        op_types_to_quantize=("MatMul",),
    )
    reference.process()
    theirs = tmp_path / "theirs" / "model.onnx"
    theirs.parent.mkdir()
    reference.model.save_model_to_file(str(theirs), use_external_data_format=True)

    def nodes(path):
        m = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        return {
            n.output[0]: (
                n.op_type,
                {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
                [inits.get(i) for i in n.input],
            )
            for n in m.graph.node
            if n.op_type == "MatMulNBits"
        }

    a, b = nodes(ours), nodes(theirs)
    assert a.keys() == b.keys() and len(a) >= 7 * 2, "every q/k/v/o/gate/up/down of both layers"
    for out in a:
        assert a[out][:2] == b[out][:2], out
        for x, y in zip(a[out][2][1:], b[out][2][1:]):
            np.testing.assert_array_equal(x, y)
    batch = right_padded([s.ids for s in samples.samples(tokenizer, 512)], pad_id=0)
    np.testing.assert_array_equal(onnx_hidden(session(ours), batch), onnx_hidden(session(theirs), batch))


@pytest.mark.parametrize("recipe", ["w8a8", "w7a8", "w8a8-o8"])
def test_w8a8_graph_computes_the_recipe(recipe, tmp_path):
    """One MatMul through `quantize_graph`, run by ONNX Runtime, against the recipe written out in
    numpy: per-token u8 activations (scale max|x| / 127, round half to even, zero point 128) x the
    per-channel weights of `quantize_matmul_weight`, plus the outlier channels in fp32."""
    rng = np.random.default_rng(1)
    k, n = 48, 40
    w = rng.normal(size=(k, n)).astype(np.float32)
    x = rng.normal(size=(2, 5, k)).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero row: the scale's floor, no division by zero
    x[0, 1, 7] = 300.0  # a token with one huge channel
    x[1, 2] = np.arange(k, dtype=np.float32) - k / 2 + 0.5  # many values at exact halves of the step
    x[1, 2, 0] = -127.0  # sets the step to 1, so the halves above round half to even
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/layers.0/up/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    r = recipes.RECIPES[recipe]
    stats = {"x": np.abs(x).reshape(-1, k).max(axis=0)}
    dst = tmp_path / "model.onnx"
    rewrite.quantize_graph(model, lambda name: w, dst, r, stats)
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]

    idx = tensors.outlier_channels(stats["x"], r.settings.get("outliers", 0)) if r.settings.get("outliers") else None
    parts = tensors.quantize_matmul_weight(w, idx, r.settings.get("weight_bits", 8))
    inliers = x.copy()
    if idx is not None:
        inliers[..., idx] = 0.0
    scale = np.maximum(np.abs(inliers).max(axis=-1, keepdims=True) * np.float32(1 / 127), np.float32(1e-12))
    assert idx is not None or scale[1, 2, 0] == 1.0  # the halves row: exact halves of the step
    q = np.clip(np.rint(inliers / scale) + 128, 0, 255)  # np.rint rounds half to even
    assert q.min() >= 1 and q.max() <= 255
    want = ((q - 128).astype(np.int64) @ parts["q"].astype(np.int64)).astype(np.float32) * parts["scale"] * scale
    if idx is not None:
        want += x[..., idx] @ parts["outlier_rows"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not got[0, 0].any()


def test_special_tokens_measured(meta, tokenizer):
    st = meta["special_tokens"]
    assert st["bos_id"] == 1 and st["eos_id"] == 2 and st["pad_id"] == 0
    assert st["prepend"] == [1] and st["append"] == [2]
    assert st["added"] == {"<instruct>": 32000, "<query>": 32001, "<response>": 32002}
    text = "A probe that is not the exporter's own."
    assert (
        tokenizer(text)["input_ids"]
        == st["prepend"] + tokenizer(text, add_special_tokens=False)["input_ids"] + st["append"]
    )


def test_sha256_match_files(package, meta):
    assert manifest.sha256(package / "tokenizer.json") == meta["tokenizer"]["sha256"]
    for v in meta["variants"].values():
        start = [v["start_states"]["file"]] if "start_states" in v else []
        assert set(v["sha256"]) == {v["file"], v["data"], *start}
        for rel, digest in v["sha256"].items():
            assert manifest.sha256(package / rel) == digest, rel


@pytest.mark.parametrize("name", VARIANTS)
def test_graph_signature_matches_manifest(package, meta, name):
    v = meta["variants"][name]
    arch = meta["architecture"]
    graph = onnx.load(str(package / v["file"]), load_external_data=False).graph
    layers = range(arch["layers"])
    cache = v["prefix_cache"]
    past = [cache[f"past_{k}"].format(layer=i) for i in layers for k in ("key", "value")]
    present = [cache[f"present_{k}"].format(layer=i) for i in layers for k in ("key", "value")]
    assert [i.name for i in graph.input] == v["inputs"] + past
    for i in graph.input[: len(v["inputs"])]:
        t = i.type.tensor_type
        assert t.elem_type == onnx.TensorProto.INT64
        assert len(t.shape.dim) == 2 and all(d.dim_param for d in t.shape.dim), "batch and seq must be dynamic"
    for i in graph.input[len(v["inputs"]) :]:
        t = i.type.tensor_type
        assert t.elem_type == ONNX_TYPES[cache["dtype"]]
        dims = [d.dim_value or d.dim_param for d in t.shape.dim]
        assert dims[0] == 1 and dims[1] == arch["kv_heads"] and dims[3] == arch["head_dim"], dims
        assert isinstance(dims[2], str), "the prefix length must be dynamic"
    assert [o.name for o in graph.output] == [v["output"]] + present
    out = graph.output[0].type.tensor_type
    assert out.elem_type == ONNX_TYPES[v["output_dtype"]]
    assert out.shape.dim[2].dim_value == meta["architecture"]["hidden"]
    # Weights live in the one external data file next to the graph.
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}


@pytest.mark.parametrize("name", VARIANTS)
def test_parity_recorded_and_above_threshold(meta, name):
    p = meta["variants"][name]["parity"]
    assert p["reference"] == "pytorch fp32"
    assert p["threshold"] == verify.THRESHOLDS[name]
    assert p["texts"] >= 8
    assert p["threshold"] <= p["min_cosine"] <= p["mean_cosine"] <= 1.0 + 1e-9
    assert 0.0 <= p["max_abs_diff"] < 1.0
    cached = p["prefix_cache"]  # queries on top of their prefix's states, against PyTorch
    assert cached["texts"] == 2 and cached["prefix_tokens"] > 50
    assert cached["threshold"] <= cached["min_cosine"] <= 1.0 + 1e-9


def test_samples_cover_icl_tokens_and_max_length(tokenizer):
    rows = samples.samples(tokenizer, 512)
    assert max(len(s.ids) for s in rows) == 512
    assert any(32000 in s.ids and 32002 in s.ids for s in rows if s.kind == "query")
    assert all(s.ids[0] == 1 and s.ids[-1] == 2 for s in rows)
    assert len(samples.long_ids(tokenizer, 4096)) == 4096


@pytest.mark.parametrize("name", VARIANTS)
def test_right_padded_batch_equals_single_rows(package, tokenizer, name):
    rows = [s.ids for s in samples.samples(tokenizer, 512)]
    batch = right_padded(rows, pad_id=0)
    sess = session(package / name / "model.onnx")
    hidden = onnx_hidden(sess, batch)
    for i, ids in enumerate(rows):
        alone = onnx_hidden(sess, batch.row(i))[0]
        np.testing.assert_allclose(hidden[i, : len(ids)], alone, rtol=0, atol=1e-3, err_msg=f"{name} row {i}")


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_selection_batches_equal_rows_run_alone(package, meta, tokenizer, name):
    """`choose` runs each candidate over the calibration texts in length-sorted, right-padded
    batches (`select.SELECTION_BATCH_TOKENS`): each row's embedding as when the row runs alone,
    on the start states where the row begins with their ids, and in the input order."""
    bos = tokenizer.bos_token_id
    # plus a row of the start ids alone and one without them: both run on no states
    rows = calibrate.calibration_rows(tokenizer) + [[bos], [bos + 4, bos + 5, bos + 6]]
    assert min(len(r) for r in rows) == 1 and max(len(r) for r in rows) > 64
    graph = package / name / "model.onnx"
    start = verify.start_of(graph, meta["variants"][name].get("quantization")) or (
        [bos],
        prefix_states(session(graph), [bos]),
    )
    alone, _ = embed_rows(graph, rows, start=start)
    in_batches, _ = embed_rows(graph, rows, start=start, batch_tokens=select.SELECTION_BATCH_TOKENS)
    assert len(batches(rows, select.SELECTION_BATCH_TOKENS)) < len(rows) / 4
    np.testing.assert_allclose(in_batches, alone, rtol=0, atol=1e-4 if name == "fp32" else 1e-3)


@pytest.mark.parametrize("batch_tokens", [0, select.SELECTION_BATCH_TOKENS])
def test_a_candidate_stops_once_it_cannot_meet_the_thresholds(package, meta, tokenizer, batch_tokens):
    """`choose` measures each candidate one layer at a time, and each but the last with its
    thresholds: the `FIRST_ROUND` shortest texts first, the rest only if the thresholds can still
    be met; one that meets them runs every text. The layer-by-layer pass gives what the whole
    graph gives."""
    rows = calibrate.calibration_rows(tokenizer)
    reference, _ = embed_rows(package / "fp32" / "model.onnx", rows)
    graph = package / "int8" / "model.onnx"
    start = verify.start_of(graph, meta["variants"]["int8"]["quantization"])
    run = functools.partial(select.measure_candidate, graph, rows, reference, start=start, batch_tokens=batch_tokens)
    whole, _ = embed_rows(graph, rows, start=start, batch_tokens=batch_tokens)
    segmented, _ = embed_segmented(SegmentedGraph(graph), rows, start, batch_tokens)
    np.testing.assert_allclose(segmented, whole, rtol=0, atol=5e-3)  # fusion differs across segments
    full = select.fidelity(reference, segmented, rows)
    assert full["min_cosine"] == pytest.approx(select.fidelity(reference, whole, rows)["min_cosine"], abs=1e-4)

    def figures(**kw):
        got = run(**kw)
        assert got.pop("seconds") >= 0
        return got

    assert figures() == full
    first = [i for index, _, _ in batched(rows, start, batch_tokens) for i in index][: select.FIRST_ROUND]
    assert sorted(len(rows[i]) for i in first) == sorted(map(len, rows))[: select.FIRST_ROUND]  # the shortest
    stopped = figures(thresholds={"min_cosine": 2.0, "mean_cosine": 0.0})
    expected = select.fidelity(reference[first], segmented[first], [rows[i] for i in first])
    assert stopped.pop("stopped") is True and stopped["texts"] == select.FIRST_ROUND
    assert stopped == {
        **expected,
        "min_cosine": pytest.approx(expected["min_cosine"], abs=1e-5),
        "mean_cosine": pytest.approx(expected["mean_cosine"], abs=1e-5),
    }
    met = {"min_cosine": full["min_cosine"] - 1e-6, "mean_cosine": full["mean_cosine"] - 1e-6}
    assert figures(thresholds=met) == full
    # a mean that only perfect texts could reach: stops after the first round
    assert figures(thresholds={"min_cosine": 0.0, "mean_cosine": 1.0})["texts"] == select.FIRST_ROUND


def test_precision_order_of_the_recipes():
    """`choose` skips a recipe once one at least as precise everywhere has missed: more weight
    bits, more outlier channels per MatMul kind, a kind kept fp32; never across methods."""
    more = recipes.at_least_as_precise
    r = recipes.RECIPES
    assert more(r["w8a8"], r["w7a8"]) and not more(r["w7a8"], r["w8a8"])
    assert more(r["w7a8-o32"], r["w7a8-o8"]) and more(r["w8a8-o64-down256"], r["w8a8-o32-down128"])
    assert more(r["w8a8-o32-down-fp32"], r["w8a8-o32-down128"])
    # down fp32 against more outliers elsewhere: neither is the more precise
    assert not more(r["w8a8-o32-down-fp32"], r["w8a8-o64-down256"])
    assert not more(r["w8a8-o64-down256"], r["w8a8-o32-down-fp32"])
    assert not more(r["w8a8-o8"], r["w7a8-o32"]) and not more(r["w7a8-o32"], r["w8a8-o8"])
    assert not more(r["nbits8-acc1"], r["w7a8"]) and not more(r["w8a8-o32-down-fp32"], r["nbits8-acc1"])
    assert not more(r["nbits8-acc4-b32"], r["w8a8"]) and not more(r["w8a8-o32-down-fp32"], r["nbits8-acc4-b32"])
    # block-wise: narrower blocks, or fp32 compute, are at least as precise
    assert more(r["nbits8-acc4-b32"], r["nbits8-acc4-b128"]) and not more(r["nbits8-acc4-b128"], r["nbits8-acc4-b32"])
    assert more(r["nbits8-acc1"], r["nbits8-acc4-b32"]) and not more(r["nbits8-acc4-b32"], r["nbits8-acc1"])
    # the weight-only recipe expands its weights on every run: not a candidate (issue 26)
    assert "nbits8-acc1" in r and "nbits8-acc1" not in recipes.CANDIDATES
    assert [r[n].kernel for n in recipes.CANDIDATES[-2:]] == ["matmulnbits-int8"] * 2
    assert r["nbits8-acc1"].kernel == "matmulnbits-fp32"
    odd = recipes.Recipe("odd", "w8a8", {**r["w8a8"].settings, "keep": [r"q_proj"]})
    assert not more(odd, r["w8a8"]) and more(odd, odd)
    fast = recipes.CANDIDATES[:-1]
    ceilings = [n for n in fast if not any(recipes.more_precise(r[m], r[n]) for m in fast)]
    assert ceilings == ["w8a8-o64-down256", "w8a8-o32-down-fp32", "nbits8-acc4-b128"]
    for name in fast:  # every fast recipe is below one of them, so three misses skip the rest
        assert any(more(r[c], r[name]) for c in ceilings), name


@pytest.mark.parametrize(
    "passing",
    [(), ("w8a8-o32-down-fp32",), ("w8a8-o32-down-fp32", "w8a8-o64-down256", "w7a8-o8"), ("nbits8-acc4-b128",)],
)
def test_choose_probes_the_most_precise_then_goes_fastest_first(passing, package, tokenizer, tmp_path, monkeypatch):
    """The order of `choose` with made-up measurements: the most precise recipes first, until
    one passes; then fastest first, skipping what a missed recipe out-precisions; the last
    candidate when nothing passes. The chosen recipe's graph is what is left on disk."""

    def measure(graph, rows, reference, threads=2, start=None, batch_tokens=0, thresholds=None):
        recipe = json.loads((graph.parent / "recipe.json").read_text())
        good = recipe in passing
        return {
            "texts": len(rows),
            "min_cosine": 1.0 if good else 0.5,
            "mean_cosine": 1.0 if good else 0.5,
            "worst_tokens": 1,
            "seconds": 0.0,
        }

    def write(self, recipe, dst, stats):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(recipe.name)
        (dst.parent / "recipe.json").write_text(json.dumps(recipe.name))

    monkeypatch.setattr(select, "measure_candidate", measure)
    monkeypatch.setattr(calibrate.Fp32Model, "quantize", write)
    fp32 = calibrate.Fp32Model.from_graph(package / "fp32" / "model.onnx")
    monkeypatch.setattr(
        fp32,
        "measure",
        lambda rows, ids, threads=2: calibrate.Fp32Measure(np.zeros((len(rows), 4), np.float32), None, {}, 0.0),
    )
    dst = tmp_path / "int8" / "model.onnx"
    got = select.choose(fp32, dst, tokenizer)["selection"]
    order = [t["recipe"] for t in got["tried"]]
    probes = ["w8a8-o64-down256", "w8a8-o32-down-fp32", "nbits8-acc4-b128"]
    if not passing:  # the last candidate, measured on every text, recorded as not faithful
        assert order == [*probes, "nbits8-acc4-b32"] and got["faithful"] is False
        assert got["chosen"] == "nbits8-acc4-b32" and set(got["skipped"]) == set(recipes.CANDIDATES[:-1]) - set(order)
    elif passing == ("nbits8-acc4-b128",):
        assert order == probes and got["chosen"] == "nbits8-acc4-b128" and got["faithful"] is True
        assert set(got["skipped"]) == set(recipes.CANDIDATES[:-2]) - set(order)
    elif passing == ("w8a8-o32-down-fp32",):
        assert order == ["w8a8-o64-down256", "w8a8-o32-down-fp32", "w7a8-o32-down-fp32"]
        assert got["chosen"] == "w8a8-o32-down-fp32" and got["skipped"]["w7a8"] == "w8a8-o64-down256"
    else:
        assert order == ["w8a8-o64-down256", "w7a8", "w8a8", "w7a8-o8"] and got["skipped"] == {}
        assert got["chosen"] == "w7a8-o8"
    assert dst.read_text() == got["chosen"]


def test_right_padded_layout():
    batch = right_padded([[5, 6, 7], [8]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch.input_ids.dtype == np.int64


def test_last_token_pools_at_mask_end():
    hidden = np.zeros((2, 3, 2), dtype=np.float32)
    hidden[0, 2] = [3, 4]
    hidden[1, 0] = [0, 2]
    hidden[1, 2] = [9, 9]  # padding: must be ignored
    emb = last_token(hidden, np.array([[1, 1, 1], [1, 0, 0]]))
    np.testing.assert_allclose(emb, [[0.6, 0.8], [0.0, 1.0]])


def test_refuses_existing_package_without_force(tiny_dir, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep").write_text("x")
    result = run_export("--model", str(tiny_dir), "--out", str(out))
    assert result.returncode != 0
    assert "--force" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep"]


def test_failed_verification_leaves_nothing(tiny_dir, tmp_path):
    out = tmp_path / "pkg"
    result = run_export("--model", str(tiny_dir), "--out", str(out), "--variants", "fp32", "--threshold", "fp32=1.5")
    assert result.returncode != 0
    assert "failed verification" in result.stderr
    assert list(tmp_path.iterdir()) == [], "no package and no partial directory may remain"


def test_segmented_run_equals_whole_graph(package, tokenizer):
    """Verification runs each graph one segment (embeddings, then one layer each, the last with the
    final norm) per ONNX Runtime session; the segments must compute what the whole graph computes, prefix cache included."""
    rows = [s.ids for s in samples.samples(tokenizer, 512)]
    batch = right_padded(rows, pad_id=0)
    for name in VARIANTS:
        path = package / name / "model.onnx"
        segmented = SegmentedGraph(path)
        assert len(segmented.parts) == 1 + 2, [len(p) for p in segmented.parts]  # head, 2 layers
        sess = session(path)
        empty = empty_past(sess)
        prefix = rows[0][:20]
        presents = {o for o in segmented.graph_outputs if o.startswith("present.")}
        rest = right_padded([rows[0][20:]], 0)
        rest.position_ids = rest.position_ids + 20
        got = segmented.run(
            [
                Run({**batch.feeds(), **empty}, {"last_hidden_state"}),
                Run({**right_padded([prefix], 0).feeds(), **empty}, presents),
                Run(rest.feeds(), {"last_hidden_state"}, past_from=1),
            ]
        )
        # fp32 agrees to rounding; in the other variants ONNX Runtime fuses differently across a
        # segment boundary (casts, fp16 norms), so the hidden states agree to the dtype's precision.
        atol = 1e-5 if name == "fp32" else 5e-3
        whole = onnx_hidden(sess, batch)
        np.testing.assert_allclose(got[0]["last_hidden_state"], whole, rtol=0, atol=atol, err_msg=name)
        cos = np.sum(
            last_token(got[0]["last_hidden_state"], batch.attention_mask) * last_token(whole, batch.attention_mask),
            axis=1,
        )
        assert cos.min() > 0.99999, (name, cos.min())
        past = prefix_states(sess, prefix)
        np.testing.assert_allclose(
            got[2]["last_hidden_state"], onnx_hidden(sess, rest, past), rtol=0, atol=atol, err_msg=name
        )


def test_checkpoint_reads_shards_and_bf16(tmp_path):
    """The streaming reader: hub shards through the index, fp32/bf16/fp16 tensors as fp32, "model." prefixes."""
    a = torch.randn(3, 5)
    b = torch.randn(4, 2).to(torch.bfloat16)
    c = torch.randn(7).to(torch.float16)
    save_file({"model.embed_tokens.weight": a, "model.norm.weight": c}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"model.layers.0.mlp.up_proj.weight": b}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                    "model.norm.weight": "model-00001-of-00002.safetensors",
                    "model.layers.0.mlp.up_proj.weight": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    ckpt = Checkpoint(tmp_path)
    np.testing.assert_array_equal(ckpt.read("embed_tokens.weight"), a.numpy())
    np.testing.assert_array_equal(ckpt.read("layers.0.mlp.up_proj.weight"), b.float().numpy())
    np.testing.assert_array_equal(ckpt.read("norm.weight"), c.float().numpy())
    assert ckpt.read("norm.weight").dtype == np.float32
    with pytest.raises(KeyError, match="no tensor"):
        ckpt.read("layers.1.mlp.up_proj.weight")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        Checkpoint(tmp_path)


BIN = ROOT / "target" / "debug" / "icl-embed"


def test_int8_start_states_are_the_fp32_states_of_bos(package, meta, tokenizer):
    """tiny prepends `<s>` like bge-en-icl: its int8 variant carries the fp32 graph's key/value states
    of that token (issue 13), named like the graph's `past.*` inputs, pinned by the manifest. The
    exporter computes them from the checkpoint one layer at a time, with no fp32 graph written."""
    entry = meta["variants"]["int8"]
    start = entry["start_states"]
    assert start["ids"] == [tokenizer.bos_token_id] == meta["special_tokens"]["prepend"]
    assert start["file"] == "int8/start.onnx"
    assert entry["sha256"][start["file"]] == manifest.sha256(package / start["file"])
    ids, states = verify.start_of(package / "int8" / "model.onnx", entry["quantization"])
    fp32 = prefix_states(session(package / "fp32" / "model.onnx"), ids)
    assert (
        sorted(states) == sorted(fp32) == sorted(i.name for i in past_inputs(session(package / "int8" / "model.onnx")))
    )
    for name, value in fp32.items():
        assert (
            states[name].shape
            == value.shape
            == (1, meta["architecture"]["kv_heads"], 1, meta["architecture"]["head_dim"])
        )
        np.testing.assert_array_equal(states[name], value)
    # Variants that are not quantized run every token themselves.
    assert all("start_states" not in v for n, v in meta["variants"].items() if n != "int8")


def test_cli_int8_runs_documents_on_the_start_states(package, meta, tokenizer, tmp_path, require):
    """The binary's int8 documents equal the graph run on top of the stored `<s>` states, and not the
    graph run from `<s>` itself (the two differ by the int8 error at position 0)."""
    require(BIN.exists(), f"{BIN} is not built (cargo build)")
    docs = ["Paris is the capital of France.", "ok", "The mitochondrion is the powerhouse of the cell."]
    src, out = tmp_path / "docs.txt", tmp_path / "out.npy"
    src.write_text("\n".join(docs), encoding="utf-8")
    subprocess.run(
        [
            BIN,
            "embed",
            "--model",
            package,
            "--input",
            src,
            "--output",
            out,
            "--variant",
            "int8",
            "--device",
            "cpu",
            "--quiet",
            "--cache-dir",
            tmp_path / "cache",
        ],
        check=True,
    )
    got = np.load(out).astype(np.float64)
    rows = [samples.encode_document(tokenizer, d, 512) for d in docs]
    sess = session(package / "int8" / "model.onnx")
    batch = right_padded(rows, meta["special_tokens"]["pad_id"])
    ids, states = verify.start_of(package / "int8" / "model.onnx", meta["variants"]["int8"]["quantization"])
    on_start = without_start(batch, len(ids))
    want = last_token(onnx_hidden(sess, on_start, states), on_start.attention_mask)
    from_bos = last_token(onnx_hidden(sess, batch), batch.attention_mask)
    gap = np.abs(want - from_bos).max()
    assert gap > 1e-4, gap  # the comparison can tell the two apart
    assert np.abs(got - want).max() < gap / 100


def test_blockwise_int8_recipe_is_chosen_recorded_and_runs_in_the_cli(package, tiny_dir, tmp_path, require):
    """Issue 26: the block-wise int8 x int8 recipes (`MatMulNBits`, 8-bit weights, int8 compute)
    through `python -m export.int8` on a copy of the package: the selection's table lists them,
    the manifest records kernel class "matmulnbits-int8", the graph has accuracy level 4, and the
    binary loads it and gives what the graph gives on the start states; `info` names the kernel."""
    require(BIN.exists(), f"{BIN} is not built (cargo build)")
    copy = tmp_path / "pkg"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("fp16"))
    meta = json.loads((copy / "embedder.json").read_text(encoding="utf-8"))
    del meta["variants"]["fp16"]
    manifest.write(copy, meta)
    names = "nbits8-acc4-b128,nbits8-acc4-b32"
    cmd = [sys.executable, "-m", "export.int8", "--model", tiny_dir, "--add-to", copy, "--recipes", names]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    entry = json.loads((copy / "embedder.json").read_text(encoding="utf-8"))["variants"]["int8"]
    quant = entry["quantization"]
    assert quant["kernel"] == "matmulnbits-int8" and quant["accuracy_level"] == 4
    assert quant["recipe"] == "nbits8-acc4-b128" and quant["selection"]["faithful"] is True
    assert [t["recipe"] for t in quant["selection"]["tried"]] == ["nbits8-acc4-b128"]
    graph = onnx.load(str(copy / entry["file"]), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 7 * 2 and all(
        {a.name: helper.get_attribute_value(a) for a in n.attribute}["accuracy_level"] == 4 for n in nbits
    )
    docs = ["Paris is the capital of France.", "ok"]
    src, out = tmp_path / "docs.txt", tmp_path / "out.npy"
    src.write_text("\n".join(docs), encoding="utf-8")
    cli = [BIN, "embed", "--model", copy, "--input", src, "--output", out, "--variant", "int8", "--device", "cpu"]
    subprocess.run([*cli, "--quiet", "--cache-dir", tmp_path / "cache"], check=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    rows = [samples.encode_document(tokenizer, d, 512) for d in docs]
    batch = without_start(right_padded(rows, meta["special_tokens"]["pad_id"]), len(entry["start_states"]["ids"]))
    _, states = verify.start_of(copy / entry["file"], quant)
    want = last_token(onnx_hidden(session(copy / entry["file"]), batch, states), batch.attention_mask)
    np.testing.assert_allclose(np.load(out), want, rtol=0, atol=1e-4)
    info = subprocess.run([BIN, "info", "--model", copy], capture_output=True, text=True, check=True).stdout
    auto = info.split("--variant auto on the CPU:")[1]
    assert auto.startswith(" int8 (recipe nbits8-acc4-b128") and "block-wise int8 x int8" in auto, info
