"""Read a Hugging Face checkpoint folder without loading it.

Only the small things are read eagerly (``config.json``, the safetensors headers, the shard
index); tensor bytes stay on disk until the converter streams them, one at a time, through a
memory map.  Everything a later stage needs to refuse bad input *before* heavy work is checked
here: missing files, truncated shards, shards named by the index but absent, tensors named twice.

The safetensors header is parsed here rather than through ``safetensors.safe_open`` because the
converter needs the raw byte ranges in file order (to hash each shard in the same pass that
converts it) and bf16 data as raw bits, neither of which ``safe_open`` hands out.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantize.errors import QuantizeError
from quantize.portable import release_pages

# safetensors dtype name -> (numpy dtype of the stored bits, bytes per element).
# bf16 has no numpy dtype: its bits are carried as uint16 and widened when needed.
SAFETENSORS_DTYPES: dict[str, tuple[np.dtype[Any], int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F64": (np.dtype("<f8"), 8),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}

MAX_HEADER_BYTES = 100 << 20  # the safetensors spec's own cap on the JSON header


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie: a shard, a dtype, a shape and a byte range."""

    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class Shard:
    path: Path
    header_len: int  # 8 + the JSON header's length: where tensor data starts
    size: int
    tensors: tuple[TensorRef, ...]  # in file order
    metadata: tuple[tuple[str, str], ...] = ()  # the header's ``__metadata__`` (string pairs), in file order


def read_shard_header(path: Path) -> Shard:
    """Parse and validate one safetensors file's header; no tensor byte is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QuantizeError(path, "truncated safetensors file: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise QuantizeError(path, f"not a safetensors file or truncated: header claims {n} bytes, file has {size}")
            raw = f.read(n)
    except FileNotFoundError as exc:
        raise QuantizeError(path, "shard file is missing") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizeError(path, f"corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise QuantizeError(path, "corrupt safetensors header (not a JSON object)")
    base = 8 + n
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantizeError(path, f"corrupt safetensors header entry for tensor {name!r}") from exc
        if dtype not in SAFETENSORS_DTYPES:
            raise QuantizeError(path, f"tensor {name!r} has dtype {dtype}, which cannot be converted")
        ref = TensorRef(name, path, dtype, shape, base + int(b), base + int(e))
        if ref.nbytes != ref.n_elements * SAFETENSORS_DTYPES[dtype][1]:
            raise QuantizeError(path, f"tensor {name!r}: byte range does not match shape {list(shape)} {dtype}")
        if ref.end > size:
            raise QuantizeError(
                path, f"truncated safetensors file: tensor {name!r} ends at byte {ref.end}, file has {size}; re-download it"
            )
        refs.append(ref)
    refs.sort(key=lambda r: r.begin)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise QuantizeError(path, "corrupt safetensors header (__metadata__ is not an object)")
    return Shard(path, base, size, tuple(refs), tuple((str(k), str(v)) for k, v in meta.items()))


@dataclass(frozen=True)
class Checkpoint:
    """A validated HF checkpoint folder: config, shards and a name -> tensor index."""

    root: Path
    config: dict[str, Any]
    shards: tuple[Shard, ...]
    tensors: dict[str, TensorRef] = field(repr=False)

    @property
    def architecture(self) -> str:
        return architecture_of(self.config, self.root)


def architecture_of(config: dict[str, Any], root: Path) -> str:
    """The model class a checkpoint's ``config.json`` names first (its family)."""
    archs = config.get("architectures") or []
    if not archs:
        raise QuantizeError(root / "config.json", "no 'architectures' entry; cannot tell the model family")
    return str(archs[0])


# A checkpoint's files that travel with its weights: the tokenizer in every format transformers
# writes or reads, chat templates and generation defaults (config.json is not among them).
TOKENIZER_PATTERNS = (
    "tokenizer*", "*.model", "*.tiktoken", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template*", "additional_chat_templates", "generation_config.json",
)


def tokenizer_files(root: Path) -> list[Path]:
    """The files (or template folders) of ``root`` that :data:`TOKENIZER_PATTERNS` match, sorted by name."""
    return sorted({p for pattern in TOKENIZER_PATTERNS for p in root.glob(pattern)}, key=lambda p: p.name)


def copy_tokenizer_files(src: Path, out: Path) -> list[str]:
    """Copy :func:`tokenizer_files` of ``src`` into ``out``; their names."""
    names = []
    for p in tokenizer_files(src):
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, out / p.name)
        names.append(p.name)
    return names


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object, or a one-line error naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizeError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise QuantizeError(path, "expected a JSON object")
    return data


def _shard_paths(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QuantizeError(index, f"not a safetensors index: {exc}") from exc
        names = list(dict.fromkeys(weight_map.values()))
        for name in names:
            if not (root / name).is_file():
                raise QuantizeError(root / name, f"shard named in {index.name} is missing; re-download it")
        return sorted(root / n for n in names)
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise QuantizeError(root, "only PyTorch pickle weights found; convert them to safetensors first")
    raise QuantizeError(root, "no model.safetensors or model.safetensors.index.json found")


def read_config(root: Path) -> dict[str, Any]:
    """A checkpoint folder's ``config.json``, without reading its weights' headers."""
    if not root.is_dir():
        raise QuantizeError(root, "not a folder; pass a Hugging Face checkpoint directory")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise QuantizeError(cfg_path, "missing; a Hugging Face checkpoint needs its config.json")
    return read_json_object(cfg_path)


def open_checkpoint(root: str | Path) -> Checkpoint:
    """Read config and every shard header, checking the folder is complete and consistent."""
    root = Path(root)
    config = read_config(root)
    shards = tuple(read_shard_header(p) for p in _shard_paths(root))
    tensors: dict[str, TensorRef] = {}
    for shard in shards:
        for ref in shard.tensors:
            if ref.name in tensors:
                raise QuantizeError(shard.path, f"tensor {ref.name!r} also stored in {tensors[ref.name].shard.name}")
            tensors[ref.name] = ref
    return Checkpoint(root, config, shards, tensors)


class ShardStream:
    """Memory-map one shard and hand out its tensors' bytes in file order.

    :meth:`tensors` yields, for each tensor in file order, the bytes since the previous one (gaps
    included) beside the tensor's own bytes, and :meth:`tail` what follows the last, so a caller sees
    every byte once, in order (the converter hashes the shard in the same pass).  Pages are released from this process once a
    tensor is consumed, so resident memory stays bounded by the largest tensor, not the file.
    """

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._fd = os.open(shard.path, os.O_RDONLY)
        self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) if shard.size else None
        self._done = shard.header_len  # offset up to which bytes were handed out (the header is read apart)
        self._released = 0  # bytes whose pages were dropped from the resident set

    def close(self) -> None:
        if self._map is not None:
            # A numpy view of a tensor may still live somewhere (e.g. a caller's frame); the map is
            # then unmapped when that view is collected.  Its pages were already released.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        os.close(self._fd)

    def __enter__(self) -> ShardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        """The shard's open file descriptor (for copies the kernel makes)."""
        return self._fd

    def view(self, begin: int, end: int) -> memoryview:
        assert self._map is not None
        return memoryview(self._map)[begin:end]

    def release(self, end: int) -> None:
        """Drop the mapped pages before ``end`` from this process's resident set (where the system can:
        :func:`quantize.portable.release_pages`)."""
        if self._map is None:
            return
        page = mmap.PAGESIZE
        upto = (end // page) * page
        if upto > self._released:
            release_pages(self._map, self._released, upto - self._released)
            self._released = upto

    def drop(self, begin: int, end: int) -> None:
        """Drop the whole mapped pages inside ``[begin, end)`` from this process's resident set (where the
        system can: :func:`quantize.portable.release_pages`)."""
        if self._map is None:
            return
        page = mmap.PAGESIZE
        lo, hi = -(-begin // page) * page, (end // page) * page
        if hi > lo:
            release_pages(self._map, lo, hi - lo)

    def tensors(self) -> Iterator[tuple[TensorRef, memoryview, memoryview]]:
        """Yield ``(ref, bytes_since_last, tensor_bytes)``; the middle part covers gaps too."""
        for ref in self.shard.tensors:
            yield ref, self.view(self._done, ref.end), self.view(ref.begin, ref.end)
            self._done = ref.end

    def tail(self) -> memoryview:
        """Bytes after the last tensor (normally none)."""
        return self.view(self._done, self.shard.size) if self._map is not None else memoryview(b"")


def as_array(ref: TensorRef, data: memoryview) -> np.ndarray:
    """A zero-copy numpy view of a tensor's stored bits (bf16 as uint16)."""
    dt, _ = SAFETENSORS_DTYPES[ref.dtype]
    return np.frombuffer(data, dtype=dt).reshape(ref.shape)
