"""The exporter's peak memory does not grow with the model's depth (issue 12).

The same scaled-down bge-en-icl (width 1024, MLP 4096, 16/4 heads: 58 MB of fp32 weights per
layer, the real vocabulary) exported at 2 and at 8 layers, fp32 and int8 (fp32 is the variant with
the largest weights, int8 the one quantized per tensor): the two peak RSS figures must be less than
two layers' weights apart. An exporter that held the model, or one variant's graph, would differ by
at least six layers' weights (the old one: about 3 x 6 x 58 MB). It found two leaks, each a few
hundred MiB per layer (ONNX Runtime arenas of the verification sessions, glibc heaps under the
layer-by-layer reference; export/README.md). About 10 to 20 minutes on 2 busy cores. The full-depth
run itself is too big for CI; export/README.md gives its commands and figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from export import standins

ROOT = Path(__file__).resolve().parents[2]

WIDTH, MLP, HEADS, KV_HEADS, HEAD_DIM = 1024, 4096, 16, 4, 64
LAYER_BYTES = 4 * (2 * WIDTH * HEADS * HEAD_DIM + 2 * WIDTH * KV_HEADS * HEAD_DIM + 3 * WIDTH * MLP + 2 * WIDTH)

# Runs the exporter in this (child) process and prints its own peak RSS in KiB on the last line.
MEASURE = """
import resource, sys
from export.__main__ import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def build(out: Path, layers: int) -> Path:
    out.mkdir(parents=True)
    config = standins.mistral_config(layers, WIDTH, MLP, HEADS, KV_HEADS, HEAD_DIM)
    standins.build_mistral(out, config, seed=0, style="converted")
    return out


def peak_export_kib(model: Path, out: Path) -> int:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, "--model", str(model), "--out", str(out), "--variants", "fp32,int8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "embedder.json").is_file()
    return int(result.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_depth(tmp_path):
    peaks = {}
    for layers in (2, 8):
        model = build(tmp_path / f"model{layers}", layers)
        weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        assert weights > layers * LAYER_BYTES, "the stand-in holds every layer's weights"
        peaks[layers] = peak_export_kib(model, tmp_path / f"pkg{layers}") * 1024
    grew = peaks[8] - peaks[2]
    assert grew < 2 * LAYER_BYTES, (
        f"peak RSS {peaks[2] / 2**20:.0f} MiB at 2 layers, {peaks[8] / 2**20:.0f} MiB at 8: grew by "
        f"{grew / 2**20:.0f} MiB, two layers' weights are {2 * LAYER_BYTES / 2**20:.0f} MiB"
    )
