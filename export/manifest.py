"""The package manifest `embedder.json` (format `icl-embed/2`, see export/FORMAT.md).

Everything the runtime needs besides the graphs and tokenizer.json: architecture facts from the
config, the model family's prompt procedure, templates, default task, max lengths and shortened
vectors (`models/<family>.toml`, export/family.py), the special tokens as the tokenizer really
applies them (measured, not assumed; plus eos where the family's procedure appends it itself), and
per variant its files, dtypes, names, checksums and parity.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .export import INPUTS, OUTPUT
from .family import Family

FORMAT = "icl-embed/2"
ICL_TOKENS = ("<instruct>", "<query>", "<response>")
PROBE_TEXT = "Hello world, this is a probe."


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def architecture(config) -> dict:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "vocab": config.vocab_size,
        "rope_theta": float(getattr(config, "rope_theta", 10000.0)),
        "rms_norm_eps": float(config.rms_norm_eps),
        # Mistral's attention window (4096 for bge-en-icl): the graphs attend to every earlier token,
        # so the runtime refuses rows longer than this instead of embedding them differently.
        "sliding_window": _window(config),
    }


def _window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    return int(window) if window and getattr(config, "use_sliding_window", True) else None


def added_ids(tokenizer) -> dict[str, int] | None:
    """Ids of the three ICL tokens when the tokenizer has them as single tokens, else None."""
    vocab = tokenizer.get_vocab()
    if not all(t in vocab for t in ICL_TOKENS):
        return None
    return {t: vocab[t] for t in ICL_TOKENS}


def wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text when it adds special tokens."""
    plain = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    full = tokenizer(PROBE_TEXT, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise ValueError("the tokenizer changes a text's ids when it adds special tokens; cannot measure prepend/append")


def pad_token(tokenizer) -> tuple[str, int]:
    """FlagEmbedding pads with the tokenizer's pad token; without one, with unk, else eos."""
    for token, token_id in (
        (tokenizer.pad_token, tokenizer.pad_token_id),
        (tokenizer.unk_token, tokenizer.unk_token_id),
        (tokenizer.eos_token, tokenizer.eos_token_id),
    ):
        if token is not None and token_id is not None:
            return token, token_id
    raise ValueError("the tokenizer has no pad, unk or eos token to pad with")


def final_wrapping(tokenizer, family: Family | None = None) -> tuple[list[int], list[int]]:
    """The ids the family's procedure puts around every text: the tokenizer's own, plus eos at the
    end when the family appends it and the tokenizer does not (e5-mistral's model card code)."""
    prepend, append = wrapping(tokenizer)
    eos = tokenizer.eos_token_id
    if family is not None and family.append_eos and append[-1:] != [eos]:
        if eos is None:
            raise ValueError(f"family {family.name} ends every row with eos, but the tokenizer has none")
        append = append + [eos]
    return prepend, append


def special_tokens(tokenizer, family: Family | None = None) -> dict:
    prepend, append = final_wrapping(tokenizer, family)
    pad, pad_id = pad_token(tokenizer)
    return {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": pad,
        "bos_id": tokenizer.bos_token_id,
        "eos_id": tokenizer.eos_token_id,
        "pad_id": pad_id,
        "prepend": prepend,
        "append": append,
        "added": added_ids(tokenizer),
    }


# A quantized variant's start states (`start_states` in FORMAT.md), beside its model.onnx.
START_FILE = "start.onnx"


def variant_entry(
    package: Path, name: str, dtype: str, quantization: dict | None, parity: dict, start_ids: list[int] | None = None
) -> dict:
    """One `variants` entry. `start_ids`: the variant runs every input that begins with those ids on
    top of their states in `{name}/START_FILE` (computed in fp32 by the exporter)."""
    graph = f"{name}/model.onnx"
    data = f"{graph}.data"
    start = f"{name}/{START_FILE}"
    entry = {
        "file": graph,
        "data": data,
        "dtype": dtype,
        "inputs": list(INPUTS),
        "output": OUTPUT,
        "output_dtype": "float32",
        "sha256": {rel: sha256(package / rel) for rel in (graph, data)},
        "quantization": quantization,
        "parity": parity,
        "prefix_cache": {
            "past_key": "past.{layer}.key",
            "past_value": "past.{layer}.value",
            "present_key": "present.{layer}.key",
            "present_value": "present.{layer}.value",
            "dtype": "float16" if dtype == "float16" else "float32",
        },
    }
    if start_ids:
        entry["start_states"] = {"ids": list(start_ids), "file": start}
        entry["sha256"][start] = sha256(package / start)
    return entry


def build(
    config,
    tokenizer,
    package: Path,
    source: dict,
    family: Family,
    max_length: dict[str, int],
    variants: dict[str, dict],
) -> dict:
    return {
        "format": FORMAT,
        "source": {**source, "family": family.name},
        "architecture": architecture(config),
        "pooling": "last_token",
        "normalize": True,
        "padding_side": "right",
        "prompt": dict(family.prompt),
        "dimensions": dict(family.dimensions) if family.dimensions else None,
        "special_tokens": special_tokens(tokenizer, family),
        "max_length": dict(max_length),
        "clean_up_tokenization_spaces": bool(tokenizer.clean_up_tokenization_spaces),
        "tokenizer": {"file": "tokenizer.json", "sha256": sha256(package / "tokenizer.json")},
        "variants": variants,
    }


def write(package: Path, manifest: dict) -> None:
    """Write embedder.json atomically (it marks the package complete)."""
    path = package / "embedder.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
