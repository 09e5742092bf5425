"""The quality gate's per-row sums in one fused pass, compiled once per machine.

For each scored row of an artifact's logits ``x`` and the reference's cached weights ``w``
(:func:`quantize.evaluate.reference_rows`), :func:`row_sums` returns the row's maximum ``m``,
``sum 2^b`` and ``sum w b`` with ``b = (x - m) log2 e``: everything the KL divergence, the
target's log-likelihood and the top-token check need that costs a pass over the vocabulary.
torch computes the same in five passes and several kernels per row block; ``gate_kernel.c`` reads
each row twice (its maximum, then one fused pass: a vectorised Cephes ``exp2`` polynomial and the
dot product, summed in float per 512 entries and in double across them), rows split over OpenMP
threads.

The C source ships in the package and is compiled on first use with the system compiler (``$CC``
or ``cc``; ``-O3 -march=native``, OpenMP where the compiler has it, ``-march=native`` left out where
the compiler refuses it) into ``<user cache>/gate-kernel/<key>.so``, keyed by the source, the compiler's version, the flags and
the CPU's feature flags, and renamed into place when complete.  Without a working compiler the
gate uses its torch implementation (:func:`quantize.evaluate.row_sums_torch`) and says so once;
``QUANTIZE_GATE_KERNEL=torch`` chooses that one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from quantize import user_cache
from quantize.atomic import atomic_file
from quantize.errors import QuantizeError
from quantize.portable import proc_text

log = logging.getLogger(__name__)

ENV = "QUANTIZE_GATE_KERNEL"  # "torch": skip the compiled kernel
SOURCE = Path(__file__).with_name("gate_kernel.c")
NATIVE = "-march=native"  # left out on a last try: some compilers (older Apple clang on arm64) refuse it
FLAGS = ("-O3", NATIVE, "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
OPENMP = "-fopenmp"
SYSCTL_CPU = ("machdep.cpu.brand_string", "machdep.cpu.features", "machdep.cpu.leaf7_features")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    """The CPU's feature flags: the ``flags``/``Features`` line of /proc/cpuinfo, else what ``sysctl``
    tells of the CPU (``machdep.cpu.*``, as Darwin names them), else ``platform.processor()``."""
    text = proc_text("cpuinfo")
    if text is not None:
        return next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    sysctl = shutil.which("sysctl")
    if sysctl is not None:
        try:
            out = subprocess.run([sysctl, "-n", *SYSCTL_CPU], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            return out
    return platform.processor()


def _key(cc: str) -> str:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (cc, version, " ".join(FLAGS), platform.machine(), _cpu_flags()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _build(cc: str, out: Path) -> bool:
    """Compile the kernel to ``out`` (atomically), with OpenMP where the compiler has it, and without
    ``-march=native`` where the compiler refuses it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for flags in ((*FLAGS, OPENMP), FLAGS, tuple(f for f in FLAGS if f != NATIVE)):
        try:
            with atomic_file(out) as tmp:
                res = subprocess.run([cc, *flags, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=300)
                if res.returncode != 0:
                    raise OSError(res.stderr.strip()[-300:] or f"exit {res.returncode}")
            return True
        except (OSError, subprocess.SubprocessError, QuantizeError) as exc:
            log.info("compiling %s with %s failed: %s", SOURCE.name, " ".join(flags), exc)
    return False


@cache
def kernel() -> Any | None:
    """The compiled ``gate_rows`` (compiling it on first use), or None: torch then does the sums."""
    if os.environ.get(ENV, "").lower() == "torch":
        return None
    cc = _compiler()
    lib_path = user_cache() / "gate-kernel" / f"{_key(cc)}.so" if cc else None
    if lib_path is None or not (lib_path.is_file() or _build(cc or "", lib_path)):
        log.warning("%s: the quality gate sums its rows with torch, slower (run with -v for why)",
                    f"{cc} would not compile {SOURCE}" if cc else "no C compiler (set CC)")
        return None
    try:
        lib = ctypes.CDLL(str(lib_path))
    except OSError as exc:
        log.warning("cannot load %s (%s): the quality gate sums its rows with torch, slower", lib_path, exc)
        return None
    f32 = np.ctypeslib.ndpointer(np.float32, ndim=2, flags="C")
    out32, out64 = np.ctypeslib.ndpointer(np.float32, ndim=1, flags="C"), np.ctypeslib.ndpointer(np.float64, ndim=1, flags="C")
    fn = lib.gate_rows
    fn.argtypes = [f32, f32, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, out32, out64, out64]
    fn.restype = None
    return fn


def row_sums(x: np.ndarray, w: np.ndarray, threads: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Per row of ``x`` and ``w`` (float32, C order, same shape): its maximum (float32), ``sum 2^b`` and
    ``sum w b`` (float64), ``b = (x - max) log2 e``; None without the compiled kernel."""
    fn = kernel()
    if fn is None:
        return None
    n, vocab = x.shape
    top, sum2, dot = np.empty(n, np.float32), np.empty(n, np.float64), np.empty(n, np.float64)
    fn(x, w, n, vocab, threads or os.cpu_count() or 1, top, sum2, dot)
    return top, sum2, dot
