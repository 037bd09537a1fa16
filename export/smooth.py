"""SmoothQuant for the int8 graph: move activation outliers into the weights before export.

LLM hidden states carry a few channels with values 10-100x the rest; one per-token int8 scale then
leaves the ordinary channels with a handful of levels. SmoothQuant (Xiao et al. 2023) divides each
input channel j of a linear layer by s_j and multiplies the matching weight row by s_j, an exact
identity in fp32:

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

The division is folded into whatever produces X, so the fp32 graph gains no node:

- q/k/v input: `input_layernorm.weight /= s`, q/k/v weight columns `*= s`;
- gate/up input: `post_attention_layernorm.weight /= s`, gate/up columns `*= s`;
- down input (act(gate) * up): `up_proj` output rows `/= s`, down columns `*= s`;
- o input (attention output): `v_proj` output rows `/= s`, o columns `*= s`, with one s per
  key/value channel (the max over the query heads of its GQA group), since every query head of a
  group reads the same V channel.

`prepare(model, tokenizer)` calibrates on `calibration.txt` (bundled text, a bounded number of tokens,
one text at a time, only per-channel maxima kept: a 7B model needs no extra memory beyond one
forward pass) and smooths the model in place. Call it on the fp32 PyTorch model before tracing the
graph that the int8 variant is quantized from; the fp32 graph stays exact (within rounding) and can
ship as fp32 too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CALIBRATION = Path(__file__).with_name("calibration.txt")
DEFAULTS = {
    "alpha": 0.5,
    "max_tokens": 4096,
    "max_length": 512,
    "skip_first_token": True,
    "targets": ["qkv", "gate_up", "down", "o"],
}


def calibration_texts(path: Path = CALIBRATION) -> list[str]:
    """Texts of `path`, separated by lines holding only `----`."""
    text = path.read_text(encoding="utf-8")
    return [t.strip("\n") for t in text.split("\n----\n") if t.strip()]


def _layers(model) -> list:
    base = getattr(model, "model", model)  # *ForCausalLM or the base model
    return list(base.layers)


@torch.no_grad()
def collect(
    model, tokenizer, texts: list[str], max_tokens: int, max_length: int, skip_first_token: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """Per-channel max |x| of the inputs of q_proj, gate_proj, down_proj and o_proj of every layer."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            if skip_first_token and x.shape[-2] > 1:
                x = x[..., 1:, :]
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)

        return fn

    for i, layer in enumerate(_layers(model)):
        for name, module in (
            ("qkv", layer.self_attn.q_proj),
            ("o", layer.self_attn.o_proj),
            ("gate_up", layer.mlp.gate_proj),
            ("down", layer.mlp.down_proj),
        ):
            hooks.append(module.register_forward_pre_hook(hook(f"{i}.{name}")))
    used = _feed(model, tokenizer, texts, hooks, max_tokens, max_length, min_tokens=2)
    return stats, used


def _scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    x_max = x_max.clamp(min=1e-5)
    w_max = w_max.clamp(min=1e-5)
    s = x_max.pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


@torch.no_grad()
def apply(model, stats: dict[str, torch.Tensor], alpha: float, targets: list[str]) -> dict:
    """Smooth in place; returns per-target summaries (max ratio of channel peaks before and after)."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    group = heads // kv_heads
    summary = {t: [] for t in targets}
    for i, layer in enumerate(_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        if "qkv" in targets:
            lin = [attn.q_proj, attn.k_proj, attn.v_proj]
            w_max = torch.cat([m.weight.abs() for m in lin], dim=0).amax(dim=0).float()
            s = _scales(stats[f"{i}.qkv"], w_max, alpha)
            layer.input_layernorm.weight.div_(s.to(layer.input_layernorm.weight.dtype))
            for m in lin:
                m.weight.mul_(s.to(m.weight.dtype)[None, :])
            summary["qkv"].append(_spread(stats[f"{i}.qkv"], s))
        if "gate_up" in targets:
            lin = [mlp.gate_proj, mlp.up_proj]
            w_max = torch.cat([m.weight.abs() for m in lin], dim=0).amax(dim=0).float()
            s = _scales(stats[f"{i}.gate_up"], w_max, alpha)
            layer.post_attention_layernorm.weight.div_(s.to(layer.post_attention_layernorm.weight.dtype))
            for m in lin:
                m.weight.mul_(s.to(m.weight.dtype)[None, :])
            summary["gate_up"].append(_spread(stats[f"{i}.gate_up"], s))
        if "down" in targets:
            s = _scales(stats[f"{i}.down"], mlp.down_proj.weight.abs().amax(dim=0).float(), alpha)
            mlp.up_proj.weight.div_(s.to(mlp.up_proj.weight.dtype)[:, None])
            if mlp.up_proj.bias is not None:
                mlp.up_proj.bias.div_(s.to(mlp.up_proj.bias.dtype))
            mlp.down_proj.weight.mul_(s.to(mlp.down_proj.weight.dtype)[None, :])
            summary["down"].append(_spread(stats[f"{i}.down"], s))
        if "o" in targets:
            # o_proj input channel (h, d) reads V channel (h // group, d): one scale per kv channel.
            x = stats[f"{i}.o"].view(kv_heads, group, head_dim).amax(dim=1)
            w = attn.o_proj.weight.abs().amax(dim=0).float().view(kv_heads, group, head_dim).amax(dim=1)
            s_kv = _scales(x, w, alpha)  # [kv_heads, head_dim]
            s_full = s_kv[:, None, :].expand(kv_heads, group, head_dim).reshape(-1)
            attn.v_proj.weight.div_(s_kv.reshape(-1).to(attn.v_proj.weight.dtype)[:, None])
            if attn.v_proj.bias is not None:
                attn.v_proj.bias.div_(s_kv.reshape(-1).to(attn.v_proj.bias.dtype))
            attn.o_proj.weight.mul_(s_full.to(attn.o_proj.weight.dtype)[None, :])
            summary["o"].append(_spread(stats[f"{i}.o"], s_full))
    return {
        t: {
            "max_channel_ratio_before": max(v[0] for v in vals) if vals else None,
            "max_channel_ratio_after": max(v[1] for v in vals) if vals else None,
        }
        for t, vals in summary.items()
    }


def _spread(x_max: torch.Tensor, s: torch.Tensor) -> tuple[float, float]:
    """Peak channel over median channel, before and after smoothing."""

    def ratio(v):
        return float(v.max() / v.median().clamp(min=1e-8))

    return ratio(x_max), ratio(x_max / s)


def prepare(model, tokenizer, alpha: float | None = None, texts: list[str] | None = None, **options) -> dict:
    """Calibrate on the bundled texts and smooth `model` in place; returns the manifest's settings."""
    opts = {**DEFAULTS, **options}
    if alpha is not None:
        opts["alpha"] = alpha
    start = time.perf_counter()
    texts = texts if texts is not None else calibration_texts()
    stats, used = collect(model, tokenizer, texts, opts["max_tokens"], opts["max_length"], opts["skip_first_token"])
    summary = apply(model, stats, opts["alpha"], opts["targets"])
    seconds = time.perf_counter() - start
    log.info("smoothquant alpha %.2f on %d calibration tokens in %.1f s: %s", opts["alpha"], used, seconds, summary)
    return {
        "method": "smoothquant",
        "alpha": opts["alpha"],
        "targets": list(opts["targets"]),
        "calibration_tokens": used,
        "skip_first_token": opts["skip_first_token"],
        "calibration": CALIBRATION.name,
    }


LINEARS = (
    ("self_attn", "q_proj", "q"),
    ("self_attn", "k_proj", "k"),
    ("self_attn", "v_proj", "v"),
    ("self_attn", "o_proj", "o"),
    ("mlp", "gate_proj", "gate"),
    ("mlp", "up_proj", "up"),
    ("mlp", "down_proj", "down"),
)


def _fake_w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T with x int8 per token and w int8 per output channel (symmetric), in float."""
    xs = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    ws = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.nn.functional.linear(torch.round(x / xs) * xs, torch.round(w / ws) * ws)


@torch.no_grad()
def sensitivity(
    model, tokenizer, texts: list[str] | None = None, max_tokens: int = 1024, max_length: int = 512
) -> dict[str, float]:
    """Relative output error ||y_int8 - y|| / ||y|| of each linear layer under w8a8 per-token, on calibration text.

    Keys are `"{layer}.{q|k|v|o|gate|up|down}"`. Run it after `prepare` (on the smoothed weights).
    """
    texts = texts if texts is not None else calibration_texts()
    err: dict[str, list[float]] = {}
    hooks = []

    def hook(name):
        def fn(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            y = out.reshape(-1, out.shape[-1]).float()
            if module.bias is not None:
                y = y - module.bias.float()
            d = _fake_w8a8(x, module.weight.float()) - y
            e = err.setdefault(name, [0.0, 0.0])
            e[0] += float(d.pow(2).sum())
            e[1] += float(y.pow(2).sum())

        return fn

    for i, layer in enumerate(_layers(model)):
        for parent, attr, short in LINEARS:
            module = getattr(getattr(layer, parent), attr)
            hooks.append(module.register_forward_hook(hook(f"{i}.{short}")))
    _feed(model, tokenizer, texts, hooks, max_tokens, max_length)
    return {k: (v[0] / max(v[1], 1e-30)) ** 0.5 for k, v in err.items()}


def _feed(model, tokenizer, texts, hooks, max_tokens: int, max_length: int, min_tokens: int = 1) -> int:
    """Runs `texts` (truncated, at most `max_tokens` in all, skipping inputs under `min_tokens`)
    through `model`, then removes `hooks`; returns the tokens used."""
    used = 0
    try:
        for text in texts:
            if used >= max_tokens:
                break
            ids = tokenizer(text, truncation=True, max_length=min(max_length, max_tokens - used), return_tensors="pt")[
                "input_ids"
            ]
            if ids.shape[1] < min_tokens:
                continue
            model(input_ids=ids, use_cache=False)
            used += int(ids.shape[1])
    finally:
        for h in hooks:
            h.remove()
    return used


def keep_patterns(scores: dict[str, float], count: int) -> list[str]:
    """Regexes (for quantize's `keep`) naming the `count` most sensitive linear layers.

    They match the package exporter's MatMul names (`/layers.3/down/MatMul`) and weight names
    (`layers.3.down.weight`).
    """
    worst = sorted(scores, key=scores.get, reverse=True)[:count]
    out = []
    for key in worst:
        layer, short = key.split(".")
        out.append(rf"(^|/)layers\.{layer}[./]{short}[./]")
    return out
