"""PyTorch to ONNX: the base model's graph in fp32 and fp16.

The graph is traced with the dynamo exporter (`torch.onnx.export(..., dynamo=True)`; the TorchScript
exporter fails on Mistral) with eager attention, which exports to plain MatMul/Softmax and keeps the
softmax in fp32 for fp16 weights. Inputs `input_ids`, `attention_mask`, `position_ids` (int64
[batch, seq], both dimensions dynamic); output `last_hidden_state` (final-norm hidden states), cast
to float32 in every variant so that the runtime reads one dtype.
"""

from __future__ import annotations

import gc
import logging
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoModel, PreTrainedModel

log = logging.getLogger(__name__)

INPUTS = ["input_ids", "attention_mask", "position_ids"]
OUTPUT = "last_hidden_state"
SUPPORTED = {"MistralModel", "LlamaModel"}


class HiddenStates(torch.nn.Module):
    """The base model with the runtime's signature: three int64 inputs, one float32 output."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state.float()


def load_model(model_dir: Path) -> PreTrainedModel:
    model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
    name = type(model).__name__
    if name not in SUPPORTED:
        raise ValueError(f"{model_dir} loads as {name}; supported: {', '.join(sorted(SUPPORTED))}")
    return model.eval()


def to_half(model: PreTrainedModel) -> None:
    """Weights to fp16 in place; buffers (RoPE's inv_freq) stay fp32.

    `model.half()` would also round inv_freq to fp16, which shifts rotary phases by up to 0.2 rad
    at position 512 and several radians at 4096.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(torch.float16)
    model.config.torch_dtype = torch.float16


def example_inputs(batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 100, (batch, seq), dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    pos = torch.arange(seq, dtype=torch.int64).expand(batch, seq).contiguous()
    return ids, mask, pos


def export_graph(model: PreTrainedModel, path: Path) -> None:
    """Trace `model` and save `path` with all weights in `path.name + ".data"` beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {name: {0: batch, 1: seq} for name in INPUTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            HiddenStates(model),
            example_inputs(),
            dynamo=True,
            dynamic_shapes=dims,
            input_names=INPUTS,
            output_names=[OUTPUT],
            verbose=False,
        )
    # `save` names the external data file after the graph: model.onnx -> model.onnx.data.
    program.save(os.fspath(path), external_data=True)
    del program
    gc.collect()
    data = path.with_name(path.name + ".data")
    if not data.is_file():
        raise RuntimeError(f"the exporter did not write {data}")
    log.info("wrote %s (%.1f MiB) and %s (%.1f MiB)", path, _mib(path), data, _mib(data))


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20
