"""A compiled CPU kernel for the bf16 LoRA term of few tokens: BGMV-style, each token against its own slot's rank
rows only, read in place from the layers' pools (lora_term.c).

The oneDNN term (packed_lora.py) multiplies every token by every slot of the batch (the mask method) and pays
oneDNN's fixed cost twice per term; on a decode step of 16 rows over 8 adapters (r 8 and 16) that is 8 times the
useful products. Measured per term on the 2-core bf16 CPU, with the weights in cache, oneDNN / this kernel, us:
q/k/v 78-90 / 18-27, o 47-55 / 10-15. It reads the pools as they are, so a slot write needs no gathered copy.
Within a step the pools are cold (the base weights stream through the cache), so the term is bound by reading
them; the slots are spread over torch's OpenMP threads, so each core reads only its own slots' rows. A term on one
adapter therefore runs on one thread, and large terms (prefills) stay on oneDNN (``KERNEL_MAX_TOKENS``).

Built once per machine and source with the system C compiler into ``<model cache>/kernels`` and loaded with
ctypes (which releases the interpreter lock for the call): with AVX512-BF16 where /proc/cpuinfo reports it,
portable C otherwise. Where there is no compiler or the build fails, ``load_kernel`` says why in the log and
returns None, and the oneDNN term serves.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .lora_layers import LoraBatch, SlotLoRALinear

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_term.c")
FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp"]
SIMD_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
# Terms of more tokens than this run on oneDNN (or its per-row form), whose products pay off at that size and use
# every core even on one adapter. 16 prompts of 64 tokens over 8 adapters prefill in the same time either way
# (746 against 748 ms; base 709).
KERNEL_MAX_TOKENS = 64


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_bf16" in line for line in f)
    except OSError:
        return False


def build_kernel(cache_dir: Path, simd: bool, cc: str | None = None) -> Path:
    """The shared library for this source and flags, compiled into ``cache_dir`` unless it is there (a cache
    prepared elsewhere, as in the Docker image, needs no compiler); written under a temporary name, then renamed, so
    concurrent starts never load half a file. The flags name the instruction set, so it runs on any CPU that has
    it (``load_kernel`` picks by /proc/cpuinfo). ``cc``: the compiler (default: ``cc`` or ``gcc`` on PATH). Raises
    RuntimeError (no compiler, a failed or timed-out build) or OSError."""
    flags = FLAGS + (SIMD_FLAGS if simd else [])
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *flags]).encode()).hexdigest()[:16]
    variant = "avx512bf16" if simd else "portable"
    out = cache_dir / f"lora_term-{variant}-{key}.so"
    if out.exists():
        return out
    cc = cc or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        try:
            done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        except subprocess.SubprocessError as e:
            raise RuntimeError(f"{cc}: {e}") from e
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in cache_dir.glob(f"lora_term-{variant}-*.so"):  # builds of earlier sources
        if old != out:
            old.unlink(missing_ok=True)
    return out


class LoraKernel:
    """The loaded library: ``add_term`` adds the LoRA term of a batch's rows to ``y`` in place."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        P, I = ctypes.c_void_p, ctypes.c_int  # noqa: E741
        self._term = lib.lora_term_bf16
        self._term.restype = I
        self._term.argtypes = [I, I, I, P, P, I, I, P, P, P, P, P, I, P, P, I, P]
        self.simd = bool(lib.lora_term_simd())
        self.path = path

    def add_term(self, x: torch.Tensor, y: torch.Tensor, T: int, weights: "KernelWeights",
                 rows: "KernelBatch") -> None:
        """``y (M, Σ out) += term`` for ``x (M, in)``, M = rows × T tokens (row i's tokens are i·T .. i·T + T - 1)."""
        M, d = x.shape
        assert x.dtype == y.dtype == torch.bfloat16 and x.is_contiguous() and y.is_contiguous(), \
            f"x {x.dtype} {tuple(x.stride())}, y {y.dtype} {tuple(y.stride())}: contiguous bf16 expected"
        assert d == weights.in_features and y.shape == (M, weights.out_total) and M == rows.n_rows * T, \
            f"x {tuple(x.shape)}, y {tuple(y.shape)}, {rows.n_rows} rows of {T} tokens, layers {weights.in_features}"
        row_slot, pool_rows, ranks = rows.pointers
        if self._term(M, T, d, x.data_ptr(), y.data_ptr(), weights.out_total, weights.n, *weights.pointers, row_slot,
                      rows.n_slots, pool_rows, ranks, rows.max_rank, rows.w.data_ptr()) != 0:
            raise MemoryError("lora_term_bf16 could not allocate its scratch")


def load_kernel(cache_dir: Path, simd: bool | None = None, cc: str | None = None) -> LoraKernel | None:
    """Build (once) and load the kernel; None, with the reason logged, where that is not possible.
    ``simd``: the AVX512-BF16 build (default: when the CPU reports it); ``cc``: see ``build_kernel``."""
    simd = cpu_has_avx512_bf16() if simd is None else simd
    try:
        kernel = LoraKernel(build_kernel(cache_dir, simd, cc))
    except (OSError, RuntimeError) as e:
        log.warning("LoRA CPU kernel unavailable, the oneDNN term serves instead: %s", e)
        return None
    log.info("LoRA CPU kernel loaded (%s): %s", "AVX512-BF16" if kernel.simd else "portable C", kernel.path)
    return kernel


@dataclass(frozen=True)
class KernelWeights:
    """Where the pools of ``n`` layers reading one input are, and where their outputs go in ``y``. The pools are
    allocated once and written in place (lora_layers.SharedPool), so these pointers hold for the model's life."""

    n: int
    in_features: int
    out_total: int
    tensors: tuple[torch.Tensor, ...]  # the int arrays below, kept alive
    pointers: tuple[int, int, int, int]  # A pool pointers, Bs pool pointers, output offsets, output sizes

    @staticmethod
    def of(layers: Sequence[SlotLoRALinear]) -> "KernelWeights":
        assert all(layer.A.dtype == torch.bfloat16 and layer.A.is_contiguous() and layer.Bs.is_contiguous()
                   for layer in layers), "the kernel reads contiguous bf16 pools"
        outs = [layer.out_features for layer in layers]
        arrays = (torch.tensor([layer.A.data_ptr() for layer in layers], dtype=torch.int64),
                  torch.tensor([layer.Bs.data_ptr() for layer in layers], dtype=torch.int64),
                  torch.tensor([sum(outs[:j]) for j in range(len(outs))], dtype=torch.int32),
                  torch.tensor(outs, dtype=torch.int32))
        return KernelWeights(len(layers), layers[0].in_features, sum(outs), arrays,
                             tuple(a.data_ptr() for a in arrays))  # type: ignore[arg-type]


@dataclass(frozen=True)
class KernelBatch:
    """A batch's routing as the kernel reads it: each row's slot (index into the batch's slots, -1: none), each
    slot's pool rows and rank, each row's weight per rank (1, or a GainLoRA gate)."""

    n_rows: int
    n_slots: int
    max_rank: int
    w: torch.Tensor  # (N, R) float32
    tensors: tuple[torch.Tensor, ...]
    pointers: tuple[int, int, int]  # row slots, pool rows (U, R), ranks

    @staticmethod
    def of(b: LoraBatch) -> "KernelBatch":
        """Built once per step (cached on the batch)."""
        return b.step_value(("kernel",), lambda: KernelBatch._build(b))

    @staticmethod
    def _build(b: LoraBatch) -> "KernelBatch":
        R = b.max_rank
        w = b.row_weights(1, torch.float32).view(-1, R)  # (N, R): the per-row form's weights, one copy
        rows = torch.tensor([[*r, *[0] * (R - len(r))] for r in b.slot_rows], dtype=torch.int32)  # (U, R)
        arrays = (torch.tensor(b.row_pos, dtype=torch.int32), rows,
                  torch.tensor([r for _, r in b.spans], dtype=torch.int32))
        return KernelBatch(len(b.row_pos), len(b.slot_rows), R, w, arrays,
                           tuple(a.data_ptr() for a in arrays))  # type: ignore[arg-type]
