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
products stay exact.  ``a`` is searched per norm on a proxy of both errors, as AWQ searches its
scale exponent (Lin et al. 2023).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .atomic import atomic_file
from .errors import QuantizeError
from .gguf_info import copy_metadata, open_gguf
from .imatrix import Imatrix

log = logging.getLogger(__name__)

ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75)

# norm tensor -> the matrices that read its output (llama-family GGUF names; {bid} per block).
SMOOTH_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("blk.{bid}.attn_norm.weight", ("blk.{bid}.attn_q.weight", "blk.{bid}.attn_k.weight", "blk.{bid}.attn_v.weight")),
    ("blk.{bid}.ffn_norm.weight", ("blk.{bid}.ffn_gate.weight", "blk.{bid}.ffn_up.weight")),
    ("output_norm.weight", ("output.weight",)),
)


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
    err = (np.rint((g - lo) / step) * step + lo - g).reshape(rows, cols)
    return float(((err * err) * x2[None, :]).sum())


def _act_quant_error(x2: np.ndarray, block: int = 256) -> float:
    """Error of 8-bit symmetric activation quantization with one scale per ``block`` channels
    (llama.cpp's Q8_K), using rms activations: noise power ~ step^2 / 12 per channel."""
    rms = np.sqrt(x2)
    n = len(rms) // block * block or len(rms)
    step = rms[:n].reshape(-1, min(block, n)).max(1) * 3 / 127  # ~3-sigma peak per block
    return float((step**2 / 12).sum() * min(block, n))


def plan_smoothing(reader: gguf.GGUFReader, im: Imatrix) -> SmoothPlan:
    tensors = {t.name: t for t in reader.tensors}
    n_blocks = 1 + max((int(n.split(".")[1]) for n in tensors if n.startswith("blk.")), default=-1)
    scales, readers, alphas = {}, {}, {}
    for norm_t, reader_ts in SMOOTH_GROUPS:
        for bid in range(n_blocks) if "{bid}" in norm_t else [0]:
            norm = norm_t.format(bid=bid)
            rs = tuple(r.format(bid=bid) for r in reader_ts)
            if norm not in tensors or not all(r in tensors for r in rs) or rs[0] not in im.sums:
                continue
            x2 = im.means()[rs[0]].astype(np.float64) + 1e-12
            ws = [np.asarray(tensors[r].data, dtype=np.float32) for r in rs]
            wmax = np.max([np.abs(w).max(0) for w in ws], axis=0) + 1e-12
            best = (np.inf, 0.0, np.ones_like(x2))
            for a in ALPHAS:
                s = np.sqrt(x2) ** a / wmax ** (1 - a)
                s = np.exp2(np.rint(np.log2(s / np.exp(np.log(s).mean()))))
                xs2 = x2 / s**2
                err = sum(_fake_quant_error(w * s[None, :].astype(np.float32), xs2) for w in ws) / len(ws)
                err += _act_quant_error(xs2) * sum(float((w.astype(np.float64) ** 2).sum()) for w in ws) / len(ws) / len(x2)
                if err < best[0]:
                    best = (err, a, s)
            scales[norm], readers[norm], alphas[norm] = best[2].astype(np.float32), rs, best[1]
    return SmoothPlan(scales, readers, alphas)


def smooth_gguf(src: Path, imatrix: Path, out: Path, out_imatrix: Path) -> SmoothPlan:
    """Write a smoothed copy of the float GGUF ``src`` and the importance matrix rescaled to it."""
    reader = open_gguf(src)
    for t in reader.tensors:
        if t.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16):
            raise QuantizeError(src, f"smoothing needs a float GGUF; {t.name} is {t.tensor_type.name}")
    im = Imatrix.load(imatrix)
    plan = plan_smoothing(reader, im)
    col_scale = {r: plan.scales[n] for n, rs in plan.readers.items() for r in rs}
    arch = str(reader.fields["general.architecture"].contents())
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch)
        copy_metadata(reader, w)
        for t in reader.tensors:
            data = np.asarray(t.data)
            if t.name in plan.scales:
                data = (data.astype(np.float32) / plan.scales[t.name]).astype(data.dtype)
            elif t.name in col_scale:
                data = (data.astype(np.float32) * col_scale[t.name][None, :]).astype(data.dtype)
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    for name in im.sums:
        if name in col_scale:
            im.sums[name] = (im.sums[name] / col_scale[name].astype(np.float64) ** 2).astype(np.float32)
    im.save(out_imatrix)
    log.info("smoothing: alphas %s", sorted(set(plan.alphas.values())))
    return plan
