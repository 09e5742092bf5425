"""Stage 1: Hugging Face float checkpoint -> GGUF (F16, BF16 or F32), streamed.

The plan (every tensor's GGUF name, type and shape) is made and validated from the safetensors
headers and ``config.json`` before the output file is opened.  Tensors are then streamed shard by
shard in file order, in bounded chunks.  A tensor stored as the GGUF stores it (no transform, same
type) is copied file to file (:func:`quantize.portable.copy_range`: in the kernel where the system
offers it); the others are converted in row chunks through a memory map.  Each shard's sha256 is computed from that memory map in the same
pass, on a second thread, whose pages are released as soon as they are written, so peak memory
does not grow with model size; the hashes are patched into the already-written header at the end
(the header precedes the data, so they cannot be known when it is written).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np

from quantize.architectures import ARCHITECTURES, F32_TENSORS, MODEL_TENSORS, Architecture, ModelConfig, Transform, lookup
from quantize.atomic import atomic_file, check_output, sha256_file
from quantize.errors import QuantizeError
from quantize.fingerprint import file_key, remember_sha256s, remembered
from quantize.formats.checkpoint import Checkpoint, Shard, ShardStream, TensorRef, as_array, open_checkpoint, tokenizer_files
from quantize.formats.gguf_write import PLACEHOLDER, Writer, append_range, patch_strings
from quantize.formats.vocab import Vocab, read_vocab
from quantize.llama_converter import convert_external
from quantize.progress import progress
from quantize.versions import HASH_KEY, add_provenance

log = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class OutType:
    qtype: gguf.GGMLQuantizationType
    file_type: gguf.LlamaFileType


OUTTYPES: dict[str, OutType] = {
    "f16": OutType(Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": OutType(Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "f32": OutType(Q.F32, gguf.LlamaFileType.ALL_F32),
}

CHUNK_BYTES = 32 << 20  # rows are converted and written this many source bytes at a time
STORED_AS = {"F16": Q.F16, "BF16": Q.BF16, "F32": Q.F32}  # safetensors dtypes whose bytes are a GGUF type's bytes


@dataclass(frozen=True)
class TensorPlan:
    name: str  # GGUF name
    refs: tuple[TensorRef, ...]  # the HF tensor, or every expert's (stacked along a new first axis); none if generated
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order, as in the HF file (experts first when stacked)
    transform: Transform | None
    row_align: int  # chunks hold whole multiples of this many rows (the transform works per head)
    data: np.ndarray | None = None  # generated tensors only

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape, dtype=np.int64))
        return n * (4 if self.qtype == Q.F32 else 2)


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    n_tensors: int
    n_bytes: int
    sources: dict[str, str]  # file name -> sha256


def _out_qtype(name: str, kind: gguf.MODEL_TENSOR, ndim: int, outtype: OutType) -> gguf.GGMLQuantizationType:
    # llama.cpp keeps 1-D tensors, norms and routers in F32 (convert_hf_to_gguf.py prepare_tensors).
    if ndim <= 1 or name.endswith("_norm.weight") or kind in F32_TENSORS:
        return Q.F32
    return outtype.qtype


EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")  # one expert's matrix: <block>.experts.<id>.<name>


def _map_name(tmap: gguf.TensorNameMap, name: str) -> tuple[gguf.MODEL_TENSOR, str, int | None] | None:
    """(kind, GGUF name, expert id) of an HF tensor name; experts map through their stacked name."""
    m = EXPERT.match(name)
    mapped = tmap.get_type_and_name(f"{m[1]}.{m[3]}" if m else name, try_suffixes=(".weight", ".bias"))
    return None if mapped is None else (*mapped, int(m[2]) if m else None)


def plan_tensors(ckpt: Checkpoint, arch: Architecture, cfg: ModelConfig, outtype: OutType) -> list[TensorPlan]:
    """Map and validate every tensor against the config; fail before anything is written.  Experts'
    matrices are gathered into one 3-D tensor, placed where the first of them lies in file order."""
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, cfg.n_layer)
    dims = cfg.dims
    plans: list[TensorPlan | None] = []
    extra = arch.extra_tensors(cfg)
    for name, data in extra.items():
        plans.append(TensorPlan(name, (), Q.F32, data.shape, None, 1, data))
    experts: dict[str, dict[int, TensorRef]] = {}
    slots: dict[str, int] = {}  # stacked GGUF name -> its place in plans
    kinds: dict[str, gguf.MODEL_TENSOR] = {}
    for shard in ckpt.shards:
        for ref in shard.tensors:
            if ref.name.endswith(arch.ignored_suffixes):
                continue
            mapped = _map_name(tmap, ref.name)
            if mapped is None or mapped[0] not in arch.shapes or (ref.name.endswith(".bias") and mapped[0] not in arch.biases):
                block = next((p for p in ref.name.split(".") if p.isdecimal()), None)
                if block is not None and int(block) >= cfg.n_layer:
                    why = f"belongs to block {block} but config.json says num_hidden_layers={cfg.n_layer}"
                else:
                    why = f"is not part of a {arch.hf_name} checkpoint"
                raise QuantizeError(shard.path, f"tensor {ref.name!r} {why}")
            kind, name, expert = mapped
            if kind == gguf.MODEL_TENSOR.OUTPUT and cfg.tie_embeddings:
                continue  # a copy of the embeddings some tied checkpoints carry; llama.cpp reuses token_embd
            want = tuple(dims[d] for d in arch.shapes[kind])
            if expert is not None:
                if expert >= cfg.n_expert:
                    raise QuantizeError(shard.path, f"tensor {ref.name!r} is expert {expert} but config.json has {cfg.n_expert} experts")
                want = want[1:]
            elif ref.name.endswith(".bias"):
                want = want[:1]
            if ref.shape != want:
                raise QuantizeError(
                    shard.path,
                    f"tensor {ref.name!r} has shape {list(ref.shape)} but config.json implies {list(want)}; "
                    "the config does not describe these weights",
                )
            transform = arch.transforms.get(kind)
            kinds[name] = kind
            if expert is not None:
                experts.setdefault(name, {})[expert] = ref
                if name not in slots:
                    slots[name] = len(plans)
                    plans.append(None)
                continue
            plans.append(TensorPlan(name, (ref,), _out_qtype(name, kind, len(ref.shape), outtype), ref.shape, transform,
                                    cfg.head_dim if transform else 1))
    for name, parts in experts.items():
        if len(parts) != cfg.n_expert:
            missing = sorted(set(range(cfg.n_expert)) - set(parts))
            raise QuantizeError(ckpt.root, f"{name} lacks experts {missing[:8]} of the {cfg.n_expert} config.json declares; "
                                           "incomplete download or wrong config.json")
        refs = tuple(parts[e] for e in range(cfg.n_expert))
        shape = (cfg.n_expert, *refs[0].shape)
        transform = arch.transforms.get(kinds[name])
        plans[slots[name]] = TensorPlan(name, refs, _out_qtype(name, kinds[name], len(shape), outtype), shape, transform,
                                        cfg.head_dim if transform else 1)
    done = [p for p in plans if p is not None]
    _check_complete(ckpt, arch, cfg, {p.name for p in done} | set(extra))
    return done


def _check_complete(ckpt: Checkpoint, arch: Architecture, cfg: ModelConfig, seen: set[str]) -> None:
    for kind in arch.shapes:
        if kind == gguf.MODEL_TENSOR.OUTPUT and cfg.tie_embeddings:
            continue
        base = gguf.TENSOR_NAMES[kind]
        bases = [base] if kind in MODEL_TENSORS else [base.format(bid=b) for b in range(cfg.n_layer)]
        for b in bases:
            for suffix in (".weight", ".bias") if kind in arch.biases else (".weight",):
                if b + suffix not in seen:
                    raise QuantizeError(ckpt.root, f"checkpoint has no tensor for {b}{suffix}; incomplete download or wrong config.json")


def _widen(src: np.ndarray, stored: str) -> np.ndarray:
    """bf16 bits -> float32 (exact), before any transform, so value transforms see values."""
    return (src.astype(np.uint32) << 16).view(np.float32) if stored == "BF16" else src


def _convert_rows(src: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Convert a block of rows to the output type, rounding exactly as llama.cpp's converter does."""
    if qtype == Q.F16:
        return src if src.dtype == np.float16 else src.astype(np.float16)
    if qtype == Q.F32:
        return src.astype(np.float32, copy=False)
    return cast(np.ndarray, gguf.quants.quantize(src.astype(np.float32, copy=False), Q.BF16))


class _StreamedTensor:
    """Duck-types the ``nbytes``/``tofile`` part of ndarray that ``GGUFWriter.write_tensor_data``
    uses, so one tensor is written chunk by chunk while its source bytes are hashed and released.

    ``first`` is the part at the stream's position: it is hashed in the same pass.  A stacked
    tensor's other experts are read where they lie (later in this shard, or in another shard's own
    map) and hashed when the stream reaches them."""

    def __init__(self, plan: TensorPlan, first: TensorRef, cfg: ModelConfig, source: ShardStream, raw: memoryview,
                 hash_async: Callable[[memoryview], Any], shards: dict[Path, Shard]) -> None:
        self.plan, self.first, self.cfg, self.source, self.raw = plan, first, cfg, source, raw
        self.hash_async, self.shards = hash_async, shards
        self.nbytes = plan.nbytes

    def tofile(self, fout: Any) -> None:
        # The gap before this tensor (normally empty) is hashed with its first chunk.
        self.hash_async(self.raw[: len(self.raw) - self.first.nbytes]).result()
        for ref in self.plan.refs:
            if ref is self.first:
                self._write_part(fout, ref, self.source, hashed=True)
            elif ref.shard == self.source.shard.path:
                self._write_part(fout, ref, self.source, hashed=False)
                self.source.drop(ref.begin, ref.end)
            else:
                with ShardStream(self.shards[ref.shard]) as other:
                    self._write_part(fout, ref, other, hashed=False)

    def _write_part(self, fout: Any, ref: TensorRef, source: ShardStream, hashed: bool) -> None:
        p = self.plan
        if p.transform is None and STORED_AS.get(ref.dtype) == p.qtype:  # the bytes as they are: the kernel copies them
            for b0 in range(ref.begin, ref.end, CHUNK_BYTES):  # hashed from the map while the kernel copies
                b1 = min(ref.end, b0 + CHUNK_BYTES)
                pending = self.hash_async(source.view(b0, b1)) if hashed else None
                append_range(fout, source.fd, b0, b1)
                if pending is not None:
                    pending.result()
                    source.release(b1)
            return
        row_bytes = ref.nbytes // ref.shape[0] if ref.shape else ref.nbytes
        rows = ref.shape[0] if ref.shape else 1
        step = max(p.row_align, (CHUNK_BYTES // max(row_bytes, 1)) // p.row_align * p.row_align)
        arr = as_array(ref, source.view(ref.begin, ref.end))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            pending = self.hash_async(source.view(ref.begin + r0 * row_bytes, ref.begin + r1 * row_bytes)) if hashed else None
            block = _widen(arr[r0:r1] if ref.shape else arr, ref.dtype)
            if p.transform is not None:
                block = p.transform(block, self.cfg)
            # file.write, not ndarray.tofile: a full disk then raises OSError with its errno
            fout.write(np.ascontiguousarray(_convert_rows(block, p.qtype)).data)
            if pending is not None:
                pending.result()
                source.release(ref.begin + r1 * row_bytes)
        del arr


def _write_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, arch: Architecture, cfg: ModelConfig, vocab: Vocab,
                    outtype: OutType, side: dict[str, str], name: str | None) -> None:
    total, shared, expert, n_expert = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, ckpt.root, name, total)
    if meta.name is None:
        meta.name = ckpt.root.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    arch.write_hparams(w, cfg)
    w.add_file_type(outtype.file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(w)
    add_provenance(w, arch.hf_name, {**{s.path.name: PLACEHOLDER for s in ckpt.shards}, **side})


def convert(hf_dir: str | Path, out: str | Path, outtype: str = "f16", name: str | None = None) -> ConvertResult:
    """Convert the checkpoint in ``hf_dir`` to a GGUF at ``out`` (written atomically)."""
    if outtype not in OUTTYPES:
        raise QuantizeError(None, f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ot = OUTTYPES[outtype]
    check_output(out, [hf_dir])
    ckpt = open_checkpoint(hf_dir)
    cfg_path = str(ckpt.root / "config.json")
    if ckpt.architecture not in ARCHITECTURES:  # the long tail: llama.cpp's converter, then our checks
        n, sources = convert_external(ckpt, Path(out), outtype)
        return ConvertResult(Path(out), n, Path(out).stat().st_size, sources)
    arch = lookup(ckpt.architecture, cfg_path)
    cfg = arch.read_config(ckpt.config, cfg_path)
    for check in arch.checks:
        check(arch, cfg, ckpt.tensors, cfg_path)
    plans = plan_tensors(ckpt, arch, cfg, ot)
    vocab = read_vocab(ckpt.root, cfg.n_vocab, arch.unembedded_tokens)
    side = {p.name: sha256_file(p) for p in [ckpt.root / "config.json", *tokenizer_files(ckpt.root)] if p.is_file()}
    out = Path(out)
    with atomic_file(out) as tmp:
        w = Writer(tmp, arch.arch_name)
        for p in plans:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32 if p.qtype == Q.F32 else np.float16), p.nbytes, raw_dtype=p.qtype)
        _write_metadata(w, ckpt, arch, cfg, vocab, ot, side, name)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        keys = [file_key(s.path) for s in ckpt.shards]
        shard_hashes = _stream_tensors(w, ckpt, cfg, plans, remembered(keys))
        w.close()
        patch_strings(tmp, HASH_KEY, shard_hashes)
    remember_sha256s([(s.path, digest, key) for s, digest, key in zip(ckpt.shards, shard_hashes, keys, strict=True)])
    sources = dict(zip([s.path.name for s in ckpt.shards], shard_hashes, strict=True)) | side
    log.info("wrote %s (%d tensors)", out, len(plans))
    return ConvertResult(out, len(plans), out.stat().st_size, sources)


def _submitter(pool: ThreadPoolExecutor, h: Any) -> Callable[[memoryview], Future[None]]:
    return lambda data: pool.submit(h.update, data)


class _Known:
    """A shard's sha256 already known (remembered from an earlier pass over the same file): nothing to hash."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    def update(self, data: memoryview) -> None:
        pass

    def hexdigest(self) -> str:
        return self.digest


def _stream_tensors(w: gguf.GGUFWriter, ckpt: Checkpoint, cfg: ModelConfig, plans: list[TensorPlan],
                    known: list[str | None]) -> list[str]:
    """Write every tensor's data in file order; each shard's sha256 (``known``, or hashed in the same pass)."""
    order = {ref.name: (i, ref.begin) for i, shard in enumerate(ckpt.shards) for ref in shard.tensors}
    by_ref = {min(p.refs, key=lambda r: order[r.name]).name: p for p in plans if p.refs}  # each plan's first part in file order
    shards = {s.path: s for s in ckpt.shards}
    for p in plans:
        if p.data is not None:
            w.write_tensor_data(p.data)
    hashes = []
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as pool:
        for shard, digest in progress(zip(ckpt.shards, known, strict=True), len(ckpt.shards), "convert: shards"):
            h: Any = hashlib.sha256() if digest is None else _Known(digest)
            with ShardStream(shard) as stream:
                pool.submit(h.update, stream.view(0, shard.header_len)).result()
                raw = memoryview(b"")
                for ref, raw, _ in stream.tensors():
                    plan = by_ref.get(ref.name)
                    if plan is None:  # ignored tensor, or an expert already written with its stack: hash only
                        pool.submit(h.update, raw).result()
                        stream.release(ref.end)
                        continue
                    w.write_tensor_data(cast(np.ndarray, _StreamedTensor(plan, ref, cfg, stream, raw, _submitter(pool, h), shards)))
                del raw
                pool.submit(h.update, stream.tail()).result()
            hashes.append(h.hexdigest())
    return hashes
