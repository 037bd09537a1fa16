"""The decoder the package ships, written out so that the prefix's key/value states can be fed back in.

`Decoder` recomputes a Hugging Face `MistralModel` / `LlamaModel` / `Qwen3Model` forward from that
model's own weights (same operations, same order, same dtypes as eager attention; Qwen3 adds an
RMSNorm over each query and key head, `q_norm` / `k_norm`, before RoPE), with one addition: each
layer takes the key/value states of a prefix computed earlier (`past.{i}.key`, `past.{i}.value`,
[1, kv_heads, past, head_dim], `past` may be 0) and returns the states of its own tokens
(`present.{i}.key`, `present.{i}.value`, [batch, kv_heads, seq, head_dim]). The prefix is one
sequence shared by every row of the batch: attention to it is a separate MatMul that broadcasts its
batch dimension of 1, so the states are never copied per row, and grouped-query attention reads each
key/value head once for its group of query heads instead of repeating it (`repeat_kv`).

With `past` = 0 the graph is the plain forward (documents, and queries without the cache). With a
prefix, `position_ids` continue from the prefix's length and `attention_mask` covers only the new
tokens; the prefix is fully visible to every new token (it is never padded).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


def past_names(layers: int) -> list[str]:
    return [f"past.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class _Linear(nn.Module):
    """x @ W with W stored [in, out]: a plain MatMul on a 2-D initializer in the graph."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias


class _RMSNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.eps = float(norm.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.groups = heads // kv_heads
        self.scaling = float(attn.scaling)
        self.input_norm = _RMSNorm(layer.input_layernorm)
        self.post_norm = _RMSNorm(layer.post_attention_layernorm)
        self.q, self.k, self.v, self.o = (
            _Linear(attn.q_proj),
            _Linear(attn.k_proj),
            _Linear(attn.v_proj),
            _Linear(attn.o_proj),
        )
        self.gate, self.up, self.down = _Linear(mlp.gate_proj), _Linear(mlp.up_proj), _Linear(mlp.down_proj)
        self.act = mlp.act_fn
        # Qwen3: RMSNorm over head_dim of every query and key head (weight [head_dim]), before RoPE.
        norms = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm, self.k_norm = (_RMSNorm(n) if n is not None else None for n in norms)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        b, s = x.shape[0], x.shape[1]
        h = self.input_norm(x)
        # [b, s, kv, g, d] -> [b, kv, g, s, d]: query head kv*g + j uses key/value head kv.
        # (Statements in this order so that a graph without q/k norms is traced node for node as before.)
        q = self.q(h).view(b, s, self.kv_heads, self.groups, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.permute(0, 2, 3, 1, 4)
        k = self.k(h).view(b, s, self.kv_heads, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        k = k.transpose(1, 2)
        v = self.v(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos.unsqueeze(1).unsqueeze(1) + _rotate_half(q) * sin.unsqueeze(1).unsqueeze(1)
        k = k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)
        q = q.reshape(b, self.kv_heads, self.groups * s, self.head_dim)
        # Scores against the prefix [b, kv, g*s, past] (past_k has batch 1 and broadcasts) and
        # against the new tokens [b, kv, g*s, s]; one softmax over both, in float32 as eager does.
        scores_past = torch.matmul(q, past_k.transpose(2, 3)) * self.scaling
        scores_new = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        scores_new = (scores_new.view(b, self.kv_heads, self.groups, s, s) + mask).view(
            b, self.kv_heads, self.groups * s, s
        )
        probs = torch.softmax(torch.cat((scores_past, scores_new), dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
        past = past_k.shape[2]
        out = torch.matmul(probs[..., :past], past_v) + torch.matmul(probs[..., past:], v)
        out = out.view(b, self.kv_heads, self.groups, s, self.head_dim).permute(0, 3, 1, 2, 4)
        x = x + self.o(out.reshape(b, s, self.heads * self.head_dim))
        h = self.post_norm(x)
        x = x + self.down(self.act(self.gate(h)) * self.up(h))
        return x, k, v


class Decoder(nn.Module):
    def __init__(self, model: PreTrainedModel, release: bool = False) -> None:
        """`release` frees each Hugging Face layer once its weights are copied, so that a 7B export
        holds one copy of the weights plus one layer, not two copies; `model` is unusable after."""
        super().__init__()
        config = model.config
        rotary = model.rotary_emb
        if getattr(rotary, "rope_type", "default") not in ("default", "linear", "llama3", "yarn", "longrope"):
            raise ValueError(f"rope type {rotary.rope_type!r} depends on the sequence length; not supported")
        # Mistral's window (4096 for bge-en-icl) is not built into the graph: the manifest records it
        # (`architecture.sliding_window`) and the runtime refuses longer rows.
        self.layers_count = config.num_hidden_layers
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.embed = nn.Parameter(model.embed_tokens.weight.detach(), requires_grad=False)
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.layers = nn.ModuleList()
        for i in range(len(model.layers)):
            self.layers.append(_Layer(model.layers[i], heads, kv_heads, head_dim))
            if release:
                model.layers[i] = nn.Identity()
        self.norm = _RMSNorm(model.norm)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        x = self.embed[input_ids]
        dtype = x.dtype
        s = input_ids.shape[1]
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        # [b, 1, 1, s, s]: token i sees new tokens j <= i that are not padding; min of the dtype elsewhere.
        idx = torch.arange(s, device=input_ids.device)
        allowed = (idx.unsqueeze(0) <= idx.unsqueeze(1)).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        mask = torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))
        mask = mask.unsqueeze(1).unsqueeze(1)
        presents = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.norm(x).float(), *presents)

    def empty_past(self, dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.zeros(1, self.kv_heads, 0, self.head_dim, dtype=dtype) for _ in range(2 * self.layers_count)]
