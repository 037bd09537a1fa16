"""One weight at a time: an fp32 `[in, out]` MatMul weight as a recipe's initializers, needing
nothing but that weight (and the static outlier channel list of its input), so that a model is
quantized one tensor at a time (`rewrite`)."""

from __future__ import annotations

import numpy as np
from onnxruntime.capi._pybind_state import quantize_matmul_8bits


def quantize_matmul_weight(w: np.ndarray, outliers: np.ndarray | None = None, bits: int = 8) -> dict[str, np.ndarray]:
    """One fp32 `[in, out]` MatMul weight as the int8 recipe's initializers.

    Returns `q` (int8 `[in, out]`, symmetric per output column, range -127..127, the rows of
    `outliers` set to 0), `scale` (float32 `[out]`: w ~= q * scale) and, when `outliers` (int64
    input-channel indexes) is given and not empty, `outlier_rows` (float32 `[k, out]`: those rows
    of `w`, exact). The scale is taken over the other rows only. Needs nothing but this weight and
    its channel list, so an exporter can stream the model through it one tensor at a time.
    """
    if w.ndim != 2 or w.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 weight, got {w.dtype} {w.shape}")
    out: dict[str, np.ndarray] = {}
    if outliers is not None and len(outliers):
        outliers = np.asarray(outliers, dtype=np.int64)
        out["outlier_rows"] = np.ascontiguousarray(w[outliers])
        w = w.copy()
        w[outliers] = 0.0
    top = float(2 ** (bits - 1) - 1)  # 127, or 63 for 7-bit weights
    scale = (np.abs(w).max(axis=0) / top).astype(np.float32)
    scale[scale == 0] = 1.0
    out["q"] = np.clip(np.rint(w / scale), -top, top).astype(np.int8)
    out["scale"] = scale
    return out


def outlier_channels(channel_max: np.ndarray, k: int) -> np.ndarray:
    """The `k` input channels with the largest calibrated max |x|, ascending."""
    k = min(k, channel_max.shape[0])
    return np.sort(np.argsort(-channel_max, kind="stable")[:k]).astype(np.int64)


def quantize_nbits_weight(w: np.ndarray, s: dict, zero_points: bool = False) -> tuple[np.ndarray, ...]:
    """One fp32 `[K, N]` MatMul weight as `MatMulNBits`' `B` (uint8 `[N, K / block, block]`) and
    scales (`[N, K / block]`), by ONNX Runtime's own kernel (`quantize_matmul_8bits`, what its
    `MatMulNBitsQuantizer` calls for each weight), so the bytes are the quantizer's. With
    `zero_points`, also the zero points (uint8 `[N, K / block]`: 128 when symmetric, the block's own
    otherwise, which `MatMulNBits` takes as its fourth input)."""
    if s["bits"] != 8:
        raise ValueError(f"MatMulNBits recipes take 8-bit weights, not {s}")
    if w.ndim != 2 or w.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 weight, got {w.dtype} {w.shape}")
    k, n = w.shape
    block = int(s["block_size"])
    blocks = (k + block - 1) // block
    if blocks * block != k:
        w = np.pad(w, ((0, blocks * block - k), (0, 0)))
    packed = np.zeros((n, blocks, block), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zps = np.zeros((n, blocks), dtype=np.uint8)
    symmetric = bool(s["symmetric"])
    quantize_matmul_8bits(packed, np.ascontiguousarray(w), scales, zps, block, n, blocks * block, symmetric)
    if zero_points:
        return packed, scales, zps
    if not symmetric:
        raise ValueError("asymmetric MatMulNBits weights need their zero points (zero_points=True)")
    return packed, scales


def quantize_embedding_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The token embedding table `[vocab, hidden]` as int8 rows (-127..127) and one fp32 scale per
    row (`[vocab]`: row ~= q * scale)."""
    scale = (np.abs(table).max(axis=1) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale
