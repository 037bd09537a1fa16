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
  fp16 cast. int8 is made from the fp32 graph afterwards by `int8.select.choose` (package.py),
  which also reads one weight at a time.
- `reference_hidden` is the PyTorch fp32 reference, Hugging Face's own forward with one decoder
  layer's weights loaded at a time (hooks load a layer before it runs and drop it after).

The exported graphs are run one layer at a time by `ortrun.segmented.SegmentedGraph`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from transformers import AutoModel

from .decoder import Decoder, past_names, present_names
from .export import INPUTS, OPSET, OUTPUT, example_inputs
from .verify import torch_hidden

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


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
    names = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
        "input_norm": "input_layernorm",
        "post_norm": "post_attention_layernorm",
        "q_norm": "self_attn.q_norm",
        "k_norm": "self_attn.k_norm",
    }
    return f"layers.{layer}.{names[part]}.{kind}", kind == "weight" and not part.endswith("norm")


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
                decoder,
                (*example_inputs(), *past),
                os.fspath(path),
                dynamo=False,
                opset_version=OPSET,
                input_names=INPUTS + past_names(layers),
                output_names=[OUTPUT] + present_names(layers),
                dynamic_axes=dims,
                do_constant_folding=True,
                export_params=False,
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
    store: Callable[[str, np.ndarray, Target], None]
    data: DataFile | None = None


def write_variants(
    checkpoint: Checkpoint,
    graphs: dict[str, onnx.ModelProto],
    out: dict[str, Path],
    on_tensor: Callable[[str], None] | None = None,
) -> None:
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
        return torch_hidden(model, batch)
    finally:
        for h in hooks:
            h.remove()
