"""The package's graph: names, opset and the example inputs it is traced with.

The graph is traced with the TorchScript exporter (`dynamo=False`) from `decoder.Decoder`, which
recomputes the Hugging Face forward from its weights; `stream.trace` traces it without weights
(`export_params=False`) and `stream.write_variants` streams them in. Inputs `input_ids`,
`attention_mask`, `position_ids` (int64 [batch, seq]) and the prefix states `past.{i}.key|value`
([1, kv_heads, past, head_dim], model dtype); outputs `last_hidden_state` (final-norm hidden states,
float32 in every variant so that the runtime reads one dtype) and `present.{i}.key|value`. All
weights go to one external data file `model.onnx.data` beside the graph.
"""

from __future__ import annotations

import torch

INPUTS = ["input_ids", "attention_mask", "position_ids"]
OUTPUT = "last_hidden_state"
SUPPORTED = {"MistralModel", "LlamaModel", "Qwen3Model"}
OPSET = 18


def example_inputs(batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 100, (batch, seq), dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    pos = torch.arange(seq, dtype=torch.int64).expand(batch, seq).contiguous()
    return ids, mask, pos
