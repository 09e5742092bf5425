"""Migrate activation outliers into the weights before GGUF quantization (beyond llama.cpp).

Real LLMs carry a few activation channels tens of times larger than the rest.  llama.cpp's CPU
kernels quantize activations too (8-bit, one scale per 256 values for K-quants), so those channels
cost precision on every other channel of the block, and the matching weight columns are tiny
inside their 4-bit blocks.  An importance matrix only helps the second half.

For each RMSNorm and the matrices that read its output, we divide norm channel ``j`` by ``s_j``
and multiply column ``j`` of the readers by ``s_j``: the function is unchanged, activations lose
their outliers and the weights take a share of them.  ``s_j = rms(x_j)^a / max|W_j|^(1-a)``
(SmoothQuant, Xiao et al. 2023, eq. 4, with the imatrix's mean square as the activation
statistic), normalised by its geometric mean and rounded to a power of two so the float16
products stay exact (except products below float16's smallest normal, rounded as subnormals).  ``a`` is searched per norm on a proxy of both errors, as AWQ searches its
scale exponent (Lin et al. 2023).

Memory is bounded by one norm group, not the model: the plan reads only the matrices of the group
it is deciding (float32 copies, freed after; the error proxy adds about four float32-sized buffers
of one matrix), and the output is written tensor by tensor, each
rescaled tensor computed just before it is written and every other one copied from the source's
memory map in chunks; mapped source pages are dropped from this process once read.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from quantize import TOOL_NAME
from quantize.architectures import for_gguf
from quantize.atomic import atomic_file, check_output
from quantize.errors import QuantizeError
from quantize.formats.gguf_read import field_value, open_gguf
from quantize.formats.gguf_write import MappedTensor, Writer, copy_metadata
from quantize.imatrix import Imatrix
from quantize.portable import release_pages

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
# float tensor type -> numpy dtype of its stored bits (bf16 as uint16, widened by _to_float32)
STORAGE: dict[Q, np.dtype] = {Q.F32: np.dtype("<f4"), Q.F16: np.dtype("<f2"), Q.BF16: np.dtype("<u2")}

ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75)



def smooth_groups(reader: gguf.GGUFReader, where: Path) -> list[tuple[str, tuple[str, ...]]]:
    """Norm tensor -> the matrices that read its output, every block, from the family's row
    (:attr:`quantize.architectures.Architecture.scale_groups`, the groups AWQ scales too); when the
    file does not say which row, the groups of every row of its GGUF architecture (a group whose
    tensors the file lacks is then skipped by the planner)."""
    rows = for_gguf(str(reader.fields["general.architecture"].contents()),
                    field_value(reader, f"{TOOL_NAME}.source.architecture"), where)
    for row in rows:
        row.refuse("smooth", where)
    n_blocks = 1 + max((int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")), default=-1)
    return list(dict.fromkeys(g for row in rows for g in row.norm_groups(n_blocks)))


@dataclass(frozen=True)
class SmoothPlan:
    scales: dict[str, np.ndarray]  # norm tensor name -> per-channel divisor (powers of two)
    readers: dict[str, tuple[str, ...]]
    alphas: dict[str, float]


def _fake_quant_error(w: np.ndarray, x2: np.ndarray, group: int = 32, levels: int = 15) -> float:
    """Activation-weighted error of asymmetric round-to-nearest in groups of ``group`` columns:
    a cheap stand-in for Q4_K's sub-blocks, weighted by E[x_j^2] (the output error it causes)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // group, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    step = np.maximum(hi - lo, 1e-12) / levels
    err = g - lo  # rint((g - lo) / step) * step + lo - g, in one float32 buffer
    err /= step
    np.rint(err, out=err)
    err *= step
    err += lo
    err -= g
    err = err.reshape(rows, cols)
    err *= err
    return float(np.multiply(err, x2[None, :]).sum())


def _sum_sq(w: np.ndarray) -> float:
    """Sum of squares of ``w``, accumulated in float64."""
    w64 = w.astype(np.float64)
    np.square(w64, out=w64)
    return float(w64.sum())


def _act_quant_error(x2: np.ndarray, block: int = 256) -> float:
    """Error of 8-bit symmetric activation quantization with one scale per ``block`` channels
    (llama.cpp's Q8_K), using rms activations: noise power ~ step^2 / 12 per channel."""
    rms = np.sqrt(x2)
    n = len(rms) // block * block or len(rms)
    step = rms[:n].reshape(-1, min(block, n)).max(1) * 3 / 127  # ~3-sigma peak per block
    return float((step**2 / 12).sum() * min(block, n))


class FloatSource:
    """A float GGUF's tensors read one at a time from a private memory map: each read is a copy,
    and the pages it touched are dropped from this process's resident set afterwards (where the system
    can: :func:`quantize.portable.release_pages`)."""

    def __init__(self, mm: mmap.mmap, reader: gguf.GGUFReader) -> None:
        self.mm = mm
        self.tensors = {t.name: t for t in reader.tensors}

    def release(self, t: gguf.ReaderTensor) -> None:
        begin = int(t.data_offset) - int(t.data_offset) % mmap.PAGESIZE
        release_pages(self.mm, begin, int(t.data_offset) + int(t.n_bytes) - begin)

    def float32(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float32 copy in numpy order (rows, columns)."""
        t = self.tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        stored = np.frombuffer(self.mm, dtype=STORAGE[t.tensor_type], count=int(t.n_elements), offset=int(t.data_offset))
        out = _to_float32(stored).reshape(shape)
        del stored
        self.release(t)
        return out


def _to_float32(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.uint16:  # bf16 bits: the high half of a float32
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def _from_float32(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint16:  # to bf16 bits, rounding to nearest even
        bits = x.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return x.astype(dtype, copy=False)


def plan_smoothing(source: FloatSource, im: Imatrix, groups: list[tuple[str, tuple[str, ...]]]) -> SmoothPlan:
    """Choose each norm group's scales, reading only that group's matrices.  A group whose
    readers are absent (the output norm of a model with tied embeddings) is left alone."""
    tensors = source.tensors
    means = im.means()
    scales, readers, alphas = {}, {}, {}
    for norm, rs in groups:
        if norm not in tensors or not all(r in tensors for r in rs) or rs[0] not in im.sums:
            continue
        x2 = means[rs[0]].astype(np.float64) + 1e-12
        ws = [source.float32(r).reshape(-1, len(x2)) for r in rs]  # stacked experts: every expert's rows
        wmax = np.max([np.abs(w).max(0) for w in ws], axis=0) + 1e-12
        best = (np.inf, 0.0, np.ones_like(x2))
        power = sum(_sum_sq(w) for w in ws)  # the same for every alpha
        for a in ALPHAS:
            s = np.sqrt(x2) ** a / wmax ** (1 - a)
            s = np.exp2(np.rint(np.log2(s / np.exp(np.log(s).mean()))))
            xs2 = x2 / s**2
            err = sum(_fake_quant_error(w * s[None, :].astype(np.float32), xs2) for w in ws) / len(ws)
            err += _act_quant_error(xs2) * power / len(ws) / len(x2)
            if err < best[0]:
                best = (err, a, s)
        del ws
        scales[norm], readers[norm], alphas[norm] = best[2].astype(np.float32), rs, best[1]
    return SmoothPlan(scales, readers, alphas)


def smooth_need(src: Path) -> int:
    """Bytes :func:`smooth_gguf` holds at its peak beyond the runtime, from ``src``'s tensor table:
    the largest norm group's readers in float32 plus five float32-sized buffers of its largest
    reader (the scaled candidate and the error proxy's, one of them float64), or, when writing,
    the largest tensor in float32 and its stored copy."""
    reader = open_gguf(src)
    sizes = {t.name: int(t.n_elements) for t in reader.tensors}
    plan = 0
    for _, names in smooth_groups(reader, src):
        rs = [sizes.get(r, 0) for r in names]
        plan = max(plan, sum(rs) + 5 * max(rs))
    return 4 * max(plan, int(1.5 * max(sizes.values(), default=0)))


@contextmanager
def _mapped(path: Path) -> Iterator[tuple[int, mmap.mmap]]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        yield f.fileno(), mm


def smooth_gguf(src: Path, imatrix: Path, out: Path, out_imatrix: Path) -> SmoothPlan:
    """Write a smoothed copy of the float GGUF ``src`` and the importance matrix rescaled to it."""
    check_output(out, [src, imatrix])
    check_output(out_imatrix, [src, imatrix, out], flag="--imatrix-out")
    reader = open_gguf(src)
    for t in reader.tensors:
        if t.tensor_type not in STORAGE:
            raise QuantizeError(src, f"smoothing needs a float GGUF; {t.name} is {t.tensor_type.name}")
    groups = smooth_groups(reader, src)
    im = Imatrix.load(imatrix)
    arch = str(reader.fields["general.architecture"].contents())
    with _mapped(src) as (fd, mm):
        source = FloatSource(mm, reader)
        plan = plan_smoothing(source, im, groups)
        if not any(n.startswith("blk.") for n in plan.scales):  # a "smoothed" copy that is not, otherwise
            first = [g for g, _ in groups if g.startswith("blk.0.")]
            raise QuantizeError(src, f"smoothing found no decoder-block norm group of this {arch} model ({', '.join(first)} "
                                f"with their readers) in the importance matrix {imatrix.name}; turn smoothing off for it "
                                "(recipe: [ladder] smooth = false)")
        col_scale = {r: plan.scales[n] for n, rs in plan.readers.items() for r in rs}
        with atomic_file(out) as tmp:
            w = Writer(tmp, arch)
            copy_metadata(reader, w)
            for t in reader.tensors:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                w.add_tensor_info(t.name, shape, STORAGE[t.tensor_type], int(t.n_bytes), raw_dtype=t.tensor_type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            # norms divided by their scales, the columns of their readers multiplied by them
            rescale = {n: (np.divide, s) for n, s in plan.scales.items()} | {r: (np.multiply, s[None, :]) for r, s in col_scale.items()}
            for t in reader.tensors:
                if (op := rescale.get(t.name)) is not None:
                    data = source.float32(t.name)
                    op[0](data, op[1], out=data)
                    w.write_tensor_data(_from_float32(data, STORAGE[t.tensor_type]))
                    del data
                else:
                    w.write_tensor_data(MappedTensor(fd, int(t.data_offset), int(t.n_bytes)))  # type: ignore[arg-type]
            w.close()
    for name in im.sums:
        if name in col_scale:
            s2 = np.tile(col_scale[name].astype(np.float64) ** 2, im.sums[name].size // col_scale[name].size)  # per expert
            im.sums[name] = (im.sums[name] / s2).astype(np.float32)
    im.save(out_imatrix)
    log.info("smoothing: alphas %s", sorted(set(plan.alphas.values())))
    return plan
