"""The top-p sampling tail in native code, compiled on first use (a C compiler is
needed), read straight from the output head's logit chunks.

On Gemma 3 the tail of a CPU decoding step (copying the head's chunks into one logits
buffer, the softmax, block maxima, the nucleus) reads and writes the (rows x 262k)
logits four to five times: ~65 ms a step at 225 rows on an Intel Xeon (2 threads), a
quarter of the output projection itself. `top_p.c` reads each row once while the head's
chunks are still separate: the maxima, the normaliser and the candidates of the lowest
rung, with the row still in cache, then the rung, the sort and the draw (~25 ms). It
picks the rungs `toxtests.engines.torch.nucleus` picks; its probabilities come from its
own vectorised exponential (within ~1.4 ulp of exp, the normaliser summed in double): closer to a
float64 softmax than torch's float32 one, equal to it only to float rounding.

The source builds for the CPU at hand (`flavour`): AVX-512, AVX2 with FMA, or portable
C on other architectures, all with the same bits (the portable build is the reference
the tests hold the others to): the same logits give the same draws on any of them, so
the sampler is "native" on all and the instruction set never splits a cache. An x86
CPU without AVX2 keeps the torch + numba path: portable C without hardware FMA would be
slower than it.

The library is built once per source, compiler and flags into the cache directory
(written atomically) and loaded with ctypes; without a compiler, a flavour for this CPU
or a writable cache, `load()` returns None and generation keeps the torch + numba path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SOURCE = Path(__file__).with_name("native") / "top_p.c"
# Every build: no contraction into FMAs the source does not ask for (same bits in all).
COMMON_FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
FLAVOURS = {
    "avx512": ("-mavx512f", "-mavx512dq", "-mfma", *COMMON_FLAGS),
    "avx2": ("-mavx2", "-mfma", *COMMON_FLAGS),
    "portable": COMMON_FLAGS,
}
DISABLE_ENV = "TOXTESTS_NO_NATIVE"

_library: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def flavour() -> str | None:
    """The build this CPU runs ("avx512", "avx2" or "portable"), as torch's dispatcher
    sees x86 CPUs; None for an x86 CPU without AVX2 and FMA."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "portable"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - torch < 2.1
        return None
    if capability.startswith("AVX512"):
        return "avx512"
    return "avx2" if capability.startswith("AVX2") else None


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _library_path(cache_dir: Path, cc: str, source: Path, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    machine = _cpu_model() if "-march=native" in flags else ""
    key = hashlib.sha256(
        source.read_bytes() + " ".join(flags).encode() + version.stdout.encode() + machine.encode()
    ).hexdigest()[:16]
    return cache_dir / "native" / f"{source.stem}-{key}.so"


def _cpu_model() -> str:
    """The CPU a `-march=native` build is for (a cache directory can be shared)."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("model name")), "")
    except OSError:
        return ""


def build(
    cache_dir: Path, cc: str, source: Path = SOURCE, flags: tuple[str, ...] = FLAVOURS["portable"]
) -> Path:
    """Compile `source` into the cache (once per source, flags, compiler and, for a
    native-architecture build, CPU)."""
    target = _library_path(cache_dir, cc, source, flags)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *flags, "-o", temporary, str(source), "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{cc} could not compile {source}:\n{result.stderr.strip()}")
        os.replace(temporary, target)  # atomic: a concurrent worker sees all or nothing
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def load() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot run here (warned once)."""
    global _library, _tried
    with _lock:
        if _tried:
            return _library
        _tried = True
        kind = None if os.environ.get(DISABLE_ENV) else flavour()
        if kind is None:
            return None
        cc = compiler()
        if cc is None:
            return None
        from toxtests.models import default_cache_dir

        try:
            library = build_flavour(default_cache_dir(), cc, kind)
        except (OSError, RuntimeError, AttributeError) as exc:
            warnings.warn(
                f"toxtests: the native top-p kernel is unavailable ({exc}); sampling keeps "
                f"the torch + numba path, exact but slower. Set {DISABLE_ENV}=1 to skip it.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        _library = library
        return library


def build_flavour(cache_dir: Path, cc: str, kind: str) -> ctypes.CDLL:
    """The `kind` build of the kernel (a key of FLAVOURS), compiled into `cache_dir` and
    loaded: `load()` takes this CPU's, tests the portable one beside it."""
    library = ctypes.CDLL(str(build(cache_dir, cc, flags=FLAVOURS[kind])))
    _declare(library)
    return library


def _declare(library: ctypes.CDLL) -> None:
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    library.top_p_flavour.restype = ctypes.c_char_p
    library.top_p_flavour.argtypes = []
    library.top_p_candidates.restype = ctypes.c_int
    library.top_p_candidates.argtypes = [
        pointer, pointer, ctypes.c_int32, i64, i64, ctypes.c_float, pointer,
        ctypes.c_int32, ctypes.c_double, i64, pointer, pointer, pointer, pointer,
    ]  # fmt: skip
    library.top_p_sample.restype = ctypes.c_int
    library.top_p_sample.argtypes = [
        pointer, pointer, ctypes.c_int32, i64, i64, ctypes.c_float, pointer,
        ctypes.c_int32, ctypes.c_double, i64, ctypes.c_float, pointer, pointer,
    ]  # fmt: skip
    library.pack_candidates.restype = None
    library.pack_candidates.argtypes = [pointer, pointer, i64, pointer, i64, i64, pointer, pointer]


def _workers(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="toxtests-top-p")
        _pool_size = threads
    return _pool


class _Rows:
    """The logit chunks as the kernels take them, and the arguments both kernels share:
    (chunks, widths, count, first row, last row, scale, ladder, rungs, target, room)."""

    def __init__(self, chunks: list[Any], scale: float, top_p: float):
        from toxtests.engines.torch.ladder import BLOCK, LADDER, MARGIN

        rows = int(chunks[0].shape[0])
        for chunk in chunks:
            if (
                chunk.dtype.itemsize != 4
                or not chunk.dtype.is_floating_point
                or chunk.device.type != "cpu"
                or not chunk.is_contiguous()
                or chunk.shape[0] != rows
            ):
                raise ValueError(
                    "logit chunks must be contiguous float32 CPU blocks of the same rows"
                )
        self.rows = rows
        self._widths = np.array([int(chunk.shape[1]) for chunk in chunks], dtype=np.int64)
        self._pointers = (ctypes.c_void_p * len(chunks))(*[c.data_ptr() for c in chunks])
        self._ladder = np.ascontiguousarray(LADDER, dtype=np.float32)
        # At most 1/t tokens have p >= t (slack for a sum a rounding above 1), plus a
        # block of slack for the block-wise writes.
        self.room = min(int(self._widths.sum()), int(1.01 / float(LADDER[-1])) + 1) + BLOCK
        self._count = len(chunks)
        self._scale = scale
        self._target = top_p + MARGIN

    def arguments(self, first: int, last: int) -> tuple[Any, ...]:
        return (
            self._pointers, self._widths.ctypes.data, self._count, first, last, self._scale,
            self._ladder.ctypes.data, len(self._ladder), self._target, self.room,
        )  # fmt: skip


def _split(run: Any, rows: int, threads: int) -> None:
    """run(first, last) over `threads` Python threads (ctypes lets go of the GIL)."""
    threads = max(1, min(threads, rows))
    bounds = [rows * i // threads for i in range(threads + 1)]
    if threads == 1:
        statuses = [run(0, rows)]
    else:
        statuses = list(_workers(threads).map(run, bounds[:-1], bounds[1:]))
    if any(statuses):
        raise MemoryError("the native top-p kernel could not allocate its scratch memory")


def _loaded(library: ctypes.CDLL | None = None) -> ctypes.CDLL:
    library = library or load()
    if library is None:
        raise RuntimeError("the native top-p kernel is not available here")
    return library


def top_p_sample(  # noqa: PLR0913
    chunks: list[Any],
    scale: float,
    top_p: float,
    uniforms: Any,
    threads: int = 1,
    library: ctypes.CDLL | None = None,
) -> np.ndarray:
    """One token per row, drawn from the top-p nucleus of softmax(logits * scale) with
    the row's uniform exactly as `toxtests.engines.torch.sampling._nucleus_pick` draws it; -1 for a
    row no rung covers (the caller samples it another way).

    `chunks`: the logits as column chunks, contiguous float32 CPU tensors of the same
    rows in vocabulary order (`OutputHead.logit_chunks`). `library`: another build than
    this CPU's (`build_flavour`).
    """
    library = _loaded(library)
    layout = _Rows(chunks, scale, top_p)
    draws = np.ascontiguousarray(np.asarray(uniforms, dtype=np.float32))
    if draws.shape != (layout.rows,):
        raise ValueError(
            f"one uniform per row expected: {layout.rows} rows, uniforms {draws.shape}"
        )
    tokens = np.empty(layout.rows, dtype=np.int64)

    def run(first: int, last: int) -> int:
        return int(
            library.top_p_sample(
                *layout.arguments(first, last), top_p, draws.ctypes.data, tokens.ctypes.data
            )
        )

    _split(run, layout.rows, threads)
    return tokens


def top_p_candidates(
    chunks: list[Any],
    scale: float,
    top_p: float,
    threads: int = 1,
    library: ctypes.CDLL | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(values, ids, found, rungs): `toxtests.engines.torch.nucleus.nucleus_candidates`'s result for
    softmax(logits * scale), plus each row's chosen rung (-1: none); for tests and
    comparisons, `top_p_sample` is the hot path."""
    library = _loaded(library)
    layout = _Rows(chunks, scale, top_p)
    rows, room = layout.rows, layout.room
    values = np.empty(rows * room, dtype=np.float32)
    ids = np.empty(rows * room, dtype=np.int32)
    counts = np.empty(rows, dtype=np.int64)
    chosen = np.empty(rows, dtype=np.float32)

    def run(first: int, last: int) -> int:
        return int(
            library.top_p_candidates(
                *layout.arguments(first, last),
                values.ctypes.data,
                ids.ctypes.data,
                counts.ctypes.data,
                chosen.ctypes.data,
            )  # fmt: skip
        )

    _split(run, rows, threads)
    width = max(1, int(counts.max(initial=0)))
    packed_values = np.empty((rows, width), dtype=np.float32)
    packed_ids = np.empty((rows, width), dtype=np.int64)
    library.pack_candidates(
        values.ctypes.data, ids.ctypes.data, room, counts.ctypes.data, rows, width,
        packed_values.ctypes.data, packed_ids.ctypes.data,
    )  # fmt: skip
    return packed_values, packed_ids, counts >= 0, chosen
