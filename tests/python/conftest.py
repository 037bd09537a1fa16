"""Shared by the Python tests: the fixtures tests/fixtures.sh builds (named by `ICL_*` variables).

Without them a test builds what it needs itself, or skips when it cannot (the Rust binary). Under
`ICL_REQUIRE_FIXTURES=1` (tests/run.sh) a missing fixture fails the test instead: the suite then
runs on exactly what tests/fixtures.sh built, and a fixture that went missing cannot pass unseen.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

REQUIRED = bool(os.environ.get("ICL_REQUIRE_FIXTURES"))


def _require(ok: bool, why: str) -> None:
    if not ok:
        if REQUIRED:
            pytest.fail(f"{why} (ICL_REQUIRE_FIXTURES is set)")
        pytest.skip(why)


def _cached(env: str) -> Path | None:
    value = os.environ.get(env)
    if value:
        path = Path(value)
        if not path.exists():
            pytest.fail(f"{env}={value} does not exist")
        return path
    if REQUIRED:
        pytest.fail(f"{env} is not set (tests/fixtures.sh builds it; ICL_REQUIRE_FIXTURES is set)")
    return None


@pytest.fixture(scope="session")
def require() -> Callable[[bool, str], None]:
    """`require(ok, why)`: skips the test when not `ok`, or fails it under ICL_REQUIRE_FIXTURES."""
    return _require


@pytest.fixture(scope="session")
def cached() -> Callable[[str], Path | None]:
    """`cached(ENV)`: the fixture directory that ENV names, or None when ENV is unset (the test then
    builds its own); under ICL_REQUIRE_FIXTURES an unset ENV fails the test. A named directory that
    does not exist always fails."""
    return _cached


@pytest.fixture(scope="session")
def require_module() -> Callable[[str], object]:
    """`require_module(name)`: `pytest.importorskip`, except that a missing module fails the test
    under ICL_REQUIRE_FIXTURES (every module the tests use is pinned in a requirements file)."""

    def get(name: str):
        if REQUIRED:
            return importlib.import_module(name)
        return pytest.importorskip(name)

    return get


BIN = Path(__file__).resolve().parents[2] / "target" / "debug" / "icl-embed"


@pytest.fixture(scope="session")
def tiny_cli(require) -> Path:
    """The tiny package (ICL_TINY_PKG), for tests that also run the CLI (target/debug/icl-embed)."""
    require(bool(os.environ.get("ICL_TINY_PKG")), "ICL_TINY_PKG is not set (tests/run.sh builds the fixtures)")
    require(BIN.exists(), f"{BIN} is not built (cargo build)")
    return Path(os.environ["ICL_TINY_PKG"])


@pytest.fixture(scope="session")
def cli_embed() -> Callable[..., object]:
    """`cli_embed(package, texts, tmp, variant, *flags)`: the CLI's embeddings of `texts` (JSON lines in,
    `.npy` out, on the CPU with 1 thread), as a numpy array."""
    import json  # noqa: PLC0415  (only the CLI tests need these)
    import subprocess  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    def run(package: Path, texts: list[str], tmp: Path, variant: str = "fp32", *flags) -> np.ndarray:
        src, out = tmp / "cli-in.jsonl", tmp / "cli-out.npy"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        args = [BIN, "embed", "-q", "--model", package, "--input", src, "--output", out]
        subprocess.run([*args, "--variant", variant, "--device", "cpu", "--threads", "1", *flags], check=True)
        return np.load(out)

    return run


@pytest.fixture(scope="session")
def min_cosine() -> Callable[..., float]:
    """`min_cosine(a, b)`: the smallest cosine between the rows of two arrays of one shape."""

    def cosine(a, b) -> float:
        assert a.shape == b.shape, (a.shape, b.shape)
        dots = (a * b).sum(axis=1)
        norms = (a * a).sum(axis=1) ** 0.5 * (b * b).sum(axis=1) ** 0.5
        return float((dots / norms).min())

    return cosine
