"""Stage 4: the quality gate.  Perplexity and KL divergence of every artifact against the fp16
reference, with one method for every format so the numbers compare.

Method (llama.cpp's ``llama-perplexity``, so figures line up with published ones): the text is
tokenized once with the reference tokenizer, BOS first, and cut into non-overlapping windows of
``ctx`` tokens; each window's first token is replaced by BOS and only the second half is scored.  The
same token windows go to every artifact.

The reference's distributions are computed once per (model, text, ctx, chunks) and cached on
disk, as llama.cpp's ``--kl-divergence-base`` does, in the form every comparison reads: the *full*
distribution (each token's probability relative to the row's top token, float32), never a top-k
truncation, with the per-row terms of the KL divergence that depend on the reference alone.
Artifacts then stream through window by window, so memory is bounded by one window's logits
whatever the text length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gguf
import numpy as np
import psutil

from quantize.architectures import ARCHITECTURES
from quantize.atomic import atomic_dir, atomic_file, sha256_file
from quantize.awq import AwqSource
from quantize.budget import BUDGET_KEY, MIX_SUFFIX, parse_budget
from quantize.engine.stream import (
    CheckpointSource,
    StreamedModel,
    StreamSettings,
    TensorSource,
    check_stream_fits,
    resolve_device,
    stream_need,
)
from quantize.errors import QuantizeError
from quantize.fingerprint import fingerprint
from quantize.formats.gguf_read import read_header
from quantize.gate_kernel import row_sums
from quantize.portable import reserve_space
from quantize.progress import progress
from quantize.text import hf_tokenizer, read_text, token_windows, with_bos
from quantize.thresholds import DEFAULT_THRESHOLDS, Threshold

# torch, llama_cpp and matplotlib are imported inside the functions that use them: each takes seconds to
# import, and a build whose steps are all up to date needs none of them.

log = logging.getLogger(__name__)

ROWS_PER_SOFTMAX = 64  # bound the float32 scratch of log-softmax over large vocabularies
LN2_INV = math.log2(math.e)  # log2 e: natural log = base-2 log / log2 e
METRIC_BLOCK_ENTRIES = 1 << 20  # float32 entries per row block of window_metrics (4 MiB per buffer: fewer, longer torch calls)
REFERENCE_FORMAT = 4  # the reference cache's layout (3: float32 probabilities relative to each row's top token; 4: windows cut from [BOS, *text])
REFERENCE_ARRAYS = ("w", "c", "s", "top")  # per window, in reference_rows' order


@dataclass(frozen=True)
class EvalSettings:
    ctx: int = 512
    chunks: int | None = None  # None: every full window of the text
    threads: int = 0
    device: str = "auto"  # where torch engines (the float32 reference, AWQ folders) run: auto, cuda or cpu
    batch_tokens: int = 4096  # torch engines: windows per block call


class Engine(Protocol):
    """Something that returns, window by window, float32 logits of the scored positions."""

    n_vocab: int

    def scored_logits(self, tokens: np.ndarray, rows: slice) -> Iterator[np.ndarray]: ...


# --- engines ------------------------------------------------------------------------------


class StreamedEngine:
    """A Hugging Face model (or an AWQ folder, dequantized tensor by tensor) in torch, one decoder block
    resident at a time, over all windows at once (:mod:`quantize.engine.stream`)."""

    def __init__(self, folder: Path, settings: EvalSettings, source: TensorSource | None = None, dtype: str = "float32") -> None:
        self.folder = folder
        self.source = source or CheckpointSource.open(folder)
        self.stream = StreamSettings(resolve_device(settings.device, folder), dtype, settings.batch_tokens)
        self.model = StreamedModel(folder, self.source, self.stream)
        self.n_vocab = self.model.n_vocab

    def scored_logits(self, tokens: np.ndarray, rows: slice) -> Iterator[np.ndarray]:
        config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        need = stream_need(self.source, config, self.stream.dtype, tokens.size, self.stream.batch_tokens,
                           head_rows=len(range(*rows.indices(tokens.shape[1]))))
        log.info("%s: streamed in torch (%s on %s); RAM needed: %s", self.folder.name, self.stream.dtype, self.stream.device,
                 need.describe())
        spill = check_stream_fits(self.folder, need, f"evaluating {self.folder.name}")
        yield from self.model.logits(tokens, rows, spill)


class LlamaCppEngine:
    """A GGUF in llama.cpp (llama-cpp-python), from a memory map.  Each window is one ``llama_decode``
    whose batch asks for the logits of the scored rows only, so the output projection runs on those
    positions alone; the logits are read in place from llama.cpp's buffer, not copied."""

    def __init__(self, path: Path, ctx: int, threads: int = 0) -> None:
        import llama_cpp as L
        from llama_cpp import Llama

        _log_mapped_memory(path)
        self.path, self.ctx = path, ctx
        self.llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=False,
                         verbose=False, n_threads=threads or os.cpu_count() or 1)
        self.n_vocab = self.llm.n_vocab()
        self._batch = L.llama_batch_init(ctx, 0, 1)
        self._layout: tuple[int, slice] | None = None  # the window shape the batch's fixed fields are set for
        self._free_batch = L.llama_batch_free  # held: a finaliser at interpreter exit cannot import

    def __del__(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._free_batch(self._batch)
            self._batch = None

    def _decode(self, ids: np.ndarray, rows: slice) -> np.ndarray:
        """Logits of ``rows`` of one window (a view of llama.cpp's buffer, valid until the next decode)."""
        import llama_cpp as L

        ctx, b, n = self.llm._ctx.ctx, self._batch, len(ids)
        if self._layout != (n, rows):  # positions, sequence and logits flags: set once per window shape
            for i in range(n):
                b.seq_id[i][0] = 0
            np.ctypeslib.as_array(b.pos, shape=(n,))[:] = np.arange(n)
            np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
            flags = np.zeros(n, np.int8)
            flags[rows] = 1
            np.ctypeslib.as_array(b.logits, shape=(n,))[:] = flags
            b.n_tokens, self._layout = n, (n, rows)
        np.ctypeslib.as_array(b.token, shape=(n,))[:] = ids
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        if L.llama_decode(ctx, b) != 0:
            raise QuantizeError(self.path, "llama.cpp failed to evaluate a window (llama_decode)")
        return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(range(*rows.indices(n))), self.n_vocab))

    def scored_logits(self, tokens: np.ndarray, rows: slice) -> Iterator[np.ndarray]:
        for w in range(tokens.shape[0]):
            yield self._decode(tokens[w], rows)

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=False))

    @property
    def bos(self) -> int | None:
        b = self.llm.token_bos()
        return None if b < 0 else int(b)


def _log_mapped_memory(path: Path) -> None:
    """State what a GGUF needs: llama.cpp maps it, so it runs at full speed with about its file size of free
    RAM, and with less still runs, reading pages from disk again for every window (much slower)."""
    size, avail = path.stat().st_size, psutil.virtual_memory().available
    log.info("%s: runs in llama.cpp from a memory map; RAM needed about its size, %.2f GiB (%.1f GiB available)",
             path.name, size / 2**30, avail / 2**30)
    if size > avail:
        log.warning("%s (%.1f GiB) is larger than the free RAM (%.1f GiB): llama.cpp will page it in from disk for every "
                    "window, much more slowly; the figures are the same", path.name, size / 2**30, avail / 2**30)


def _awq_engine(path: Path, settings: EvalSettings) -> Engine:
    return StreamedEngine(path, settings, AwqSource.open(path))


def artifact_kind(path: Path) -> str:
    """The gate's row for an artifact: the GGUF file type (a searched mix: ``<budget>-mix``), ``AWQ``/``RTN``,
    or ``HF``."""
    if path.is_file():
        kv = read_header(path).kv
        return parse_budget(kv[BUDGET_KEY]).mix_kind if kv.get(BUDGET_KEY) else file_type_name(kv)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise QuantizeError(path, "not a GGUF file nor a checkpoint folder with config.json")
    qc = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") == "awq":
        prov = path / "provenance.json"
        method = json.loads(prov.read_text()).get("method", "awq") if prov.is_file() else "awq"
        return "RTN" if method == "rtn" else "AWQ"
    return "HF"


def file_type_name(kv: dict[str, Any]) -> str:
    """A GGUF header's ``general.file_type`` by name (``Q4_K_M``)."""
    ft = kv.get("general.file_type")
    try:
        name = gguf.LlamaFileType(ft).name if ft is not None else "?"
    except ValueError:
        name = str(ft)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


ENGINES: dict[str, Callable[[Path, EvalSettings], Engine]] = {
    "gguf": lambda p, s: LlamaCppEngine(p, s.ctx, s.threads),
    "awq": _awq_engine,
    "hf": lambda p, s: StreamedEngine(p, s),
}


def open_engine(path: Path, settings: EvalSettings) -> Engine:
    kind = "gguf" if path.is_file() else ("awq" if artifact_kind(path) in ("AWQ", "RTN") else "hf")
    return ENGINES[kind](path, settings)


# --- math --------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, in row blocks so 262k-token vocabularies stay cheap."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    out = torch.empty_like(x)
    for r in range(0, x.shape[0], ROWS_PER_SOFTMAX):
        out[r : r + ROWS_PER_SOFTMAX] = torch.log_softmax(x[r : r + ROWS_PER_SOFTMAX], dim=-1)
    return out.numpy()


def reference_rows(logp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What every artifact's comparison needs of the reference's rows, computed once: each token's
    probability relative to the row's top token ``w = exp(logp - max logp)`` (float32, the full
    distribution), the top token's log-probability ``c = -log sum w`` in that distribution, the
    relative entropy term ``s = sum w log w`` (both float64) and the top token."""
    import torch

    lp = torch.from_numpy(np.ascontiguousarray(logp, dtype=np.float32))
    w = np.empty(lp.shape, np.float32)
    c, s = np.empty(len(lp), np.float64), np.empty(len(lp), np.float64)
    top = lp.argmax(-1)
    for r in range(0, len(lp), ROWS_PER_SOFTMAX):
        u = lp[r : r + ROWS_PER_SOFTMAX] - lp[r : r + ROWS_PER_SOFTMAX].amax(-1, keepdim=True)
        e = torch.from_numpy(w[r : r + ROWS_PER_SOFTMAX])
        torch.exp(u, out=e)
        c[r : r + ROWS_PER_SOFTMAX] = -e.sum(-1, dtype=torch.float64).log().numpy()
        s[r : r + ROWS_PER_SOFTMAX] = torch.linalg.vecdot(e.double(), u.double()).numpy()
    return w, c, s, top.numpy().astype(np.int64)


def row_sums_torch(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`quantize.gate_kernel.row_sums` computes, with torch (where no C compiler is): per
    row, ``max x``, ``sum 2^b`` and ``sum w b`` with ``b = (x - max x) log2 e``.  Row blocks of
    METRIC_BLOCK_ENTRIES stay in cache: ``b`` in one pass, the dot product, then ``exp2`` in place
    and its sum, in float32 with torch's cascade sums (torch's ``exp2`` is several times faster
    than its ``exp``)."""
    import torch

    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    top, sum2, dot = torch.empty(len(x)), torch.empty(len(x), dtype=torch.float64), torch.empty(len(x), dtype=torch.float64)
    rows = max(1, min(METRIC_BLOCK_ENTRIES // x.shape[1], len(x)))
    b_buf = torch.empty(rows, x.shape[1])
    for r in range(0, len(x), rows):
        sl = slice(r, r + rows)
        xb = xt[sl]
        m = xb.amax(-1, keepdim=True)
        b = torch.add(m * -LN2_INV, xb, alpha=LN2_INV, out=b_buf[: len(xb)])
        dot[sl] = torch.linalg.vecdot(wt[sl], b).double()
        sum2[sl] = torch.exp2_(b).sum(-1).double()
        top[sl] = m[:, 0]
    return top.numpy(), sum2.numpy(), dot.numpy()


def window_metrics(logits: np.ndarray, ref_rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                   targets: np.ndarray, threads: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scored token: negative log-likelihood of the target, KL(reference || artifact) and
    whether both put the same token on top.

    The artifact's logits ``x`` are read in place; one pass over each row after its maximum gives
    ``S = sum 2^b`` and ``D = sum w b`` with ``b = (x - max x) log2 e`` (the compiled kernel of
    :mod:`quantize.gate_kernel`, else :func:`row_sums_torch`).  With the reference's cached ``w``,
    ``c`` and ``s`` (:func:`reference_rows`), ``KL = c + e^c (s - D / log2 e) + log S``; the
    target's log-likelihood is ``x_t - max x - log S``, and the top tokens agree when the
    reference's top has the row's maximum.  The kernel runs ``threads`` threads (0: every core)."""
    x = np.ascontiguousarray(logits, dtype=np.float32)
    w, c, s, top_r = ref_rows
    w = np.ascontiguousarray(w, dtype=np.float32)
    sums = row_sums(x, w, threads)
    m, sum2, dot = sums if sums is not None else row_sums_torch(x, w)
    rows = np.arange(len(x))
    lse = np.log(sum2)
    nll = lse - (x[rows, targets] - m).astype(np.float64)
    top = x[rows, top_r] >= m  # the reference's top token is the artifact's too
    kld = c + np.exp(c) * (s - dot / LN2_INV) + lse
    return nll, kld, top


# --- reference cache ------------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    tokens: np.ndarray  # (n_windows, ctx), BOS already in place
    text_sha256: str
    n_text_tokens: int

    @property
    def first(self) -> int:
        return self.tokens.shape[1] // 2  # score positions first .. ctx-2 (predicting first+1 .. ctx-1)

    @property
    def rows(self) -> slice:
        return slice(self.first, self.tokens.shape[1] - 1)


def make_windows(ids: list[int], bos: int | None, text_file: Path, settings: EvalSettings) -> Windows:
    tokens = token_windows(with_bos(ids, bos), settings.ctx, settings.chunks, bos, text_file, "evaluation window")
    return Windows(tokens, sha256_file(text_file), len(ids))


@dataclass
class Reference:
    """The reference's stored distributions for every scored position, memory-mapped."""

    root: Path
    windows: Windows
    ppl: float = 0.0
    nll: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _maps: list[np.ndarray] = field(default_factory=list, repr=False)

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Window ``w``'s stored rows, as :func:`reference_rows` returns them (mapped copy-on-write, not read ahead)."""
        if not self._maps:
            self._maps = [np.load(self.root / f"{f}.npy", mmap_mode="c") for f in REFERENCE_ARRAYS]
        w_, c, s, top = (m[w] for m in self._maps)
        return w_, c, s, top


def reference_logprobs(ref_path: Path, text_file: Path, settings: EvalSettings, cache_root: Path) -> Reference:
    """Tokenize once, run the reference once over every window, cache its distributions; reuse when cached."""
    engine, tokenize, bos = _reference_engine(ref_path, settings)
    text = read_text(text_file)
    windows = make_windows(tokenize(text), bos, text_file, settings)
    key = hashlib.sha256(json.dumps([REFERENCE_FORMAT, fingerprint(ref_path), windows.text_sha256, settings.ctx,
                                     settings.chunks]).encode()).hexdigest()[:20]
    root = cache_root / key
    if not (root / "meta.json").is_file():
        log.info("computing reference log-probabilities (%d windows) into %s", len(windows.tokens), root)
        _write_reference(root, engine(), windows)
    else:
        log.info("reference log-probabilities cached at %s", root)
    cached = np.load(root / "tokens.npy")
    if not np.array_equal(cached, windows.tokens):
        raise QuantizeError(root, "cached reference windows differ from this text's; delete the cache folder")
    meta = json.loads((root / "meta.json").read_text())
    return Reference(root, windows, meta["ppl"], np.load(root / "nll.npy"))


def _reference_engine(ref_path: Path, settings: EvalSettings) -> tuple[Callable[[], Engine], Callable[[str], list[int]], int | None]:
    if ref_path.is_file():  # an F16 GGUF in llama.cpp
        eng = LlamaCppEngine(ref_path, settings.ctx, settings.threads)
        return (lambda: eng), eng.tokenize, eng.bos
    if not (ref_path / "config.json").is_file():
        raise QuantizeError(ref_path, "reference must be an HF checkpoint folder or an F16 GGUF")

    src = CheckpointSource.open(ref_path)  # an incomplete checkpoint is refused before tokenizing
    if src.ckpt.architecture not in ARCHITECTURES:  # model-level steps (embedding/logit multipliers) unknown here
        raise QuantizeError(ref_path / "config.json", f"the streamed float32 reference runs the families of this tool's table; "
                            f"{src.ckpt.architecture} is not one: pass its F16 GGUF as the reference (its converter's "
                            "output was checked against HF's logits)")
    tok = hf_tokenizer(ref_path)
    return (lambda: StreamedEngine(ref_path, settings)), tok.encode, tok.bos


def _disk_backed_npy(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new float32 ``.npy`` file mapped for writing, its blocks reserved on disk first."""
    w = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    with open(path, "r+b") as f:
        reserve_space(f.fileno(), w.offset + w.nbytes, path)
    return w


def _write_reference(root: Path, engine: Engine, windows: Windows) -> None:
    """Log-softmax of each window's scored rows, stored as :func:`reference_rows` (float32 ``w`` straight to disk)."""
    n, ctx = windows.tokens.shape
    first, rows = windows.first, ctx - 1 - windows.first
    with atomic_dir(root) as tmp:
        w = _disk_backed_npy(tmp / "w.npy", (n, rows, engine.n_vocab))
        c, s = np.zeros((n, rows), np.float64), np.zeros((n, rows), np.float64)
        top = np.zeros((n, rows), np.int64)
        nll = np.zeros((n, rows), np.float64)
        logits = engine.scored_logits(windows.tokens, windows.rows)
        for i, window_logits in progress(enumerate(logits), n, "reference log-probabilities"):
            logp = log_softmax(window_logits)
            w[i], c[i], s[i], top[i] = reference_rows(logp)
            nll[i] = -logp[np.arange(rows), windows.tokens[i, first + 1 :]]
        w.flush()
        del w
        for name, arr in (("c", c), ("s", s), ("top", top), ("nll", nll)):
            np.save(tmp / f"{name}.npy", arr)
        np.save(tmp / "tokens.npy", windows.tokens)
        (tmp / "meta.json").write_text(json.dumps({"ppl": math.exp(float(nll.mean())), "windows": n, "ctx": ctx}))


# --- metrics and the gate ------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactResult:
    name: str
    kind: str
    size_bytes: int
    ppl: float
    ppl_stderr: float
    ppl_ratio: float
    ln_ppl_ratio_stderr: float
    mean_kld: float
    kld_stderr: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1_agreement: float
    threshold: Threshold | None
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def score_artifact(path: Path, ref: Reference, settings: EvalSettings, thresholds: dict[str, Threshold],
                   engine: Engine | None = None) -> ArtifactResult:
    kind = artifact_kind(path)
    engine = engine or open_engine(path, settings)
    ref_vocab = np.load(ref.root / "w.npy", mmap_mode="r").shape[2]
    if engine.n_vocab != ref_vocab:
        raise QuantizeError(path, f"vocabulary of {engine.n_vocab} tokens differs from the reference's {ref_vocab}; "
                            "not the same model")
    tokens, first = ref.windows.tokens, ref.windows.first
    nll, kld, top1 = [], [], []
    logits = engine.scored_logits(tokens, ref.windows.rows)
    for w, window_logits in progress(enumerate(logits), tokens.shape[0], f"eval {path.name}"):
        n, k, t = window_metrics(window_logits, ref.window(w), tokens[w, first + 1 :], settings.threads)
        nll.append(n)
        kld.append(k)
        top1.append(t)
    nll_a, kld_a, top_a = np.concatenate(nll).astype(np.float64), np.concatenate(kld).astype(np.float64), np.concatenate(top1)
    ref_nll = ref.nll.reshape(-1)
    m = len(nll_a)
    ppl = math.exp(nll_a.mean())
    diff = nll_a - ref_nll
    result: dict[str, Any] = dict(
        name=path.name, kind=kind, size_bytes=_size(path), ppl=ppl,
        ppl_stderr=ppl * float(nll_a.std(ddof=1)) / math.sqrt(m),  # delta method on exp(mean nll)
        ppl_ratio=math.exp(float(diff.mean())), ln_ppl_ratio_stderr=float(diff.std(ddof=1)) / math.sqrt(m),
        mean_kld=float(kld_a.mean()), kld_stderr=float(kld_a.std(ddof=1)) / math.sqrt(m),
        kld_p99=float(np.percentile(kld_a, 99)), kld_p999=float(np.percentile(kld_a, 99.9)), kld_max=float(kld_a.max()),
        top1_agreement=float(top_a.mean()),
    )
    # a searched mix passes its own row, else its stock type's (its file type)
    th = thresholds.get(kind) or (thresholds.get(file_type_name(read_header(path).kv)) if kind.endswith(MIX_SUFFIX) else None)
    failures = []
    if th is not None:
        # "not <=" so that a NaN (a broken artifact) fails too
        if not result["ppl_ratio"] <= th.ppl_ratio:
            failures.append(f"{path.name}: perplexity ratio {result['ppl_ratio']:.4f} > limit {th.ppl_ratio} ({kind})")
        if not result["mean_kld"] <= th.mean_kld:
            failures.append(f"{path.name}: mean KLD {result['mean_kld']:.5f} > limit {th.mean_kld} ({kind})")
    return ArtifactResult(**result, threshold=th, failures=tuple(failures))


@dataclass(frozen=True)
class EvalReport:
    reference: str
    reference_ppl: float
    text: str
    text_sha256: str
    n_text_tokens: int
    windows: int
    ctx: int
    scored_tokens: int
    results: tuple[ArtifactResult, ...]

    @property
    def failures(self) -> list[str]:
        return [f for r in self.results for f in r.failures]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = not self.failures
        return d

    def to_markdown(self) -> str:
        lines = [
            f"Reference `{self.reference}`: perplexity {self.reference_ppl:.4f} on `{self.text}` "
            f"({self.scored_tokens} scored tokens, {self.windows} windows of {self.ctx}).",
            "",
            "| artifact | type | size | PPL | PPL ratio | mean KLD | KLD p99 | KLD p99.9 | same top token | verdict |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.results:
            verdict = "no threshold" if r.threshold is None else ("pass" if r.passed else "**FAIL**")
            lines.append(
                f"| {r.name} | {r.kind} | {r.size_bytes / 2**20:.1f} MiB | {r.ppl:.3f} ± {r.ppl_stderr:.3f} | "
                f"{r.ppl_ratio:.4f} ± {r.ln_ppl_ratio_stderr * r.ppl_ratio:.4f} | {r.mean_kld:.5f} | {r.kld_p99:.4f} | "
                f"{r.kld_p999:.4f} | {r.top1_agreement:.2%} | {verdict} |")
        return "\n".join(lines) + "\n"


def plot(report: EvalReport, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((axes[0], "mean_kld", "mean KL divergence"), (axes[1], "ppl_ratio", "perplexity ratio")):
        stock = sorted((r for r in report.results if r.name.endswith(".gguf") and not r.kind.endswith(MIX_SUFFIX)),
                       key=lambda r: r.size_bytes)
        if len(stock) > 1:  # the stock types' size/quality curve, which a searched mix is measured against
            ax.plot([r.size_bytes / 2**20 for r in stock], [getattr(r, metric) for r in stock], color="0.7", zorder=0)
        for r in report.results:
            mixed = r.kind.endswith(MIX_SUFFIX)
            ax.scatter(r.size_bytes / 2**20, getattr(r, metric), marker="*" if mixed else "o", s=90 if mixed else 30)
            ax.annotate(r.kind, (r.size_bytes / 2**20, getattr(r, metric)), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("size (MiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Quality vs size against {report.reference}")
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def evaluate(reference: str | Path, text: str | Path, artifacts: list[str | Path], settings: EvalSettings = EvalSettings(),
             cache_root: str | Path = Path("artifacts") / "eval-cache", thresholds: dict[str, Threshold] | None = None) -> EvalReport:
    ref_path, text_file = Path(reference), Path(text)
    for a in artifacts:
        if not Path(a).exists():
            raise QuantizeError(a, "artifact not found")
    ref = reference_logprobs(ref_path, text_file, settings, Path(cache_root))
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    results = tuple(score_artifact(Path(a), ref, settings, th) for a in artifacts)
    for r in results:
        log.info("%s: ppl ratio %.4f, mean KLD %.5f, top-1 %.2f%%", r.name, r.ppl_ratio, r.mean_kld, 100 * r.top1_agreement)
    return EvalReport(str(ref_path.name), ref.ppl, text_file.name, ref.windows.text_sha256, ref.windows.n_text_tokens,
                      len(ref.windows.tokens), settings.ctx, int(ref.nll.size), results)


def write_report(report: EvalReport, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md", "png": out_dir / "eval.png"}
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report.to_json(), indent=2))
    with atomic_file(paths["md"]) as tmp:
        tmp.write_text(report.to_markdown())
    plot(report, paths["png"])
    return paths
