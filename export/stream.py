"""The streaming exporter: one tensor, one layer at a time, whatever the model's size.

Nothing here ever holds the whole model:

- `Checkpoint` reads a Hugging Face checkpoint (`model.safetensors`, or the hub's shards
  `model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`) one tensor at a time with
  plain file reads (no mmap, so the file pages it touched never count as the process's memory).
- `skeleton` builds the package's `Decoder` from the config alone: the weights of one shape share
  one zero buffer (no per-layer memory), so the graph is traced once per dtype in seconds with
  `export_params=False`; the weights become graph inputs, which `write_variants` turns back into
  initializers as it streams the checkpoint into each variant's `model.onnx.data`.
- `write_variants` reads each weight once and appends it to every requested graph: fp32 as read,
  fp16 cast. int8 is made from the fp32 graph afterwards by `quantize.choose` (package.py), which
  also reads one weight at a time.
- `reference_hidden` is the PyTorch fp32 reference, Hugging Face's own forward with one decoder
  layer's weights loaded at a time (hooks load a layer before it runs and drop it after).
- `segmented_runs` runs an exported graph with ONNX Runtime segment by segment (the embedding and
  masks, each decoder layer, the final norm: the graph's own nodes, cut along the `/layers.{i}/`
  scopes), so a session holds one layer's weights; the hidden states pass from one to the next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch import nn

from .cpu import session_options
from .decoder import Decoder, past_names, present_names
from .export import INPUTS, OPSET, OUTPUT, example_inputs

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- reading the checkpoint -----------------------------------------------------------------------


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or hub shards), read one at a time as fp32."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE).is_file():
            files = [SINGLE]
        else:
            raise FileNotFoundError(f"{self.dir} has neither {SINGLE} nor {INDEX}")
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} (named in {INDEX}) is missing")
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            base = 8 + length
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}; supported: F32, F16, BF16, F64")
                start, end = info["data_offsets"]
                self.entries[key] = (path, info["dtype"], tuple(info["shape"]), base + start, end - start)
        # Some checkpoints (LlamaForCausalLM-style) prefix the base model's tensors with "model.".
        self.prefix = "" if "embed_tokens.weight" in self.entries else "model."

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` (without the "model." prefix) as a float32 array."""
        key = self.prefix + name
        if key not in self.entries:
            raise KeyError(f"{self.dir}: no tensor {key!r} in the checkpoint")
        path, dtype, shape, offset, length = self.entries[key]
        buf = np.empty(length // np.dtype(_ST_DTYPES[dtype]).itemsize, dtype=_ST_DTYPES[dtype])
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(buf).cast("B")) != length:
                raise ValueError(f"{path}: tensor {key} is truncated")
        if dtype == "BF16":
            buf = (buf.astype(np.uint32) << 16).view(np.float32)
        return buf.astype(np.float32, copy=False).reshape(shape)

    def nbytes_fp32(self) -> int:
        return sum(4 * int(np.prod(e[2])) for e in self.entries.values())


# --- the decoder without weights ------------------------------------------------------------------


def meta_model(config):
    """The Hugging Face base model on the meta device (names and shapes, no memory), eager attention,
    with its rotary embedding rebuilt on the CPU (its `inv_freq` is computed, not loaded)."""
    from transformers import AutoModel

    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = AutoModel.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.rotary_emb = type(model.rotary_emb)(config=config)
    return model.eval()


def skeleton(config, dtype: torch.dtype = torch.float32) -> Decoder:
    """The package's Decoder for `config` with zero weights that share one buffer per shape (a few
    layers' worth of address space, next to no resident memory): enough to trace the graph."""
    decoder = Decoder(meta_model(config))
    shared: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for module in decoder.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                # One zero buffer per shape, shared by every weight of that shape (calloc'd: pages
                # nobody writes cost no memory), so tracing runs the real contiguous kernels.
                base = shared.setdefault(tuple(p.shape), torch.zeros(p.shape, dtype=dtype))
                setattr(module, name, nn.Parameter(base, requires_grad=False))
    # RoPE's inv_freq is a buffer and stays fp32 in every variant (rounding it to fp16 would shift
    # rotary phases by up to 0.2 rad at position 512).
    return decoder


def source_of(param: str) -> tuple[str, bool]:
    """The checkpoint tensor a Decoder parameter comes from, and whether it is stored transposed
    (`_Linear` keeps W as [in, out] so that the graph has a plain MatMul)."""
    if param == "embed":
        return "embed_tokens.weight", False
    if param == "norm.weight":
        return "norm.weight", False
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)\.(weight|bias)", param)
    if not m:
        raise ValueError(f"unexpected decoder parameter {param!r}")
    layer, part, kind = m.groups()
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
             "input_norm": "input_layernorm", "post_norm": "post_attention_layernorm"}
    return f"layers.{layer}.{names[part]}.{kind}", kind == "weight" and part not in ("input_norm", "post_norm")


# --- tracing --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _shape_inference_without_weights():
    """The TorchScript exporter's whole-graph shape inference serializes the graph together with
    every parameter's data (a 28 GB copy for bge-en-icl, and most of the trace's time). The weights
    are graph inputs here, whose types and shapes the graph already carries, so it is given none."""
    original = torch._C._jit_pass_onnx_graph_shape_type_inference

    def without_weights(graph, params_dict, opset):
        return original(graph, {}, opset)

    torch._C._jit_pass_onnx_graph_shape_type_inference = without_weights
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


def trace(decoder: Decoder, dtype: torch.dtype) -> onnx.ModelProto:
    """The decoder's graph with its weights as graph inputs named after the parameters (no data)."""
    layers = decoder.layers_count
    past = [torch.zeros(1, decoder.kv_heads, 3, decoder.head_dim, dtype=dtype) for _ in range(2 * layers)]
    dims = {name: {0: "batch", 1: "seq"} for name in INPUTS + [OUTPUT]}
    dims.update({name: {2: "past"} for name in past_names(layers)})
    dims.update({name: {0: "batch", 2: "seq"} for name in present_names(layers)})
    with tempfile.TemporaryDirectory() as scratch, _shape_inference_without_weights():
        path = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                decoder, (*example_inputs(), *past), os.fspath(path), dynamo=False, opset_version=OPSET,
                input_names=INPUTS + past_names(layers), output_names=[OUTPUT] + present_names(layers),
                dynamic_axes=dims, do_constant_folding=True, export_params=False,
                keep_initializers_as_inputs=True,  # also skips the pairwise de-duplication of weights
            )
        return onnx.load(os.fspath(path), load_external_data=False)


# --- writing the weights --------------------------------------------------------------------------


class DataFile:
    """Appends tensors to one external data file (64-byte aligned, 4096 for tensors of 1 MiB or more,
    so that ONNX Runtime can map them in place) and returns their `TensorProto`s pointing at it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        self.put_raw(tensor, memoryview(array).cast("B"))
        return tensor

    def put_raw(self, tensor: onnx.TensorProto, raw) -> None:
        """Append `raw` (bytes or a byte memoryview) and point `tensor` (type and shape already set,
        any data of its own dropped) at it."""
        nbytes = memoryview(raw).nbytes
        pad = (-self.offset) % (4096 if nbytes >= 1 << 20 else 64)
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(raw)
        for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
            tensor.ClearField(f)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += nbytes

    def close(self) -> None:
        self.file.close()


@dataclass
class Target:
    """One variant being written: its graph (weights still graph inputs) and how a weight is stored."""

    name: str
    graph: onnx.ModelProto
    store: Callable[[str, np.ndarray, "Target"], None]
    data: DataFile | None = None


def write_variants(checkpoint: Checkpoint, graphs: dict[str, onnx.ModelProto], out: dict[str, Path],
                   on_tensor: Callable[[str], None] | None = None) -> None:
    """Stream every weight of `checkpoint` into each variant of `graphs` ("fp32", "fp16") and save
    `out[name]` + `.data`. Each weight is read once; in memory at a time: that weight and its cast."""
    params = None
    targets = []
    for name, model in graphs.items():
        these = weight_inputs(model)
        if params is None:
            params = these
        elif these != params:
            raise ValueError(f"variant {name}: its graph's weights differ from the first variant's")
        out[name].parent.mkdir(parents=True, exist_ok=True)
        targets.append(Target(name, model, _store_for(name), DataFile(out[name].with_name(out[name].name + ".data"))))
    read = weight_reader(checkpoint)
    try:
        for param in params:
            w = read(param)
            for target in targets:
                target.store(param, w, target)
            del w
            if on_tensor is not None:
                on_tensor(param)
    finally:
        for target in targets:
            target.data.close()
    for target in targets:
        graph = target.graph.graph
        keep = [i for i in graph.input if i.name not in set(params)]
        del graph.input[:]
        graph.input.extend(keep)
        onnx.save_model(target.graph, os.fspath(out[target.name]))


def weight_reader(checkpoint: Checkpoint) -> Callable[[str], np.ndarray]:
    """Reads a Decoder parameter (a traced graph's weight input) from the checkpoint as the graph
    stores it: fp32, MatMul weights transposed to [in, out]."""

    def read(param: str) -> np.ndarray:
        source, transpose = source_of(param)
        w = checkpoint.read(source)
        if transpose:  # torch's blocked, threaded transpose: numpy's takes seconds per MLP weight
            w = torch.from_numpy(w).t().contiguous().numpy()
        return w

    return read


def weight_inputs(model: onnx.ModelProto) -> list[str]:
    """A traced graph's weight inputs (everything but the model's inputs and prefix states)."""
    return [i.name for i in model.graph.input if i.name not in INPUTS and not i.name.startswith("past.")]


def _store_for(name: str):
    if name == "fp32":
        return lambda param, w, t: t.graph.graph.initializer.append(t.data.add(param, w))
    if name == "fp16":
        return lambda param, w, t: t.graph.graph.initializer.append(t.data.add(param, w.astype(np.float16)))
    raise ValueError(f"variant {name} is not written by the streaming exporter")


# --- the PyTorch reference, one layer at a time ---------------------------------------------------


def reference_hidden(model_dir: Path, config, checkpoint: Checkpoint, batch) -> np.ndarray:
    """`last_hidden_state` of Hugging Face's own fp32 forward (eager attention) over `batch`, with the
    embeddings and final norm loaded and each decoder layer's weights loaded just before it runs and
    dropped after: the reference of `verify.torch_hidden` in the memory of one layer."""
    model = meta_model(config)

    def load(module: nn.Module, prefix: str) -> None:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(torch.from_numpy(checkpoint.read(prefix + name)))

    load(model.embed_tokens, "embed_tokens.")
    load(model.norm, "norm.")
    hooks = []
    for i, layer in enumerate(model.layers):
        def before(module, args, kwargs, i=i):
            load(module, f"layers.{i}.")

        def after(module, args, kwargs, output):
            module.to("meta")

        hooks.append(layer.register_forward_pre_hook(before, with_kwargs=True))
        hooks.append(layer.register_forward_hook(after, with_kwargs=True))
    try:
        from .verify import torch_hidden

        return torch_hidden(model, batch)
    finally:
        for h in hooks:
            h.remove()


# --- ONNX Runtime, segment by segment -------------------------------------------------------------


def segments(graph: onnx.GraphProto) -> list[list[onnx.NodeProto]]:
    """The graph's nodes cut into runs: everything before the first layer, then each `/layers.{i}/`
    scope (the last one also takes what follows it: the final norm).

    The TorchScript exporter names every node after its module scope (`/layers.3/q/MatMul`,
    `/norm/Mul`, `/Cast`), but a rewritten graph need not keep a layer's nodes together
    (`MatMulNBitsQuantizer` sorts the graph again, moving constants and root-scope nodes between
    layers). So a node goes to its own layer's segment when it names one, else to the latest segment
    among the producers of its inputs (the first, for a node without any), and the segments run in
    order: every node's inputs come from its own segment or an earlier one. Within a segment nodes keep
    graph (execution) order."""
    rank_of: dict[str, int] = {}
    ranks: list[int] = []
    for node in graph.node:
        m = re.match(r"/layers\.(\d+)/", node.name)
        rank = max((rank_of.get(i, 0) for i in node.input if i), default=0)
        if m:
            rank = max(rank, int(m.group(1)) + 1)
        ranks.append(rank)
        for o in node.output:
            rank_of[o] = rank
    parts: dict[int, list[onnx.NodeProto]] = {}
    for node, rank in zip(graph.node, ranks):
        parts.setdefault(rank, []).append(node)
    return [parts[r] for r in sorted(parts)]


class SegmentedGraph:
    """An exported graph split by `segments`, each saved as its own small graph beside the original
    (so the weights' external-data locations still resolve) and run by its own ONNX Runtime session.

    Or a graph in memory whose weights have no data (`model`: a traced graph after
    `quantize.weights_as_initializers`) with `load(name)` giving each weight: every segment then gets
    its weights from `load` (the checkpoint) as it is built, and nothing is written. `outputs`:
    more tensors to return (for example a MatMul's input), as if they were graph outputs."""

    def __init__(self, path: Path | None, threads: int = 2, model: onnx.ModelProto | None = None,
                 load: Callable[[str], np.ndarray] | None = None, outputs: list[str] = ()):
        self.path = Path(path) if path is not None else None
        self.threads = threads
        self.load = load
        if model is None:
            model = onnx.load(os.fspath(self.path), load_external_data=False)
        else:
            model = onnx.ModelProto.FromString(model.SerializeToString())  # outputs are added below
        existing = {o.name for o in model.graph.output}
        for name in outputs:
            if name not in existing:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        graph = model.graph
        self.opset = list(model.opset_import)
        self.graph_inputs = {i.name: i for i in graph.input}
        self.graph_outputs = [o.name for o in graph.output]
        self.inits = {t.name: t for t in graph.initializer}
        self.parts = segments(graph)
        produced_by = {}
        for k, part in enumerate(self.parts):
            for node in part:
                for o in node.output:
                    produced_by[o] = k
        self.needs: list[list[str]] = []  # per segment: tensors it reads from earlier segments or graph inputs
        self.gives: list[list[str]] = []  # per segment: tensors later segments or the graph's outputs read
        consumers: dict[str, set[int]] = {}
        for k, part in enumerate(self.parts):
            own = {o for n in part for o in n.output}
            need = []
            for node in part:
                for i in node.input:
                    if i and i not in own and i not in self.inits and i not in need:
                        need.append(i)
                        consumers.setdefault(i, set()).add(k)
            self.needs.append(need)
        for k, part in enumerate(self.parts):
            give = [o for n in part for o in n.output
                    if o in self.graph_outputs or any(c > k for c in consumers.get(o, ()))]
            self.gives.append(give)
        self.last_use = {}
        for name, users in consumers.items():
            self.last_use[name] = max(users)
        self.dtypes = self._value_types(model)

    def empty_past(self) -> dict[str, np.ndarray]:
        """Zero-length `past.*` inputs (the plain forward), or {} for a graph without them."""
        empty = {}
        for n, vi in self.graph_inputs.items():
            if n.startswith("past."):
                t = vi.type.tensor_type
                dtype = np.float16 if t.elem_type == onnx.TensorProto.FLOAT16 else np.float32
                empty[n] = np.zeros((1, t.shape.dim[1].dim_value, 0, t.shape.dim[3].dim_value), dtype)
        return empty

    def _value_types(self, model: onnx.ModelProto) -> dict[str, int]:
        """Element type of every tensor crossing a segment boundary (shape inference on the weightless graph)."""
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
        types = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            types[vi.name] = vi.type.tensor_type.elem_type
        return types

    def _segment_model(self, k: int, scratch: Path | None) -> Path | bytes:
        """Segment k's graph: a file beside the original, or (weights from `load`) serialized bytes."""
        part = self.parts[k]
        used = {i for n in part for i in n.input}
        inits = [self.inits[n] for n in used if n in self.inits]
        if self.load is not None:
            from onnx import numpy_helper

            inits = [numpy_helper.from_array(self.load(t.name), t.name) if _without_data(t) else t for t in inits]
        inputs = [self.graph_inputs[n] if n in self.graph_inputs else
                  onnx.helper.make_tensor_value_info(n, self.dtypes.get(n, onnx.TensorProto.FLOAT), None)
                  for n in self.needs[k]]
        outputs = [onnx.helper.make_tensor_value_info(n, self.dtypes.get(n, onnx.TensorProto.FLOAT), None)
                   for n in self.gives[k]]
        graph = onnx.helper.make_graph(part, f"segment{k}", inputs, outputs, initializer=inits)
        model = onnx.helper.make_model(graph, opset_imports=self.opset)
        model.ir_version = onnx.IR_VERSION if model.ir_version == 0 else model.ir_version
        if scratch is None:
            return model.SerializeToString()  # one segment: under protobuf's 2 GB at bge-en-icl's size
        path = scratch / f".segment{k}-{os.getpid()}.onnx"
        onnx.save_model(model, os.fspath(path))
        return path

    def run(self, runs: list["Run"],
            on_output: Callable[[int, str, np.ndarray], None] | None = None) -> list[dict[str, np.ndarray]]:
        """Run several workloads through the graph in lockstep, one segment (one session) at a time;
        returns each run's `keep` outputs. A run with `past_from` = r takes its `past.{i}.*` inputs from
        run r's `present.{i}.*` outputs (run r must come first and keep them): the prefix cache.
        `on_output(run, name, value)` sees every output of every segment as it is made (for
        reducing large ones on the fly instead of keeping them)."""
        import onnxruntime as ort

        values = [dict(run.feeds) for run in runs]
        results: list[dict[str, np.ndarray]] = [dict() for _ in runs]
        opts = session_options(self.threads)
        # Without this, each session's arena stays resident after the session is gone (measured: about
        # 480 MiB more per segment on an 8-layer model); with it the peak is one segment's.
        opts.enable_cpu_mem_arena = False
        start = time.perf_counter()
        for k in range(len(self.parts)):
            segment = self._segment_model(k, self.path.parent if self.load is None else None)
            if isinstance(segment, bytes):
                sess = ort.InferenceSession(segment, opts, providers=["CPUExecutionProvider"])
                del segment
            else:
                try:
                    sess = ort.InferenceSession(os.fspath(segment), opts, providers=["CPUExecutionProvider"])
                finally:
                    segment.unlink()
            for r, run in enumerate(runs):
                for name in self.needs[k]:
                    if name not in values[r] and run.past_from is not None and name.startswith("past."):
                        values[r][name] = results[run.past_from][name.replace("past.", "present.", 1)]
                missing = [n for n in self.needs[k] if n not in values[r]]
                if missing:
                    raise ValueError(f"segment {k} needs {missing}, which no earlier segment gave")
                outs = sess.run(self.gives[k], {n: values[r][n] for n in self.needs[k]})
                for name, value in zip(self.gives[k], outs):
                    if on_output is not None:
                        on_output(r, name, value)
                    if name in run.keep:
                        results[r][name] = value
                    if self.last_use.get(name, -1) > k:
                        values[r][name] = value
                for name in [n for n in values[r] if self.last_use.get(n, -1) <= k]:
                    del values[r][name]
            del sess
            log.info("%s: segment %d/%d run (%.0f s so far, peak RSS %.2f GiB)",
                     self.path.parent.name if self.path else "checkpoint", k + 1,
                     len(self.parts), time.perf_counter() - start, _peak_rss_gib())
        return results


def _without_data(t: onnx.TensorProto) -> bool:
    """An initializer that only describes a weight (`quantize.weights_as_initializers`)."""
    return t.data_location == onnx.TensorProto.EXTERNAL and not any(e.key == "location" for e in t.external_data)


@dataclass
class Run:
    """One workload for `SegmentedGraph.run`: graph inputs, graph outputs to return, prefix source."""

    feeds: dict[str, np.ndarray]
    keep: set[str]
    past_from: int | None = None
