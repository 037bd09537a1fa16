"""Stand-in models (export/standins.py): deterministic bytes, loadable by transformers, bge-like tokenizers.

Environment: ICL_TINY_DIR names a cached `python -m export.standins tiny --out DIR` (defaults: converted
style, seed 0) to reuse as one of the two determinism builds; ICL_SMOLLM2_DIR a cached smollm2.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModel, AutoTokenizer

from export import standins

TINY_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
ICL_IDS = {"<instruct>": 32000, "<query>": 32001, "<response>": 32002}


def _cached_or_build(cached: Path | None, name: str, tmp_path_factory: pytest.TempPathFactory, **kwargs) -> Path:
    if cached is not None:
        return cached
    return standins.build(name, tmp_path_factory.mktemp(name) / "model", **kwargs)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory, cached) -> dict[str, Path]:
    return {
        "converted": _cached_or_build(cached("ICL_TINY_DIR"), "tiny", tmp_path_factory),
        "legacy": standins.build("tiny", tmp_path_factory.mktemp("legacy") / "model", style="legacy"),
    }


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tiny_builds_byte_for_byte_the_same(tiny_dirs, tmp_path):
    again = standins.build("tiny", tmp_path / "again")
    first = _hashes(tiny_dirs["converted"])
    assert set(first) == TINY_FILES
    assert first == _hashes(again)


def test_seed_changes_the_weights_only(tiny_dirs, tmp_path):
    other = _hashes(standins.build("tiny", tmp_path / "seed1", seed=1))
    first = _hashes(tiny_dirs["converted"])
    assert other["model.safetensors"] != first["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in first.items() if k != "model.safetensors"
    }


def test_tiny_config_and_weights(tiny_dirs):
    directory = tiny_dirs["converted"]
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["MistralModel"] and config["model_type"] == "mistral"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 64, 128)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert (config["vocab_size"], config["rope_theta"], config["rms_norm_eps"]) == (32003, 10000.0, 1e-5)
    assert config["sliding_window"] is None

    weights = load_file(directory / "model.safetensors")
    assert weights["embed_tokens.weight"].shape == (32003, 64)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert torch.equal(weights["norm.weight"], torch.ones(64))
    std = float(weights["layers.0.self_attn.q_proj.weight"].std())
    assert 0.015 < std < 0.025

    model, info = AutoModel.from_pretrained(directory, output_loading_info=True)
    assert type(model).__name__ == "MistralModel"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(model.embed_tokens.weight, weights["embed_tokens.weight"])


@pytest.mark.parametrize("style", standins.STYLES)
def test_tokenizer_special_tokens(tiny_dirs, style):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs[style])
    assert type(tokenizer).__name__ == "LlamaTokenizerFast"
    assert len(tokenizer) == 32003
    assert tokenizer.convert_tokens_to_ids(list(ICL_IDS)) == list(ICL_IDS.values())
    ids = tokenizer("<instruct>hello\n<query>world")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2
    assert 32000 in ids and 32001 in ids
    assert ids.count(1) == 1 and ids.count(2) == 1
    bare = tokenizer("<instruct>hello\n<query>world", add_special_tokens=False)["input_ids"]
    assert ids == [1, *bare, 2]
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side) == ("<unk>", 0, "left")
    assert tokenizer.clean_up_tokenization_spaces is False
    # Truncation keeps </s>, as the reference's document path relies on.
    long = tokenizer("word " * 100, truncation=True, max_length=10)["input_ids"]
    assert len(long) == 10 and long[0] == 1 and long[-1] == 2


@pytest.mark.parametrize("style", standins.STYLES)
def test_tokenizer_file_layout(tiny_dirs, style):
    directory = tiny_dirs[style]
    tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
    for key, want in standins.EXPECTED_LAYOUT[style].items():
        assert tokenizer_json[key] == want
    post = tokenizer_json["post_processor"]
    assert post["type"] == "TemplateProcessing"
    assert [next(iter(p.values()))["id"] for p in post["single"]] == ["<s>", "A", "</s>"]
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is True and tokenizer_config["add_eos_token"] is True
    # add_prefix_space would make transformers re-convert from a SentencePiece file we do not ship.
    assert "add_prefix_space" not in tokenizer_config
    assert not (directory / "tokenizer.model").exists()


@pytest.mark.parametrize("style", standins.STYLES)
@pytest.mark.parametrize(
    "text", ["<instruct>hello\n<query>world", "  two  spaces\n<response>x", "héllo wörld 123", "", "a\n\nb"]
)
def test_tokenizer_json_alone_matches_transformers(tiny_dirs, style, text):
    """What the Rust side loads (tokenizer.json alone) encodes exactly as transformers does."""
    directory = tiny_dirs[style]
    file_ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(text, add_special_tokens=True).ids
    assert file_ids == AutoTokenizer.from_pretrained(directory)(text)["input_ids"]


def test_styles_agree_on_plain_text_and_differ_after_special_tokens(tiny_dirs):
    converted = AutoTokenizer.from_pretrained(tiny_dirs["converted"])
    legacy = AutoTokenizer.from_pretrained(tiny_dirs["legacy"])
    plain = "hello world"
    assert converted(plain)["input_ids"] == legacy(plain)["input_ids"] == [1, 6312, 28709, 1526, 2]
    # "first" prepends ▁ only at the very start; the legacy normalizer before every piece.
    assert converted("<instruct>hello", add_special_tokens=False)["input_ids"] == [32000, 21558]
    assert legacy("<instruct>hello", add_special_tokens=False)["input_ids"] == [32000, 6312, 28709]
    # Leading spaces: "▁" + "▁two" against "▁▁" + "two".
    assert (
        converted(" two", add_special_tokens=False)["input_ids"]
        != legacy(" two", add_special_tokens=False)["input_ids"]
    )


def test_slice7b_shapes_without_building_weights():
    """slice7b's tensors (2.1 GiB when built) have bge-en-icl's per-layer shapes."""
    config = standins.mistral_config(2, 4096, 14336, 32, 8, 128)
    specs = {s.name: s.shape for s in standins.random_weight_specs(config, seed=0)}
    assert specs["embed_tokens.weight"] == (32003, 4096)
    assert specs["layers.1.self_attn.q_proj.weight"] == (4096, 4096)
    assert specs["layers.1.self_attn.k_proj.weight"] == (1024, 4096)
    assert specs["layers.1.mlp.gate_proj.weight"] == (14336, 4096)
    total = sum(torch.Size(s).numel() for s in specs.values())
    assert 2.0 < total * 4 / 2**30 < 2.2


def test_write_safetensors_rejects_wrong_shape(tmp_path):
    spec = standins.TensorSpec("x", (2, 3), lambda: torch.zeros(3, 2))
    with pytest.raises(ValueError, match="declared"):
        standins.write_safetensors(tmp_path / "x.safetensors", [spec])


def test_build_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        standins.build("tiny", tmp_path)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory, cached) -> Path:
    return _cached_or_build(cached("ICL_SMOLLM2_DIR"), "smollm2", tmp_path_factory)


def test_smollm2(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaModel"] and config["vocab_size"] == 49155

    model, info = AutoModel.from_pretrained(smollm2_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    params = sum(p.numel() for p in model.parameters())
    assert params == 134_515_008 + 3 * 576

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.convert_tokens_to_ids(["<instruct>", "<query>", "<response>"]) == [49152, 49153, 49154]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end == 2 and tokenizer.eos_token_id == 2
    assert tokenizer.pad_token_id == 0 and tokenizer.padding_side == "left"
    for text in ["hello world", "<instruct>Find it\n<query>what?\n<response>", "", "ends with im_end<|im_end|>"]:
        ids = tokenizer(text)["input_ids"]
        bare = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == bare + [end]
        file_ids = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode(text).ids
        assert file_ids == ids
    assert tokenizer("<query>x", add_special_tokens=False)["input_ids"][0] == 49153
    # Digits one by one, as SmolLM2's own tokenizer (and llama.cpp's "smollm" pre-tokenizer) split them.
    assert tokenizer.convert_ids_to_tokens(tokenizer("12345", add_special_tokens=False)["input_ids"]) == [
        "1",
        "2",
        "3",
        "4",
        "5",
    ]
    # The decode/re-encode step of queries must be an identity on plain text.
    text = "Héllo  wörld, 2024!\nnext line"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_smollm2_tokenizer_matches_llama_cpp(smollm2_dir, require_module):
    """The GGUF's own tokenizer (llama.cpp) and ours agree on ordinary text."""
    llama_cpp = require_module("llama_cpp")
    gguf = standins.package_file(*standins.SMOLLM2_GGUF)
    vocab = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in ["hello world 12345", "Don't stop-believing; it's 3.14!", "  spaces\n\ttab", "naïve café 東京"]:
        want = vocab.tokenize(text.encode(), add_bos=False, special=False)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == want, text


def test_sharded_layout_holds_the_same_tensors(tiny_dirs, tmp_path):
    """full7b's writer (hub layout: shards + index) on the tiny config: every tensor lands in exactly
    one shard named by the index, and transformers loads the same weights as the one-file build."""
    config = standins.mistral_config(2, 64, 128, 4, 2, 16)
    out = tmp_path / "sharded"
    out.mkdir()
    shards = standins.write_sharded(out, standins.random_weight_specs(config, seed=0), max_shard_bytes=1_500_000)
    assert [p.name for p in shards] == [
        f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)
    ]
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text(encoding="utf-8"))
    one = load_file(tiny_dirs["converted"] / "model.safetensors")
    assert set(index["weight_map"]) == set(one)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in one.values())
    for shard in shards:
        tensors = load_file(shard)
        assert shard.stat().st_size <= 1_500_000 + 100_000 or len(tensors) == 1
        for name, tensor in tensors.items():
            assert index["weight_map"][name] == shard.name
            assert torch.equal(tensor, one[name]), name
    for name in TINY_FILES - {"model.safetensors"}:
        (out / name).write_bytes((tiny_dirs["converted"] / name).read_bytes())
    model = AutoModel.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, one[name]), name


def test_full7b_is_bge_en_icl_at_full_depth_without_building_it():
    """full7b (28.5 GB when built) has bge-en-icl's 32 layers, 7.1 B parameters, and 3 hub-sized shards."""
    config = standins.mistral_config(32, 4096, 14336, 32, 8, 128)
    specs = standins.random_weight_specs(config, seed=0)
    total = sum(torch.Size(s.shape).numel() for s in specs)
    assert 7.10e9 < total < 7.12e9
    assert 28.4e9 < total * 4 < 28.5e9  # the hub's three shards: 9.89 + 10 + 8.56 GB
