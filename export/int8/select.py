"""Choosing the int8 recipe per model (`choose`, what the exporter calls): the fastest recipe of
`RECIPES` whose last-token embeddings on the calibration texts meet `FIDELITY` against the fp32
graph; and rebuilding a package's int8 variant with it (`add_int8`, `python -m export.int8`).

A candidate runs one layer at a time, the shortest texts first, and stops as soon as it can no
longer meet `FIDELITY` (`measure_candidate`), so the recipes that miss cost little more than their
writing. Start states: when the tokenizer puts the same ids before every text (bge-en-icl's
`<s>`), their key/value states are constants; `choose` computes them with the fp32 graph, writes
them beside the int8 graph (`START_FILE`, FORMAT.md `start_states`) and measures the candidates
running on top of them, as the runtime does: position 0, where a trained model keeps its huge
attention-sink activations, is never quantized. The manifest records the recipe and what every
tried recipe measured.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from .. import family, manifest, samples, verify
from ..cpu import cpu_class
from ..manifest import START_FILE
from ..ortrun.batch import last_token, right_padded
from ..ortrun.batched import batched, embed_segmented
from ..ortrun.segmented import SegmentedGraph
from ..ortrun.session import onnx_hidden, session
from ..samples import SAMPLE_MAX_LENGTH
from .calibrate import CALIBRATION, SHORT_TEXTS, Fp32Measure, Fp32Model, calibration_rows
from .recipes import CANDIDATES, RECIPES, at_least_as_precise, more_precise

log = logging.getLogger(__name__)

# The int8 variant must meet both on the calibration texts (the export's sample check stays at
# verify.THRESHOLDS["int8"]).
FIDELITY = {"min_cosine": 0.99, "mean_cosine": 0.999}
# The weight-only recipe (`nbits8-acc1`, asked for by name) expands its weights on every run, so it
# runs the calibration texts in batches of this many padded tokens (slice7b: 52 s against 260 s alone). 1024 rather than 4096:
# at 8 layers 87 s against 126 s, and 1.2 GiB of activations against 2.1 (less padding, smaller
# attention scores). The other candidates have no per-run cost and run each text alone: batched,
# the padding made them 1.3x slower (smollm2: 12.3 s against 9.2 s).
SELECTION_BATCH_TOKENS = 1024
# A candidate runs these shortest calibration texts first, and the others only if it can still
# meet the thresholds after them (`measure_candidate`).
FIRST_ROUND = 8


def fidelity(reference: np.ndarray, embeddings: np.ndarray, rows: list[list[int]]) -> dict:
    return _figures(np.sum(reference * embeddings, axis=1), rows)


def _figures(cos: np.ndarray, rows: list[list[int]]) -> dict:
    worst = int(np.argmin(cos))
    return {
        "texts": len(rows),
        "min_cosine": round(float(cos.min()), 6),
        "mean_cosine": round(float(cos.mean()), 6),
        "worst_tokens": len(rows[worst]),
    }


def _can_meet(cos: np.ndarray, thresholds: dict) -> bool:
    """Whether the rows still to run (NaN) could bring `cos` up to `thresholds`, each at best 1.0."""
    done = ~np.isnan(cos)
    best_mean = (cos[done].sum() + (~done).sum()) / len(cos)
    return cos[done].min() >= thresholds["min_cosine"] and best_mean >= thresholds["mean_cosine"]


def measure_candidate(
    graph: Path,
    rows: list[list[int]],
    reference: np.ndarray,
    threads: int = 2,
    start: tuple[list[int], dict] | None = None,
    batch_tokens: int = 0,
    thresholds: dict | None = None,
) -> dict:
    """`fidelity` of `graph` on `rows` against `reference`, and the seconds its pass took.

    The graph runs one layer at a time (`embed_segmented`): a candidate that keeps `down` fp32 is
    12.6 GB at bge-en-icl's depth, more than an export may hold (8 GiB). With `thresholds`, the
    `FIRST_ROUND` shortest texts run first and the rest only if the thresholds can still be met
    after them (a cosine under the minimum, or a mean that even perfect remaining texts would
    leave short, ends it): the figures are then those of the texts run, and `stopped` is true.
    One- and two-token inputs are where recipes fail, so most misses cost one short round."""
    segmented = SegmentedGraph(graph, threads)  # loaded and split once for both rounds
    if thresholds is None:
        rounds = [list(range(len(rows)))]
    else:
        order = [i for index, _, _ in batched(rows, start, batch_tokens) for i in index]
        rounds = [order[:FIRST_ROUND], order[FIRST_ROUND:]]
    cos = np.full(len(rows), np.nan)
    seconds, stopped = 0.0, False
    for index in [r for r in rounds if r]:
        embeddings, took = embed_segmented(segmented, [rows[i] for i in index], start, batch_tokens)
        cos[index] = np.sum(reference[index] * embeddings, axis=1)
        seconds += took
        if thresholds is not None and not _can_meet(cos, thresholds):
            stopped = bool(np.isnan(cos).any())
            break
    done = np.flatnonzero(~np.isnan(cos))
    fid = _figures(cos[done], [rows[i] for i in done])
    return {**fid, **({"stopped": True} if stopped else {}), "seconds": round(seconds, 2)}


def meets(fid: dict, thresholds: dict = FIDELITY) -> bool:
    return fid["min_cosine"] >= thresholds["min_cosine"] and fid["mean_cosine"] >= thresholds["mean_cosine"]


class _Selection:
    """The state of one `choose`: the fp32 model's measurement, what every candidate measured, the
    recipes skipped, and which recipe `dst` holds."""

    def __init__(
        self, fp32: Fp32Model, dst: Path, rows: list[list[int]], measured: Fp32Measure, threads: int, thresholds: dict
    ):
        self.fp32, self.dst, self.rows, self.measured = fp32, dst, rows, measured
        self.threads, self.thresholds = threads, thresholds
        self.tried: list[dict] = []
        self.skipped: dict[str, str] = {}  # recipe: the missed recipe at least as precise
        self.on_disk: str | None = None  # the recipe dst holds

    def attempt(self, name: str, final: bool = False) -> bool:
        """Write `dst` with recipe `name` and measure it; whether it is kept (it passed, or is `final`)."""
        recipe, measured, dst = RECIPES[name], self.measured, self.dst
        self.fp32.quantize(recipe, dst, measured.stats)
        self.on_disk = name
        batch_tokens = SELECTION_BATCH_TOKENS if recipe.kernel == "matmulnbits-fp32" else 0
        # The last candidate is taken whatever it measures, so its figures cover every text.
        fid = measure_candidate(
            dst,
            self.rows,
            measured.reference,
            self.threads,
            measured.start,
            batch_tokens,
            None if final else self.thresholds,
        )
        # One pass, on whatever else the machine runs: a speed class, not a benchmark.
        self.tried.append({"recipe": name, **fid})
        log.info(
            "int8 candidate %s: min cosine %.6f, mean %.6f on %d%s calibration texts (%.1f s)",
            name,
            fid["min_cosine"],
            fid["mean_cosine"],
            fid["texts"],
            f" of {len(self.rows)} (stopped: cannot meet the thresholds)" if fid.get("stopped") else "",
            fid["seconds"],
        )
        if meets(fid, self.thresholds) or final:
            return True
        for p in (dst, dst.with_name(dst.name + ".data")):
            p.unlink(missing_ok=True)
        self.on_disk = None
        return False

    def chosen(self, name: str) -> dict:
        """Leave `dst` (and its start states) written with `name`; the manifest's `quantization`."""
        measured = self.measured
        if self.on_disk != name:  # a probe that passed, overwritten by later candidates
            self.fp32.quantize(RECIPES[name], self.dst, measured.stats)
        if measured.start:
            verify.write_start_graph(self.dst.with_name(START_FILE), measured.start[1])
        fid = next(t for t in self.tried if t["recipe"] == name)
        return {
            **RECIPES[name].describe(),
            "selection": {
                "texts": f"{CALIBRATION.name} + {len(SHORT_TEXTS)} short texts",
                "cpu": cpu_class(),
                "threads": self.threads,
                "start_states": measured.start[0] if measured.start else None,
                "thresholds": dict(self.thresholds),
                "chosen": name,
                "faithful": meets(fid, self.thresholds),
                "tried": self.tried,
                "skipped": self.skipped,
            },
        }


def choose(
    fp32: Fp32Model,
    dst: Path,
    tokenizer,
    candidates: list[str] | None = None,
    threads: int = 2,
    max_length: int = 512,
    thresholds: dict = FIDELITY,
    family=None,
) -> dict:
    """Quantize `dst` with the first (fastest) recipe of `candidates` that is faithful on the
    calibration texts; returns the manifest's `quantization` field (the recipe and the selection).

    The last candidate is taken if none passes (the export's own parity check still applies).
    The most precise of the others (those no other candidate is more precise than,
    `at_least_as_precise`) are tried first, until one passes; then the others fastest first,
    skipping each that a candidate which missed is at least as precise as. So a model on which no
    fast recipe can pass costs two of them, not twelve (about 5 min each at bge-en-icl's depth),
    and one on which a fast recipe passes costs one more than in plain speed order.
    When every input begins with the same ids (a BOS), their states are computed in fp32, written
    beside `dst` as `START_FILE` and used in the measurement, as the runtime uses them: position 0,
    where a trained model keeps its huge attention-sink activations, is never quantized. The fp32
    model runs once, one layer at a time (`Fp32Model.measure`); each candidate is written from it
    tensor by tensor and run one layer at a time too, until it meets the thresholds or cannot any
    more (`measure_candidate`).
    """
    names = candidates or CANDIDATES
    if not names:
        raise ValueError("no int8 candidates")
    rows = calibration_rows(tokenizer, max_length, family)
    ids = verify.start_ids(tokenizer, fp32.input_names())
    measured = fp32.measure(rows, ids, threads)
    log.info("fp32 reference over %d calibration texts in %.1f s (one layer at a time)", len(rows), measured.seconds)
    dst.with_name(START_FILE).unlink(missing_ok=True)
    sel = _Selection(fp32, dst, rows, measured, threads, thresholds)

    fast, failed, probe = names[:-1], [], None
    ceilings = [n for n in fast if not any(more_precise(RECIPES[m], RECIPES[n]) for m in fast)]
    if len(ceilings) < len(fast):
        for name in ceilings:  # what these miss, the less precise recipes are taken to miss too
            if sel.attempt(name):
                probe = name  # passed
                break
            failed.append(name)
    for name in fast:
        if name == probe:
            return sel.chosen(name)
        if name in failed:
            continue
        above = next((f for f in failed if at_least_as_precise(RECIPES[f], RECIPES[name])), None)
        if above is not None:
            sel.skipped[name] = above  # a recipe at least as precise everywhere missed
            continue
        if sel.attempt(name):
            return sel.chosen(name)
        failed.append(name)
    sel.attempt(names[-1], final=True)
    quantization = sel.chosen(names[-1])
    if not quantization["selection"]["faithful"]:
        log.warning(
            "int8: no candidate met the thresholds (min cosine %s, mean %s); keeping the last, %s, "
            "recorded as not faithful (the runtime's --variant auto then prefers fp32)",
            thresholds["min_cosine"],
            thresholds["mean_cosine"],
            names[-1],
        )
    return quantization


def add_int8(model_dir: Path, package: Path, names: list[str], threads: int = 2) -> dict:
    """(Re)build `package`'s int8 variant from its fp32 graph with `choose` over `names`, check it
    against the fp32 graph on the export's samples and record it in `embedder.json`: a new int8
    recipe without exporting again. The parity reference is the fp32 graph, not PyTorch."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    meta = json.loads((package / "embedder.json").read_text(encoding="utf-8"))
    # Format 1 packages are all bge-en-icl's.
    fam = family.load(meta["source"].get("family", "bge-en-icl"))
    length = min(meta["max_length"]["document"], SAMPLE_MAX_LENGTH)
    fp32 = package / "fp32" / "model.onnx"
    dst = package / "int8" / "model.onnx"
    quantization = choose(Fp32Model.from_graph(fp32), dst, tokenizer, names, threads, length, family=fam)
    rows = [s.ids for s in samples.samples(tokenizer, length, fam)]
    batch = right_padded(rows, meta["special_tokens"]["pad_id"])
    reference = last_token(onnx_hidden(session(fp32, threads), batch), batch.attention_mask)
    start = verify.start_of(dst, quantization)
    parity = verify.verify_variant(
        "int8",
        dst,
        batch,
        reference,
        verify.THRESHOLDS["int8"],
        None,
        threads,
        samples.prefix_sharing(tokenizer, length, fam),
        start,
    )
    parity["reference"] = "fp32 graph"
    meta["variants"]["int8"] = manifest.variant_entry(
        package, "int8", "int8", quantization, parity, start[0] if start else None
    )
    manifest.write(package, meta)
    return meta["variants"]["int8"]
