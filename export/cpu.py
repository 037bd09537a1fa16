"""What this x86-64 CPU offers int8 GEMM, read with the CPUID instruction as ONNX Runtime's MLAS and
the runtime (`src/backend/runtime.rs`, Rust's `is_x86_feature_detected!`) read it, so that the exporter's
sessions compute int8 the way the runtime will on the same CPU.

ONNX Runtime's u8 x s8 kernel without VNNI sums pairs of products in int16 and saturates on
full-range int8 weights; `session.x64quantprecision=1` makes it rewrite the weights to u8 at load
and run its exact u8 x u8 kernel instead. The runtime sets it where the CPU lacks VNNI (AVX-512
VNNI or AVX-VNNI), and so does `session_options` here.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform

import onnxruntime as ort

X64_QUANT_PRECISION = "session.x64quantprecision"

# cpuid(leaf, subleaf, out[4]) in x86-64 System V machine code: push rbx; mov r8, rdx; mov eax, edi;
# mov ecx, esi; cpuid; mov [r8], eax; mov [r8+4], ebx; mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3")


@functools.cache
def _cpuid_function():
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(_CPUID_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))(address)
    return fn, buf  # the buffer must outlive the function


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """(eax, ebx, ecx, edx) of CPUID; x86-64 only."""
    fn, _ = _cpuid_function()
    out = (ctypes.c_uint32 * 4)()
    fn(leaf, subleaf, ctypes.byref(out))
    return tuple(out)


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.cache
def features() -> frozenset[str]:
    """{"avx2", "avx512vnni", "avxvnni"} as far as this CPU has them (empty off x86-64)."""
    if not _x86_64():
        return frozenset()
    try:
        top = cpuid(0)[0]
        if top < 7:
            return frozenset()
        subleaves, ebx7, ecx7, _ = cpuid(7, 0)
        eax7_1 = cpuid(7, 1)[0] if subleaves >= 1 else 0
    except (OSError, ValueError):  # no executable anonymous memory: fall back to the kernel's list
        flags = next((line.split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
        return frozenset(f.replace("_", "") for f in flags if f in ("avx2", "avx512_vnni", "avx_vnni"))
    found = set()
    if ebx7 & (1 << 5):
        found.add("avx2")
    if ecx7 & (1 << 11) and ebx7 & (1 << 16):
        found.add("avx512vnni")
    if eax7_1 & (1 << 4):
        found.add("avxvnni")
    return frozenset(found)


def has_vnni() -> bool:
    return bool(features() & {"avx512vnni", "avxvnni"})


def needs_quant_precision() -> bool:
    """x86-64 without VNNI: ONNX Runtime's u8 x s8 GEMM must be made exact (as src/backend/runtime.rs)."""
    return _x86_64() and not has_vnni()


def cpu_class() -> str:
    """The instruction sets that decide int8 speed on this machine, in words (as src/backend/runtime.rs)."""
    if not _x86_64():
        return "other"
    if has_vnni():
        return "x86-64 with VNNI"
    return "x86-64 AVX2 without VNNI" if "avx2" in features() else "other"


def session_options(threads: int = 2):
    """ONNX Runtime CPU session options as the runtime sets them: threads, and exact int8 on CPUs
    without VNNI."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if needs_quant_precision():
        opts.add_session_config_entry(X64_QUANT_PRECISION, "1")
    return opts
