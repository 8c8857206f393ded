"""The fused CPU decode step (native/decode_step.c): build it once, bind it, call it.

A cached decode step of a small model is ~60 tiny operations, and eager PyTorch spends more
time dispatching them than computing; for a large model, PyTorch's batch-1 matrix-vector
product runs on one core. The C step does a whole step in one call, with every product split
over the cores, for up to 64 rows at once (each row one token of one sequence, in its own
cache slot), which also carries prompts (chunked prefill). It is an inference-only fast path
for float32 on the CPU. Training, the uncached loop, echo-with-logprobs scoring and every other
device stay in PyTorch, and the two must agree (tests/inference/test_native.py,
tests/inference/test_engine.py, and `minigpt bench`'s ✓ column).

The library is compiled on first use with the system C compiler (`$CC`, else `cc`) into the
user cache directory, keyed by a hash of the source, the flags and the CPU, and written
atomically so concurrent first uses are safe. Without a compiler, `engine="auto"` quietly uses
PyTorch and `engine="native"` is a clear error.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from minigpt_cli.errors import UserError
from minigpt_cli.model.gpt import GPT, KVCache
from minigpt_cli.model.int8 import GROUP
from minigpt_cli.model.layers import MLPS, mlp_hidden

SOURCE = Path(__file__).with_name("decode_step.c")  # beside this binding
ABI_VERSION = 10
ENGINES = ("auto", "native", "torch")
# -march=native is safe because the library is built on the machine that runs it (the cache
# key includes the CPU). No -ffast-math: NaNs and infinities must behave as in PyTorch. FMA
# contraction on (ISO C mode turns it off): one rounding per weight, the same in every lane.
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-ffp-contract=fast"]


def cache_dir() -> Path:
    """Where built libraries live: $MINIGPT_CACHE_DIR, else $XDG_CACHE_HOME/minigpt."""
    if os.environ.get("MINIGPT_CACHE_DIR"):
        return Path(os.environ["MINIGPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minigpt"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _compile(out: Path) -> None:
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or
                                                         shutil.which("gcc") or ""]
    if not compiler[0]:
        raise RuntimeError("no C compiler found (install gcc or clang, or set CC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        # OpenMP splits the matrix-vector products over cores; a compiler without it still
        # builds a correct single-threaded library, and one without -march=native a portable
        # one.
        portable = [f for f in FLAGS if f != "-march=native"]
        for flags in ([*FLAGS, "-fopenmp"], [*FLAGS, "-fopenmp-simd"], FLAGS, portable):
            cmd = [*compiler, *flags, str(SOURCE), "-o", tmp, "-lm"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except OSError as exc:
                raise RuntimeError(f"the C compiler {compiler[0]} could not run: "
                                   f"{exc.strerror}") from None
            if done.returncode == 0:
                os.replace(tmp, out)
                return
        raise RuntimeError(f"compiling {SOURCE.name} failed: {done.stderr.strip()[:300]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | str:
    """The bound library, or the reason it is unavailable (a string). Built at most once."""
    if platform.system() == "Windows":
        return "the native decode step is built for Linux and macOS only"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_id().encode()).hexdigest()
    path = cache_dir() / "native" / f"decode_step-{key[:16]}.so"
    try:
        if not path.exists():
            _compile(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return str(exc)
    if lib.minigpt_abi_version() != ABI_VERSION:
        return f"{path} has an unexpected ABI version; delete it to rebuild"
    lib.minigpt_decode_step.restype = ctypes.c_int
    lib.minigpt_decode_step.argtypes = [ctypes.c_void_p] * 16
    lib.minigpt_product.restype = ctypes.c_int
    lib.minigpt_product.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
                                    + [ctypes.c_void_p] * 4 + [ctypes.c_int])
    return lib


def unsupported(model: GPT) -> str | None:
    """Why the native step can't run this model, or None if it can."""
    p = next(model.parameters())
    if p.device.type != "cpu":
        return f"the native step runs on the CPU, the model is on {p.device.type}"
    if p.dtype != torch.float32:
        dtype = str(p.dtype).removeprefix("torch.")
        return f"the native step is float32 only, the model is {dtype}"
    if model.training:
        return "the native step is for inference; the model is in training mode"
    lib = load_library()
    if isinstance(lib, str):
        return lib
    return None


def check_engine_name(engine: str) -> None:
    """Refuse an unknown --engine before any model is built or anything printed."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}': use auto, native or torch")


def choose_engine(engine: str, model: GPT, use_cache: bool = True) -> str:
    """Resolve 'auto' to 'native' when it can run, else 'torch'; 'native' must be possible.
    Without the KV cache there are no cached steps, so the answer is 'torch'."""
    check_engine_name(engine)
    if engine == "torch" or not use_cache:
        return "torch"
    reason = unsupported(model)
    if reason is None:
        return "native"
    if engine == "native":
        raise UserError(f"--engine native is not available: {reason}; use --engine torch")
    return "torch"


def pack_strips(w: torch.Tensor, strip: int) -> torch.Tensor:
    """[n_in, n_out] -> [n_out // strip, n_in, strip]: each strip of `strip` output columns
    becomes one contiguous run, the order the C step reads it in (columns past the last whole
    strip are left out; the step reads those from the original)."""
    n_in, n_out = w.shape
    full = n_out // strip * strip
    return w[:, :full].reshape(n_in, n_out // strip, strip).transpose(0, 1).contiguous()


def pack_q4(q: torch.Tensor, scales: torch.Tensor, strip: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """An int4 matrix (values in [-8, 7]) as pack_q8 lays out int8, two weights a byte: for each
    eight inputs, [strip][4] bytes, the low nibble the first four inputs of a column plus 8,
    the high nibble the last four plus 8."""
    quads, s = pack_q8(q, scales, strip)  # [strips, n_in / 4, strip, 4] of w + 128
    nib = quads.to(torch.int16) - 120  # w + 8, in [0, 15]
    low, high = nib[:, 0::2], nib[:, 1::2]  # quads of inputs 8p..8p+3 and 8p+4..8p+7
    return (low | (high << 4)).to(torch.uint8).contiguous(), s


def pack_q8(q: torch.Tensor, scales: torch.Tensor, strip: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 matrix [n_in, n_out] and its scales [groups, n_out] in the C step's int8 layout:
    inputs padded to whole groups and columns to whole strips (scale 0), each strip's bytes
    w + 128 as [n_in / 4][strip][4] (four consecutive inputs of a column together, what a
    dot-product instruction reads), its scales [groups][strip] as float16 (exact: model/int8.py
    keeps scales at float16 values)."""
    n_in, n_out = q.shape
    groups = scales.shape[0]
    cols = -(-n_out // strip) * strip
    padded = torch.zeros(groups * GROUP, cols, dtype=torch.int16)
    padded[:n_in, :n_out] = q.to(torch.int16)
    unsigned = (padded + 128).to(torch.uint8)  # every weight is in [-127, 127]
    quads = unsigned.view(groups * GROUP // 4, 4, cols // strip, strip).permute(2, 0, 3, 1)
    s = torch.zeros(groups, cols, dtype=torch.float16)
    s[:, :n_out] = scales
    return quads.contiguous(), s.view(groups, cols // strip, strip).transpose(0, 1).contiguous()


class FusedForward:
    """The fused C step: the model's forward through the C library over a list of rows (or a
    range of its layers), each row one token in its own cache slot at its own column, so
    sequences of any lengths, prompts and decode tokens share one call (continuous batching)."""

    def __init__(self, model: GPT) -> None:
        lib = load_library()
        assert not isinstance(lib, str), lib
        self.lib = lib
        cfg = model.config
        self.cfg = cfg
        self.max_rows = max_rows = lib.minigpt_max_batch()
        # Hold a reference to every tensor whose address we hand to C, so none is freed.
        head_t = model.head_copy()
        wpe = model.wpe.weight if model.wpe is not None else None
        globals_ = [model.wte.weight, wpe, head_t, model.ln_f.weight,
                    getattr(model.ln_f, "bias", None)]  # RMSNorm has no shift
        per_layer = []
        for block in model.h:
            a, m = block.attn, block.mlp
            qn, kn = (a.q_norm.weight, a.k_norm.weight) if cfg.qk_norm else (None, None)
            per_layer += [block.ln_1.weight, getattr(block.ln_1, "bias", None), a.c_attn.weight,
                          a.c_attn.bias, a.c_proj.weight, a.c_proj.bias, block.ln_2.weight,
                          getattr(block.ln_2, "bias", None), m.c_fc.weight, m.c_fc.bias,
                          m.c_proj.weight, m.c_proj.bias, qn, kn]
        self._tensors = [t.detach().contiguous() if t is not None else None
                         for t in globals_ + per_layer]
        self._ptrs = (ctypes.c_void_p * len(self._tensors))(
            *[t.data_ptr() if t is not None else None for t in self._tensors])
        # The matrices again, packed by output strips (see pack_strips): the step streams
        # these; the originals serve only the few columns past the last whole strip.
        # A model rounded to int8 (model/int8.py) hands its int8 strips and scales instead: the
        # step then reads one byte a weight (the dequantized floats serve the tail columns).
        strip = lib.minigpt_strip()
        assert lib.minigpt_group() == GROUP
        n_glob, n_per = len(globals_), len(per_layer) // max(1, cfg.n_layer)
        int8 = {2: getattr(model, "head_int8", None)}  # head_t
        int4 = set()
        for layer, block in enumerate(model.h):  # c_attn, c_proj, c_fc, c_proj
            for k, lin in ((2, block.attn.c_attn), (4, block.attn.c_proj), (8, block.mlp.c_fc),
                           (10, block.mlp.c_proj)):
                int8[n_glob + layer * n_per + k] = getattr(lin, "int8", None)
                if getattr(lin, "int4", False):
                    int4.add(n_glob + layer * n_per + k)
        self.int8 = any(v is not None for v in int8.values())
        self._packed, self._q8, self._scales = [], [], []
        self._bits = (ctypes.c_uint8 * len(self._tensors))()
        for i, t in enumerate(self._tensors):
            q = int8.get(i)
            self._packed.append(pack_strips(t, strip) if i in int8 and q is None else None)
            packer = pack_q4 if i in int4 else pack_q8
            quads, scales = packer(*q, strip) if q is not None else (None, None)
            self._q8.append(quads)
            self._scales.append(scales)
            self._bits[i] = 0 if q is None else 4 if i in int4 else 8
        self._pptrs, self._qptrs, self._sptrs = (
            (ctypes.c_void_p * len(ts))(*[t.data_ptr() if t is not None and t.numel() else None
                                          for t in ts])
            for ts in (self._packed, self._q8, self._scales))
        # PyTorch's thread count: the step shares OpenMP's thread pool with PyTorch (one
        # libgomp per process), so this never oversubscribes the cores PyTorch was given.
        self.threads = torch.get_num_threads()
        width = mlp_hidden(cfg.mlp, cfg.n_embd, cfg.mlp_hidden)
        self._dims = (ctypes.c_int64 * 15)(
            cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, 0, 0, 0, self.threads,
            cfg.norm == "rmsnorm", cfg.position == "rotary", MLPS.index(cfg.mlp), cfg.qk_norm,
            width, 0, cfg.n_layer)
        self._floats = (ctypes.c_float * 2)(cfg.rope_theta, cfg.norm_eps)
        self._rows = [(ctypes.c_int64 * max_rows)() for _ in range(4)]  # token, pos, slot, col
        self._want = (ctypes.c_uint8 * max_rows)()
        self.logits = torch.empty(max_rows, cfg.vocab_size)
        widest = -(-max(cfg.n_embd, width) // GROUP)  # an int8 product's quantized rows
        self._scratch = torch.empty(max_rows * (7 * cfg.n_embd + 3 * width + 10 * widest))

    def __call__(self, tokens: list[int], positions: list[int], slots: list[int],
                 cols: list[int], cache: KVCache, want: list[bool] | None = None,
                 layers: tuple[int, int] | None = None, resid: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Row i feeds tokens[i] at positions[i] and caches its key and value at column
        cols[i] of slot slots[i]; rows of one slot at consecutive columns (a prompt chunk) may
        share a call. Logits [rows wanted, V] in row order (all rows when `want` is None);
        the returned tensor is reused by the next call.

        `layers` = (first, end) runs only those layers. A call that stops before the last
        returns the rows' residual stream [rows, n_embd] instead of logits (also reused by
        the next call); one that starts past the first takes that stream as `resid`."""
        cfg, rows = self.cfg, len(tokens)
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"this step decodes 1..{self.max_rows} rows, got {rows}")
        first, end = layers if layers is not None else (0, cfg.n_layer)
        if first > 0:
            if resid is None or resid.shape != (rows, cfg.n_embd):
                raise ValueError(f"a call from layer {first} needs the rows' residual stream")
            if resid.data_ptr() != self._scratch.data_ptr():  # else it is there already
                self._scratch[:rows * cfg.n_embd].copy_(resid.reshape(-1))
        self._dims[13], self._dims[14] = first, end
        n_slots = cache.k.size(1)
        for i, (t, p, s, c) in enumerate(zip(tokens, positions, slots, cols, strict=True)):
            if not (0 <= t < cfg.vocab_size and 0 <= p < cfg.block_size and 0 <= s < n_slots
                    and 0 <= c < cache.max_len):
                raise ValueError(f"row {i}: token {t}, position {p}, slot {s} or column {c} "
                                 "out of range")
            for arr, v in zip(self._rows, (t, p, s, c), strict=True):
                arr[i] = v
        for t in (cache.k, cache.v):  # the C step indexes both as dense float32 arrays
            assert t.is_contiguous() and t.dtype == torch.float32
        self._dims[4], self._dims[5], self._dims[6] = rows, cache.max_len, n_slots
        if want is not None:
            for i, w in enumerate(want):
                self._want[i] = bool(w)
        rc = self.lib.minigpt_decode_step(
            self._dims, self._floats, self._ptrs, self._pptrs, self._qptrs,
            self._sptrs, self._bits, *self._rows,
            None if want is None else self._want,
            cache.k.data_ptr(), cache.v.data_ptr(), self.logits.data_ptr(),
            self._scratch.data_ptr())
        if rc != 0:
            raise RuntimeError(f"native decode step rejected its arguments (code {rc})")
        if end < cfg.n_layer:
            return self._scratch[:rows * cfg.n_embd].view(rows, cfg.n_embd)
        return self.logits[:rows if want is None else sum(map(bool, want))]
