"""One int8 product through the C library, build against build: this tree's library compiled
for the machine (-march=native: AVX-512 VNNI where the CPU has it) and for AVX2 alone
(-march=x86-64-v3), and, with `--before REV` (repeatable), the same two builds of the library
as it was at commit REV, each called as its ABI version wants: up to 8, int8 weights widened
to float in registers and float32 inputs; 9, int8 x int8 with float32 scales; from 10, the
scales float16.

Each round times every build in turn, `--repeats` calls of `minigpt_product` on a 768 x 3,072
matrix (GPT-2's MLP) at 1, 8 and 64 rows, 2 threads; the median per build and row count is
printed in µs per product.

    python benchmarks/int8_product.py [--rounds 5] [--bits 8|4] [--before 5e2c7fa]
        [--before f02cdae]
"""

from __future__ import annotations

import argparse
import ctypes
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from minigpt_cli.inference import native
from minigpt_cli.model.int8 import dequantize, quantize, quantize4

SOURCE = Path(native.__file__).with_name("decode_step.c")
TARGETS = {"native": "-march=native", "avx2": "-march=x86-64-v3"}


def _build(source: Path, march: str, out: Path) -> ctypes.CDLL:
    subprocess.run(["gcc", "-O3", march, "-fopenmp", "-fPIC", "-shared", "-std=c11",
                    "-ffp-contract=fast", str(source), "-o", str(out), "-lm"], check=True)
    return ctypes.CDLL(str(out))


def _abi(source: Path) -> int:
    """The ABI version a library's source returns."""
    return int(re.search(r"minigpt_abi_version\(void\) \{ return (\d+);", source.read_text())[1])


def _caller(lib: ctypes.CDLL, abi: int, q: torch.Tensor, scales: torch.Tensor, bits: int):
    """A function of (x, y) running one product with this build's packing and arguments."""
    lib.minigpt_product.restype = ctypes.c_int
    strip = lib.minigpt_strip()
    deq = dequantize(q, scales)
    if abi >= 9:  # quads of w + 128 (or int4's nibbles), and the number of bits
        packed, s = (native.pack_q4 if bits == 4 else native.pack_q8)(q, scales, strip)
        s = s if abi >= 10 else s.float()
        lib.minigpt_product.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
                                        + [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int])
        head = (packed.data_ptr(), bits, s.data_ptr())
    else:  # int8 strips [n_in][strip] and their scales
        packed, s = native.pack_strips(q, strip), native.pack_strips(scales, strip)
        lib.minigpt_product.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 7 + [ctypes.c_int]
        head = (packed.data_ptr(), s.data_ptr())
    keep = (packed, s, deq)

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        assert keep  # the packed tensors live as long as the caller
        rc = lib.minigpt_product(len(x), q.shape[0], q.shape[1], x.data_ptr(), None, *head,
                                 deq.data_ptr(), None, y.data_ptr(), 2)
        assert rc == 0

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--bits", type=int, choices=(8, 4), default=8,
                    help="int8, or int4 (Q4_0's weights; libraries from ABI 9 on)")
    ap.add_argument("--before", action="append", default=[],
                    help="also time the library as it was at this commit (repeatable)")
    args = ap.parse_args()
    torch.manual_seed(0)
    q, scales = (quantize4 if args.bits == 4 else quantize)(torch.randn(768, 3072))
    tmp = Path(tempfile.mkdtemp())
    sources = {"": SOURCE}
    for rev in args.before:
        old = tmp / f"{rev}.c"
        old.write_text(subprocess.run(["git", "show", f"{rev}:minigpt_cli/inference/"
                                       "native/decode_step.c"], check=True, capture_output=True,
                                      text=True, cwd=SOURCE.parent).stdout)
        sources[f"{rev} "] = old
    builds = {}
    for tag, src in sources.items():
        for name, march in TARGETS.items():
            lib = _build(src, march, tmp / f"{tag.strip() or 'now'}-{name}.so")
            if args.bits == 8 or _abi(src) >= 9:
                builds[f"{tag}{name}"] = _caller(lib, _abi(src), q, scales, args.bits)
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for rows in (1, 8, 64):
            x, y = torch.randn(rows, 768), torch.empty(rows, 3072)
            for name, run in builds.items():
                for _ in range(20):  # warm-up
                    run(x, y)
                began = time.perf_counter()
                for _ in range(args.repeats):
                    run(x, y)
                times.setdefault((name, rows), []).append(
                    (time.perf_counter() - began) / args.repeats * 1e6)
    print(f"{'build':24s} {'1 row':>10s} {'8 rows':>10s} {'64 rows':>10s}   µs per product, "
          f"median [min-max] of {args.rounds} rounds")
    for name in builds:
        cells = [times[(name, r)] for r in (1, 8, 64)]
        print(f"{name:24s} " + " ".join(f"{statistics.median(c):10.1f}" for c in cells) + "   "
              + "  ".join(f"[{min(c):.0f}-{max(c):.0f}]" for c in cells))


if __name__ == "__main__":
    main()
