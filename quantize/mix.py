"""Per-tensor quantization types chosen under a byte budget (``quantize gguf --budget``).

Three steps, each on the real llama.cpp quantizer:

* **dry run**: llama.cpp's quantizer with ``dry_run`` set lists which tensors it quantizes and the type
  each stock file type gives them (shape fallbacks included); :func:`dry_run` reads that from its log.
* **sensitivity** (:func:`measure_sensitivity`): every quantizable tensor, one at a time, is quantized
  to each candidate type by ggml's own quantizer and dequantized again (:mod:`quantize.ggml`); its
  error is the importance-matrix-weighted squared error of the weights relative to the weights
  (``sum_j E[x_j^2] dW_ij^2 / sum_j E[x_j^2] W_ij^2``), the share of the tensor's output the type
  disturbs on the calibration activations.
* **allocation** (:func:`allocate`): each tensor's type minimises the predicted KL divergence, a
  weighted sum of those errors (:class:`Predictor`, fitted on probe files by :mod:`quantize.mix_fit`),
  under the budget: a greedy walk along each tensor's lower convex hull of (bytes, predicted cost),
  best cost saved per byte first.

The plan is written by llama.cpp's quantizer with one anchored override per quantized tensor
(``tt_overrides``), so the file's tensor bytes equal the plan's.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantize import ggml
from quantize.atomic import atomic_file
from quantize.budget import Budget
from quantize.errors import QuantizeError
from quantize.formats.gguf_read import open_gguf, read_header
from quantize.gguf_quant import tensor_overrides
from quantize.imatrix import Imatrix
from quantize.progress import progress
from quantize.quant_types import quant_type

log = logging.getLogger(__name__)

# The types a tensor may get, by its row length: 256-value blocks where the rows allow them; else
# llama.cpp's own fallbacks (32-value blocks).  With an importance matrix the low IQ types join.
CANDIDATES = ("Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
CANDIDATES_WITH_IMATRIX = ("IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")
CANDIDATES_32 = ("Q4_0", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0")  # what llama.cpp falls back to from each 256-block type
# The stock types a byte or bits-per-weight budget is compared with: the largest that fits.
STOCK = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
SAMPLE_VALUES = 1 << 18  # weights per tensor the sensitivity quantizes (rows spread evenly over the tensor)



# --- llama.cpp's dry run ---------------------------------------------------------------------


@dataclass(frozen=True)
class DryTensor:
    name: str
    ne: tuple[int, ...]  # ggml dims, ne0 (the row length) first
    source_type: str
    type: str  # what the quantizer makes of it (the source type when it leaves it alone)
    nbytes: int

    @property
    def quantized(self) -> bool:
        return self.type != self.source_type

    @property
    def rows(self) -> int:
        return math.prod(self.ne[1:])


# "[  12/  39] blk.0.attn_q.weight - [  256,   256,     1,     1], type =    f16, size =  0.12 MiB ->  0.04 MiB (q4_K)"
_DRY_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[([\d,\s]+)\], type =\s*(\S+), size =\s*[\d.]+ MiB"
                       r"(?: ->\s*[\d.]+ MiB \((\S+)\))?", re.M)


@contextlib.contextmanager
def _llama_log() -> Iterator[list[str]]:
    """llama.cpp's log lines while the block runs (llama-cpp-python's own callback restored after)."""
    import llama_cpp as L
    import llama_cpp._logger as lg

    got: list[str] = []

    @L.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        got.append(text.decode("utf-8", "replace"))

    L.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield got
    finally:
        L.llama_log_set(lg.llama_log_callback, ctypes.c_void_p(0))


def dry_run(src: Path, ftype: str, tensor_types: tuple[tuple[str, str], ...] = ()) -> dict[str, DryTensor]:
    """What llama.cpp's quantizer would make of ``src`` at ``ftype`` (with ``tensor_types`` overrides),
    tensor by tensor, without writing: its ``dry_run`` log read back, each size from ``ggml_row_size``."""
    import llama_cpp as L

    header = read_header(src)
    params = L.llama_model_quantize_default_params()
    params.ftype = quant_type(ftype).ftype
    params.dry_run = True
    keep: list[Any] = []
    if tensor_types:
        tt = tensor_overrides(tensor_types, src, header.tensors, True)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(L.llama_model_tensor_override))
        keep.append(tt)
    with tempfile.TemporaryDirectory() as scratch, _llama_log() as lines:
        rc = L.llama_model_quantize(str(src).encode(), str(Path(scratch) / "dry.gguf").encode(), ctypes.byref(params))
    if rc != 0:
        raise QuantizeError(src, f"llama.cpp's quantizer refused a dry run to {ftype} (status {rc})")
    out: dict[str, DryTensor] = {}
    for m in _DRY_LINE.finditer("".join(lines)):
        name, ne = m[1], tuple(int(d) for d in m[2].split(","))
        while len(ne) > 2 and ne[-1] == 1:
            ne = ne[:-1]
        source, target = m[3].upper(), (m[4] or m[3]).upper()
        nbytes = math.prod(ne[1:]) * ggml.row_size(target, ne[0])
        out[name] = DryTensor(name, ne, source, target, nbytes)
    if set(out) != set(header.tensors):
        raise QuantizeError(src, f"llama.cpp's dry-run log listed {len(out)} of {len(header.tensors)} tensors; "
                            "this llama-cpp-python's log format is not the one this tool reads")
    return out


def tensor_bytes(plan: Mapping[str, DryTensor]) -> int:
    return sum(t.nbytes for t in plan.values())


# --- sensitivity -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorOptions:
    """One quantizable tensor: its class and block, and for each type it may take, its bytes and error."""

    name: str
    cls: str  # "attn_v", "ffn_down", "token_embd" ...
    block: int | None
    ne: tuple[int, ...]
    bytes: dict[str, int]
    error: dict[str, float]


@dataclass(frozen=True)
class Sensitivity:
    fixed_bytes: int  # the tensors llama.cpp does not quantize (norms ...)
    n_weights: int  # every tensor's element count (llama.cpp's bits-per-weight denominator)
    tensors: tuple[TensorOptions, ...]
    candidates: tuple[str, ...]

    def save(self, path: Path) -> None:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Sensitivity:
        d = json.loads(path.read_text())
        tensors = tuple(TensorOptions(**{**t, "ne": tuple(t["ne"])}) for t in d.pop("tensors"))
        return cls(tensors=tensors, **{**d, "candidates": tuple(d["candidates"])})

    def smallest(self) -> int:
        return self.fixed_bytes + sum(min(t.bytes.values()) for t in self.tensors)


def tensor_class(name: str) -> tuple[str, int | None]:
    """``blk.7.ffn_down.weight`` -> ``("ffn_down", 7)``; ``output.weight`` -> ``("output", None)``."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        return parts[2], int(parts[1])
    return parts[0], None


def options_for(ne: tuple[int, ...], has_imatrix: bool) -> tuple[str, ...]:
    """The candidate types a tensor with rows of ``ne[0]`` values can take without a fallback."""
    if ne[0] % 256 == 0:
        return CANDIDATES + (CANDIDATES_WITH_IMATRIX if has_imatrix else ())
    if ne[0] % 32 == 0:
        return CANDIDATES_32
    return ()


def _sampled_rows(data: np.ndarray, per_row: int) -> list[tuple[int, np.ndarray]]:
    """Evenly spread rows of ``data`` (ggml order: experts, rows, values), at most :data:`SAMPLE_VALUES`
    values in all, grouped by expert: ``[(expert, rows), ...]``."""
    stacked = data.reshape(-1, data.shape[-2], per_row) if data.ndim > 2 else data.reshape(1, -1, per_row)
    experts, rows = stacked.shape[:2]
    take = max(8, SAMPLE_VALUES // per_row // experts)
    idx = np.unique(np.linspace(0, rows - 1, min(rows, take)).round().astype(np.int64))
    return [(e, np.asarray(stacked[e, idx], dtype=np.float32)) for e in range(experts)]


def _tensor_errors(rows_by_expert: list[tuple[int, np.ndarray]], types: tuple[str, ...], means: np.ndarray | None,
                   per_row: int) -> dict[str, float]:
    err = dict.fromkeys(types, 0.0)
    energy = 0.0
    for e, rows in rows_by_expert:
        im = None if means is None else means[e * per_row : (e + 1) * per_row]
        w = np.ones(per_row, np.float64) if im is None else im.astype(np.float64)
        energy += float((rows.astype(np.float64) ** 2 @ w).sum())
        for t in types:
            d = ggml.round_trip(rows, t, im) - rows
            err[t] += float((d.astype(np.float64) ** 2 @ w).sum())
    return {t: v / max(energy, 1e-30) for t, v in err.items()}


def measure_sensitivity(src: Path, imatrix: Path | None, threads: int = 0) -> Sensitivity:
    """Every quantizable tensor of the F16 GGUF ``src`` (as llama.cpp's dry run lists them), one at a
    time, round-tripped through each candidate type by ggml (on rows spread over the tensor)."""
    means = Imatrix.load(imatrix).means() if imatrix is not None else {}
    dry = dry_run(src, "Q8_0")
    reader = open_gguf(src)
    data = {t.name: t for t in reader.tensors}
    out: list[TensorOptions] = []
    jobs = []
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # ggml's quantizers release the GIL
        for name, d in dry.items():
            if not d.quantized:
                continue
            types = tuple(t for t in options_for(d.ne, name in means) if not ggml.requires_imatrix(t) or name in means)
            if not types:
                continue
            job = pool.submit(lambda arr, ts, im, n: _tensor_errors(_sampled_rows(arr, n), ts, im, n),
                              data[name].data, types, means.get(name), d.ne[0])  # rows read in the worker, from the map
            jobs.append((name, d, types, job))
        for name, d, types, job in progress(jobs, len(jobs), "sensitivity (tensors)"):
            cls, block = tensor_class(name)
            out.append(TensorOptions(name, cls, block, d.ne, {t: d.rows * ggml.row_size(t, d.ne[0]) for t in types},
                                     job.result()))
    chosen = {t.name for t in out}
    fixed = sum(d.nbytes for n, d in dry.items() if n not in chosen)
    n_weights = sum(math.prod(d.ne) for d in dry.values())
    cands = tuple(dict.fromkeys(t for o in out for t in o.bytes))
    return Sensitivity(fixed, n_weights, tuple(out), cands)


# --- the predictor and the allocation ------------------------------------------------------------


@dataclass(frozen=True)
class Predictor:
    """Predicted mean KL divergence of a plan: ``sum over tensors of class[cls] * group[depth] * error``.

    Unfitted (every weight 1) it is the plain sum of weighted errors; :mod:`quantize.mix_fit` fits the
    weights on probe files of the model being built."""

    classes: dict[str, float] = field(default_factory=dict)
    groups: dict[str, float] = field(default_factory=dict)
    n_groups: int = 1
    n_layers: int = 1

    def group(self, t: TensorOptions) -> str:
        if t.block is None:
            return "head"
        return f"g{min(self.n_groups - 1, t.block * self.n_groups // max(self.n_layers, 1))}"

    def weight(self, t: TensorOptions) -> float:
        return self.classes.get(t.cls, 1.0) * self.groups.get(self.group(t), 1.0)

    def predict(self, sens: Sensitivity, plan: Mapping[str, str]) -> float:
        return sum(self.weight(t) * t.error[plan[t.name]] for t in sens.tensors)


def _hull(t: TensorOptions, w: float) -> list[tuple[int, float, str]]:
    """The options of ``t`` on the lower convex hull of (bytes, weighted error), cheapest first."""
    pts = sorted(((t.bytes[q], w * t.error[q], q) for q in t.bytes), key=lambda p: (p[0], p[1]))
    pareto: list[tuple[int, float, str]] = []
    for p in pts:
        if not pareto or p[1] < pareto[-1][1]:
            if pareto and p[0] == pareto[-1][0]:
                pareto.pop()
            pareto.append(p)
    hull: list[tuple[int, float, str]] = []
    for p in pareto:
        while len(hull) >= 2:
            (b0, e0, _), (b1, e1, _) = hull[-2], hull[-1]
            if (e0 - e1) * (p[0] - b1) <= (e1 - p[1]) * (b1 - b0):  # the middle point is not below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(sens: Sensitivity, predictor: Predictor, limit: int, where: Path | None = None) -> dict[str, str]:
    """Each tensor's type: minimal predicted KL divergence with tensor bytes at most ``limit``."""
    if sens.smallest() > limit:
        raise QuantizeError(where, f"budget of {limit:,} tensor bytes is below the smallest mix this model can take "
                            f"({sens.smallest():,} bytes, every tensor at its smallest candidate type)")
    hulls = {t.name: _hull(t, predictor.weight(t)) for t in sens.tensors}
    at = dict.fromkeys(hulls, 0)
    used = sens.fixed_bytes + sum(h[0][0] for h in hulls.values())
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            heapq.heappush(heap, (-(h[i][1] - h[i + 1][1]) / (h[i + 1][0] - h[i][0]), name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        step = h[i + 1][0] - h[i][0]
        if used + step <= limit:
            used += step
            at[name] = i + 1
            push(name)
    plan = {name: hulls[name][i][2] for name, i in at.items()}
    # bytes the hull walk left: any single change that still fits and lowers the cost, best per byte first
    by_name = {t.name: t for t in sens.tensors}
    while True:
        best: tuple[float, str, str, int] | None = None
        for t in sens.tensors:
            w, cur = predictor.weight(t), plan[t.name]
            for q, b in t.bytes.items():
                extra, gain = b - t.bytes[cur], w * (t.error[cur] - t.error[q])
                if gain > 0 and used + extra <= limit:
                    ratio = gain / max(extra, 1)
                    if best is None or ratio > best[0]:
                        best = (ratio, t.name, q, extra)
        if best is None:
            break
        _, name, q, extra = best
        plan[name], used = q, used + extra
    assert used == sens.fixed_bytes + sum(by_name[n].bytes[q] for n, q in plan.items())
    return plan


def plan_bytes(sens: Sensitivity, plan: Mapping[str, str]) -> int:
    return sens.fixed_bytes + sum(t.bytes[plan[t.name]] for t in sens.tensors)


@dataclass(frozen=True)
class Limit:
    """What a budget allows for a model, and the stock type the mix is measured against."""

    bytes: int  # tensor bytes the budget allows
    stock: str | None  # None: no stock type fits the budget
    stock_plan: dict[str, DryTensor]  # llama.cpp's dry run of the stock type


def budget_limit(budget: Budget, src: Path, sens: Sensitivity) -> Limit:
    """The budget's tensor bytes for ``src`` and its stock type (the budget's own type, else the largest of
    :data:`STOCK` whose dry run fits), each stock type's dry run made once."""
    if budget.kind == "type":
        plan = dry_run(src, str(budget.value))
        return Limit(tensor_bytes(plan), str(budget.value), plan)
    limit = int(float(budget.value) * sens.n_weights / 8) if budget.kind == "bpw" else int(budget.value)
    best = Limit(limit, None, {})
    for t in STOCK:
        plan = dry_run(src, t)
        if tensor_bytes(best.stock_plan) < tensor_bytes(plan) <= limit:
            best = Limit(limit, t, plan)
    return best


def compare_with_stock(sens: Sensitivity, plan: Mapping[str, str], stock: Mapping[str, DryTensor]) -> tuple[int, int]:
    """How many tensors the plan gives more bytes than the stock type does, and how many fewer."""
    raised = lowered = 0
    for t in sens.tensors:
        mine, theirs = t.bytes[plan[t.name]], stock[t.name].nbytes
        raised += mine > theirs
        lowered += mine < theirs
    return raised, lowered
