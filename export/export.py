"""PyTorch to ONNX: the package's decoder graph (export/decoder.py) in fp32 and fp16.

The graph is traced with the TorchScript exporter (`dynamo=False`) from `decoder.Decoder`, which
recomputes the Hugging Face forward from its weights; tracing that plain module takes seconds where
the dynamo exporter of the Hugging Face model took minutes. Inputs `input_ids`, `attention_mask`,
`position_ids` (int64 [batch, seq]) and the prefix states `past.{i}.key|value` ([1, kv_heads, past,
head_dim], model dtype); outputs `last_hidden_state` (final-norm hidden states, float32 in every
variant so that the runtime reads one dtype) and `present.{i}.key|value`. All weights go to one
external data file `model.onnx.data` beside the graph.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from transformers import AutoModel, PreTrainedModel

from .decoder import Decoder, past_names, present_names

log = logging.getLogger(__name__)

INPUTS = ["input_ids", "attention_mask", "position_ids"]
OUTPUT = "last_hidden_state"
SUPPORTED = {"MistralModel", "LlamaModel"}
OPSET = 18


def load_model(model_dir: Path) -> PreTrainedModel:
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ValueError(f"{model_dir} loads as {name}; supported: {', '.join(sorted(SUPPORTED))}")
    return model.eval()


def to_half(decoder: Decoder) -> None:
    """Weights to fp16 in place; the RoPE frequencies stay fp32.

    `module.half()` would also round inv_freq to fp16, which shifts rotary phases by up to 0.2 rad
    at position 512 and several radians at 4096.
    """
    with torch.no_grad():
        for p in decoder.parameters():
            p.data = p.data.to(torch.float16)


def example_inputs(batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 100, (batch, seq), dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    pos = torch.arange(seq, dtype=torch.int64).expand(batch, seq).contiguous()
    return ids, mask, pos


def export_graph(decoder: Decoder, path: Path) -> None:
    """Trace `decoder` and save `path` with all weights in `path.name + ".data"` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = decoder.layers_count
    dtype = decoder.embed.dtype
    past = [torch.zeros(1, decoder.kv_heads, 3, decoder.head_dim, dtype=dtype) for _ in range(2 * layers)]
    dims = {name: {0: "batch", 1: "seq"} for name in INPUTS + [OUTPUT]}
    dims.update({name: {2: "past"} for name in past_names(layers)})
    dims.update({name: {0: "batch", 2: "seq"} for name in present_names(layers)})
    # The TorchScript exporter writes a model over 2 GB as one file per tensor; trace into a scratch
    # directory and gather the weights into one data file from there.
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        traced = Path(scratch) / "model.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                decoder, (*example_inputs(), *past), os.fspath(traced), dynamo=False, opset_version=OPSET,
                input_names=INPUTS + past_names(layers), output_names=[OUTPUT] + present_names(layers),
                dynamic_axes=dims, do_constant_folding=True,
            )
        gc.collect()
        externalize(traced, path)
    data = path.with_name(path.name + ".data")
    log.info("wrote %s (%.1f MiB) and %s (%.1f MiB)", path, _mib(path), data, _mib(data))


def externalize(src: Path, dst: Path, min_bytes: int = 1024) -> None:
    """Save graph `src` as `dst` with every initializer of `min_bytes` or more in `dst.name + ".data"`.

    Reads one tensor at a time (inline or from `src`'s own external files), so a 28 GB model never
    sits in memory whole.
    """
    model = onnx.load(os.fspath(src), load_external_data=False)
    data_name = dst.name + ".data"
    offset = 0
    with open(dst.with_name(data_name), "wb") as out:
        for tensor in model.graph.initializer:
            raw = _raw_bytes(tensor, src.parent)
            if raw is None or len(raw) < min_bytes:
                continue
            pad = (-offset) % 64  # aligned, so that the runtime can map tensors in place
            out.write(b"\0" * pad)
            offset += pad
            out.write(raw)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)
    onnx.save_model(model, os.fspath(dst))


def _raw_bytes(tensor: onnx.TensorProto, base: Path) -> bytes | None:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            length = info.get("length")
            return f.read(int(length)) if length is not None else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return None  # typed fields (small constants): left inline


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20
