"""The int8 recipes (`RECIPES`, fastest first; speeds in export/README.md) and how precise one is
against another (`at_least_as_precise`, which lets the selection skip recipes).

- `w8a8*` (method "w8a8", `rewrite.W8A8Rewriter`): every MatMul whose second input is a 2-D float
  initializer becomes per-token dynamic uint8 activations (zero point 128, scale max|row| / 127) x
  per-output-channel symmetric int8 weights through `com.microsoft.MatMulIntegerToFloat` (ONNX
  Runtime's u8 x s8 GEMM: VNNI on AVX-512 VNNI / AVX-VNNI CPUs). Options:
  - `outliers: k`: the k input channels of each MatMul input with the largest calibrated |x| are
    taken out of the int8 product (masked to 0 before the per-token scale is taken) and computed
    in fp32 by a small `[.., k] x [k, N]` MatMul added to the result (static outlier
    decomposition, LLM.int8()-style but with a fixed channel list);
  - `outliers_by_kind: {kind: k}`: another k for the MatMuls of one kind (`down`, ...);
  - `keep`: regexes on MatMul node or weight names that stay fp32;
  - `weight_bits: 7`: weights in -63..63 (default 8 bits, -127..127);
  - `embeddings: "int8"` (every w8a8 recipe): the token embedding table as int8 rows with one
    fp32 scale per row (Gather, Cast, times the gathered scale): a quarter of its fp32 size, which
    is most of a shallow stand-in's weights and 0.5 GB of bge-en-icl's.
- `nbits8-acc4-b128`, `nbits8-acc4-b32` (method "matmulnbits", `rewrite.rewrite_nbits`): block-wise
  int8 x int8, llama.cpp q8_0-like: `com.microsoft.MatMulNBits` with symmetric 8-bit weights, one
  fp32 scale per block of `block_size` along K, and `accuracy_level` 4, under which ONNX Runtime
  quantizes the activations to int8 per block of the same size at run time and takes integer dot
  products (kernel class "matmulnbits-int8"). An outlier channel widens the step of its block only,
  so they are faithful where per-token activations are not, at about half the w8a8 recipes'
  speed, above fp32's. The last candidates.
- `nbits8-acc1`: the same weights with `accuracy_level` 1 (fp32 compute, "matmulnbits-fp32"),
  weight-only. Not in `CANDIDATES`: ONNX Runtime expands the weights to fp32 on every run.

u8 x s8 and CPUs without VNNI: ONNX Runtime's AVX2 u8 x s8 kernel sums pairs of products in int16
(`vpmaddubsw`) and saturates with full-range 8-bit weights. The session option
`session.x64quantprecision=1` makes ONNX Runtime rewrite the s8 weights of MatMulIntegerToFloat
(and MatMulInteger, QGemm, ...) to u8 at load (`Avx2WeightS8ToU8Transformer`, applied only when
`MlasPlatformU8S8Overflow()`); the runtime sets it where the CPU lacks VNNI, so one package is exact
on both (src/backend/runtime.rs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str  # "w8a8" or "matmulnbits"
    settings: dict = field(default_factory=dict)

    @property
    def kernel(self) -> str:
        """The speed class the runtime's `--variant auto` reads (FORMAT.md)."""
        if self.method == "w8a8":
            return "u8s7" if self.settings.get("weight_bits") == 7 else "u8s8"
        return "matmulnbits-fp32" if self.settings.get("accuracy_level") == 1 else "matmulnbits-int8"

    def describe(self) -> dict:
        """The manifest's `quantization` field (before `choose` adds the selection)."""
        return {"recipe": self.name, "method": self.method, "kernel": self.kernel, **self.settings}


def _w8(name: str, **extra) -> Recipe:
    return Recipe(name, "w8a8", {"activations": "u8", "weights": "s8", "embeddings": "int8", **extra})


_DOWN = r"[./]down[./]"

# The w8a8 recipes, fastest first (slice7b, AVX-512 VNNI, 2 threads; export/README.md).
_W8A8 = {
    "": {},
    "-o8": {"outliers": 8},
    "-o32": {"outliers": 32},
    "-o32-down128": {"outliers": 32, "outliers_by_kind": {"down": 128}},
    "-o64-down256": {"outliers": 64, "outliers_by_kind": {"down": 256}},
    "-o32-down-fp32": {"outliers": 32, "keep": [_DOWN]},
}
# Each comes twice: with 7-bit weights (`w7a8*`, -63..63) first, then 8-bit (`w8a8*`). 7-bit
# weights keep ONNX Runtime's u8 x s8 GEMM exact on CPUs without VNNI (its int16 pair sums cannot
# saturate: 2 x 255 x 63 < 32767), so it runs there as is, 1.84x fp32 on slice7b against 1.35x for
# 8-bit weights, which need the slower exact u8 x u8 kernel; with VNNI both run the same kernel.
# They cost fidelity, so `choose` takes the first that is faithful on the model being exported;
# after them come the block-wise int8 x int8 recipes.
RECIPES = {
    f"w{bits}a8{suffix}": _w8(f"w{bits}a8{suffix}", **extra, **({"weight_bits": 7} if bits == 7 else {}))
    for suffix, extra in _W8A8.items()
    for bits in (7, 8)
}
NBITS8_BLOCKS = (128, 32)


def _nbits8(name: str, block: int, accuracy_level: int) -> Recipe:
    return Recipe(
        name,
        "matmulnbits",
        {"bits": 8, "block_size": block, "symmetric": True, "accuracy_level": accuracy_level},
    )


# Block-wise int8 x int8 (llama.cpp q8_0-like): faithful where per-token activations are not (an
# outlier channel widens the step of its block only), slower than the w8a8 recipes (a float scale
# per block of every product), faster than fp32. Larger blocks are faster (fewer scales) and less
# precise (export/README.md, tests/bench/nbits_kernels.py); the 32-wide one is q8_0's layout.
for _block in NBITS8_BLOCKS:
    RECIPES[f"nbits8-acc4-b{_block}"] = _nbits8(f"nbits8-acc4-b{_block}", _block, 4)
# The default selection: the recipes above, fastest first. `nbits8-acc1` (weight-only, fp32
# compute) left it: ONNX Runtime expands its 8-bit weights to fp32 on every run (1 x 8 tokens
# 12x slower than fp32, so minutes per short text at bge-en-icl's size); it stays a recipe that
# can be asked for by name.
CANDIDATES = list(RECIPES)
RECIPES["nbits8-acc1"] = _nbits8("nbits8-acc1", 32, 1)


_PRECISION = ("weight_bits", "outliers", "outliers_by_kind", "keep")


def _kinds_kept(recipe: Recipe) -> set[str] | None:
    """The MatMul kinds a w8a8 recipe keeps fp32 (`keep` entries of the form `[./]kind[./]`), or
    None when a `keep` entry is another kind of regex."""
    kinds = set()
    for pattern in recipe.settings.get("keep", []):
        m = re.fullmatch(r"\[\./\]([A-Za-z_]+)\[\./\]", pattern)
        if m is None:
            return None
        kinds.add(m.group(1))
    return kinds


def _outliers(r: Recipe, kind: str | None) -> int:
    """The outlier channels `r` keeps fp32 in the MatMuls of `kind` (None: a kind not named)."""
    return int(r.settings.get("outliers_by_kind", {}).get(kind, r.settings.get("outliers", 0)))


def at_least_as_precise(a: Recipe, b: Recipe) -> bool:
    """Whether `a` computes every MatMul at least as precisely as `b`: both w8a8 and alike but for
    precision, weights of at least as many bits, and for each MatMul kind either fp32 in `a` or,
    in both int8, at least as many outlier channels in `a` (the top-k channel lists are nested,
    and masking more of them leaves a finer per-token step for the rest). A heuristic over a deep
    network, not a bound: `select.choose` skips `b` once `a` has missed. Two `matmulnbits` recipes:
    the same bits and symmetry, blocks at most as wide in `a`, and `a`'s compute at least as
    precise (accuracy level 1, fp32 activations, or the same level)."""
    if a.method == b.method == "matmulnbits":
        sa, sb = a.settings, b.settings
        return (
            (sa["bits"], sa["symmetric"]) == (sb["bits"], sb["symmetric"])
            and sa["block_size"] <= sb["block_size"]
            and sa["accuracy_level"] in (1, sb["accuracy_level"])
        )
    if a.method != "w8a8" or b.method != "w8a8":
        return False
    if {k: v for k, v in a.settings.items() if k not in _PRECISION} != {
        k: v for k, v in b.settings.items() if k not in _PRECISION
    }:
        return False
    kept_a, kept_b = _kinds_kept(a), _kinds_kept(b)
    if kept_a is None or kept_b is None:  # other regexes: comparable only when the same
        if a.settings.get("keep") != b.settings.get("keep"):
            return False
        kept_a = kept_b = set()
    if a.settings.get("weight_bits", 8) < b.settings.get("weight_bits", 8):
        return False
    kinds = set(a.settings.get("outliers_by_kind", {})) | set(b.settings.get("outliers_by_kind", {})) | kept_a | kept_b
    for kind in [*kinds, None]:  # None: every kind not named
        if kind in kept_a:
            continue
        if kind in kept_b or _outliers(a, kind) < _outliers(b, kind):
            return False
    return True


def more_precise(a: Recipe, b: Recipe) -> bool:
    return at_least_as_precise(a, b) and not at_least_as_precise(b, a)
