"""Pick the device and numeric precision once, the same way for train, generate and bench."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

from minigpt_cli.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' prefers CUDA, then Apple MPS, then CPU; an unavailable choice is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{name}': use auto, cpu, cuda or mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for but no CUDA GPU is available; "
                        "use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPUs that support it, float32 elsewhere (CPU bf16 is slower here)."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype '{name}': use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def cpu_bf16_flags() -> list[str]:
    """The CPU's native bfloat16 features (Linux /proc/cpuinfo): AVX-512 BF16 or AMX."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")),
                     "").split())
    return sorted(flags & {"avx512_bf16", "amx_bf16"})


# The smallest shapes at which a CPU's native bf16 step beat float32's, as (n_embd, block_size):
# a width of 256 at any context, or 128 at a context of 256 (benchmarks/train_dtype.py,
# docs/benchmarks.md "Training precision"). Below them bf16's conversions cost more than its
# products save.
BF16_MIN_SHAPES = ((256, 0), (128, 256))


def bf16_pays_off(n_embd: int, block_size: int) -> bool:
    """Whether a model of this width and context trains faster in bf16 on a CPU with native bf16
    (a rule measured once and written down, so every start of the same config agrees)."""
    return any(n_embd >= w and block_size >= t for w, t in BF16_MIN_SHAPES)


def train_dtype(name: str, device: torch.device, n_embd: int, block_size: int
                ) -> tuple[torch.dtype, str]:
    """The training precision and why. 'auto' on a CPU is decided from the CPU's features and
    the model's shape alone, never by timing at start: a timing probe flips with the machine's
    load, and a run's precision decides its result (bf16 products also reduce in an order that
    depends on the thread count). bf16 autocast is picked when the CPU has native bf16 and the
    model is at least one of the measured BF16_MIN_SHAPES."""
    dtype = resolve_dtype(name, device)
    if name != "auto":
        return dtype, "as configured"
    if device.type != "cpu":
        return dtype, f"auto on {device.type}"
    flags = cpu_bf16_flags()
    if not flags:
        return torch.float32, "auto: this CPU has no native bf16 (no avx512_bf16 or amx_bf16)"
    shape = f"width {n_embd}, context {block_size}"
    if bf16_pays_off(n_embd, block_size):
        return torch.bfloat16, f"auto: {'/'.join(flags)} and {shape}, where bf16 trains faster"
    return torch.float32, (f"auto: {'/'.join(flags)}, but at {shape} bf16 trains no faster "
                           "(it pays from width 256, or 128 at context 256)")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for matmuls while weights and optimizer state stay float32."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock timing measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
               "MALLOC_TOP_PAD_")


def keep_freed_memory() -> str:
    """Make glibc keep freed memory for reuse instead of handing it back to the system.

    Why: glibc serves every block of 32 MiB or more with its own mmap and unmaps it when it is
    freed, so a training step that makes such tensors (the logits and their gradient once
    tokens x vocab reach 8M floats) page-faults them in again, zeroed, every step. Measured
    through `minigpt train` on 2 cores (benchmarks/train_malloc.py, docs/benchmarks.md §2):
    1.15x tokens/s at batch 16 on tiny.yaml, 1.59x with GPT-2's 50,257-token vocabulary. With
    mmap off and no trimming, the heap keeps its peak and the faults stop; the process holds
    its peak memory until it exits. A user who sets glibc's own MALLOC_* variables (or its
    malloc tunables) keeps their policy. Returns what was done, for the run header."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return ""
    if (any(os.environ.get(k) for k in _MALLOC_ENV)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return "glibc malloc as the environment sets it"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        return ""
    return "freed memory kept for reuse (glibc mallopt)" if ok else ""
