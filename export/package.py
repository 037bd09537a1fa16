"""Building a package atomically: export, quantize, verify, manifest, rename.

Everything is written into a sibling directory `PKG.partial-<pid>`; `embedder.json` is written last,
after every variant passed verification, and only then is the directory renamed to `PKG`. On any
failure the partial directory is removed, so nothing that looks complete is left behind.

Memory does not grow with the model (export/stream.py): the PyTorch reference loads one decoder
layer at a time, the graphs are traced without weights, every weight is read from the checkpoint
and appended to each variant's data file (quantized per tensor for int8, which never needs the fp32
graph written), and ONNX Runtime runs the fp32 reference of the int8 selection and verifies each
variant one layer-sized segment at a time.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoTokenizer

from . import export, family, manifest, samples, stream, verify
from .int8.calibrate import Fp32Model
from .int8.select import choose
from .ortrun.batch import last_token, right_padded

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "fp16", "int8")
DEFAULT_VARIANTS = ("fp32", "fp16", "int8")
DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
QUANTIZED = ("int8",)  # quantized from the checkpoint, recipe chosen per model (int8.select.choose)
FP16_LONG_INPUT = 4096


class ExportError(RuntimeError):
    pass


@dataclass
class Options:
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    revision: str | None = None
    force: bool = False
    # Max tokens of a query and of a document (None: the family's, models/<family>.toml).
    max_length: int | None = None
    # models/<family>.toml (None: detected, export/family.py).
    family: str | None = None
    source_id: str | None = None
    thresholds: dict[str, float] = field(default_factory=lambda: dict(verify.THRESHOLDS))
    threads: int = 2
    # int8 recipes to choose from, fastest first (None: int8.recipes.CANDIDATES).
    int8_recipes: list[str] | None = None


def resolve(model: str, revision: str | None) -> tuple[Path, str | None]:
    """A local model directory, or a hub id downloaded with huggingface_hub (dir, resolved revision)."""
    path = Path(model)
    if path.is_dir():
        return path, revision
    if model.startswith(("/", ".", "~")) or path.exists():
        raise ExportError(f"{model} is not a model directory")
    local = Path(snapshot_download(model, revision=revision))
    return local, local.name  # the snapshot directory is named after the commit


def partial_dir(out: Path) -> Path:
    return out.with_name(f"{out.name}.partial-{os.getpid()}")


def build_package(model: str, out: Path, opts: Options) -> dict:
    """Export `model` into the package directory `out`; returns the manifest."""
    unknown = [v for v in opts.variants if v not in VARIANTS]
    if unknown or not opts.variants:
        raise ExportError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if out.exists() and not opts.force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    model_dir, revision = resolve(model, opts.revision)
    tmp = partial_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        result = _build(model, model_dir, revision, tmp, opts)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("package written to %s; peak RSS %.2f GiB", out, peak_rss_gib())
    return result


def _build(model: str, model_dir: Path, revision: str | None, tmp: Path, opts: Options) -> dict:
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json")
    shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    try:
        fam = family.resolve(opts.family, config, tokenizer)
    except ValueError as e:
        raise ExportError(str(e)) from e
    max_length = (
        {"query": opts.max_length, "document": opts.max_length} if opts.max_length is not None else fam.max_length
    )
    length = min(max_length["document"], samples.SAMPLE_MAX_LENGTH)
    log.info("family %s (prompt procedure %s), max length %s", fam.name, fam.procedure, max_length)
    rows = [s.ids for s in samples.samples(tokenizer, length, fam)]
    pad_id = manifest.pad_token(tokenizer)[1]
    batch = right_padded(rows, pad_id)
    log.info("%d sample texts, %d to %d tokens", len(rows), min(map(len, rows)), max(map(len, rows)))

    checkpoint = stream.Checkpoint(model_dir)
    architecture = type(stream.meta_model(config)).__name__
    if architecture not in export.SUPPORTED:
        raise ExportError(f"{model_dir} loads as {architecture}; supported: {', '.join(sorted(export.SUPPORTED))}")
    start = time.perf_counter()
    reference = last_token(stream.reference_hidden(model_dir, config, checkpoint, batch), batch.attention_mask)
    log.info(
        "PyTorch fp32 reference (one layer at a time) in %.1f s (peak RSS so far %.2f GiB)",
        time.perf_counter() - start,
        peak_rss_gib(),
    )
    fp32 = _write_graphs(config, checkpoint, tmp, opts)
    cache_rows = samples.prefix_sharing(tokenizer, length, fam)
    entries = {}
    for name in opts.variants:
        entries[name] = _finish_variant(name, tmp, opts, batch, reference, tokenizer, cache_rows, fp32, fam, length)

    _readable(tmp)
    source = {
        "model": opts.source_id or model,
        "revision": revision,
        "model_type": config.model_type,
        "architecture": architecture,
    }
    result = manifest.build(config, tokenizer, tmp, source, fam, max_length, entries)
    manifest.write(tmp, result)
    return result


def _write_graphs(config, checkpoint: stream.Checkpoint, tmp: Path, opts: Options) -> Fp32Model | None:
    """Trace the weightless decoder once per dtype, then stream the checkpoint's weights into the
    fp32 and fp16 graphs asked for at once: fp32 as read, fp16 cast. Returns, when int8 is asked
    for, the fp32 model it is chosen against and quantized from (`int8.select.choose`): the traced
    fp32 graph with its weights read from the checkpoint, so that int8 never needs the fp32 graph
    written (28.5 GB at bge-en-icl's size)."""
    graphs, fp32 = {}, None
    if "fp32" in opts.variants or any(v in QUANTIZED for v in opts.variants):
        traced = _timed("trace fp32", stream.trace, stream.skeleton(config, torch.float32), torch.float32)
        if any(v in QUANTIZED for v in opts.variants):
            fp32 = Fp32Model.from_checkpoint(traced, checkpoint)
        if "fp32" in opts.variants:
            graphs["fp32"] = traced
    if "fp16" in opts.variants:
        graphs["fp16"] = _timed("trace fp16", stream.trace, stream.skeleton(config, torch.float16), torch.float16)
    gc.collect()
    if not graphs:
        return fp32
    paths = {name: tmp / name / "model.onnx" for name in graphs}
    count = [0]

    def progress(param: str) -> None:
        count[0] += 1
        if count[0] % 50 == 0:
            log.info("wrote %d weights (at %s; peak RSS so far %.2f GiB)", count[0], param, peak_rss_gib())

    _timed(f"write {', '.join(graphs)}", stream.write_variants, checkpoint, graphs, paths, progress)
    return fp32


def _finish_variant(
    name: str,
    tmp: Path,
    opts: Options,
    batch,
    reference,
    tokenizer,
    cache_rows,
    fp32: Fp32Model | None,
    fam: family.Family,
    length: int,
) -> dict:
    quantization = None
    if name in QUANTIZED:
        quantization = _timed(
            f"quantize {name}",
            functools.partial(choose, family=fam),
            fp32,
            tmp / name / "model.onnx",
            tokenizer,
            opts.int8_recipes,
            opts.threads,
            length,
        )
    long_input = samples.long_ids(tokenizer, FP16_LONG_INPUT) if name == "fp16" else None
    start_states = verify.start_of(tmp / name / "model.onnx", quantization)
    start = time.perf_counter()
    try:
        parity = verify.verify_variant(
            name,
            tmp / name / "model.onnx",
            batch,
            reference,
            opts.thresholds[name],
            long_input,
            opts.threads,
            cache_rows,
            start_states,
        )
    except verify.VerificationError as e:
        raise ExportError(str(e)) from e
    log.info("verify %s in %.1f s (peak RSS so far %.2f GiB)", name, time.perf_counter() - start, peak_rss_gib())
    gc.collect()
    return manifest.variant_entry(
        tmp, name, DTYPES[name], quantization, parity, start_states[0] if start_states else None
    )


def _readable(tmp: Path) -> None:
    """Some writers (onnx's external data) create 0600 files; a package is meant to be shared."""
    for path in tmp.rglob("*"):
        if path.is_file():
            path.chmod(0o644)


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished directory into place; an existing `out` (only with --force) goes last."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def _timed(what: str, fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    log.info("%s in %.1f s (peak RSS so far %.2f GiB)", what, time.perf_counter() - start, peak_rss_gib())
    return result


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
