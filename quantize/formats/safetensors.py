"""Read and write safetensors tensors without holding a file in memory.

:class:`SafetensorsWriter` computes the whole header from the names, dtypes and shapes it is given,
writes it first, then takes each tensor's bytes in that order (as one buffer or in chunks), so a
writer holds no more than the tensor it is handed.  Dtypes are the format's names (``F16``,
``BF16``, ...), so bf16 bits pass through as they are.

Reading goes through ``os.pread`` into a buffer the caller owns: nothing is mapped, so the pages a
read brings in belong to the page cache, not to this process's resident set.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantize.errors import QuantizeError
from quantize.formats.checkpoint import SAFETENSORS_DTYPES, TensorRef

# torch is imported inside the functions that make torch tensors: convert and merge read through numpy.

CHUNK = 16 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file to write: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * SAFETENSORS_DTYPES[self.dtype][1]

    @classmethod
    def of(cls, ref: TensorRef) -> TensorSpec:
        return cls(ref.name, ref.dtype, ref.shape)


def header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header of a file holding ``specs`` back to back, in that order;
    the header is padded with spaces to a multiple of 8 bytes, as the reference writer does."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        if s.name in header:
            raise ValueError(f"tensor {s.name!r} named twice")
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in the order of ``specs``.

    Each :meth:`write` must name the next tensor and supply exactly its byte count; :meth:`close`
    refuses a file with tensors still missing.
    """

    def __init__(self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self._specs = list(specs)
        self._next = 0
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close() / the context manager
        self._f.write(header_bytes(self._specs, metadata))

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self._f.close()
            return
        self.close()

    def write(self, name: str, chunks: Iterable[Any]) -> None:
        """Append tensor ``name``'s bytes, given as buffer-like chunks (bytes, C-contiguous arrays) in order."""
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {name!r} is beyond the {len(self._specs)} tensors of the header")
        spec = self._specs[self._next]
        if spec.name != name:
            raise ValueError(f"{self.path}: expected tensor {spec.name!r} next, got {name!r}")
        written = 0
        for part in chunks:
            view = memoryview(part).cast("B")
            self._f.write(view)
            written += view.nbytes
        if written != spec.nbytes:
            raise ValueError(f"{self.path}: tensor {name!r} got {written} bytes, its header says {spec.nbytes}")
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._next != len(self._specs):
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._specs)} tensors")


# How the safetensors library (``safetensors.torch.save_file``) lays tensors out: by dtype in this
# order, then by name.  :func:`save_tensors` writes in it, so its files are byte for byte the library's.
LIBRARY_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL")


def save_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write torch tensors (any device) to one file in the library's layout."""
    st_of = {torch_dtype(name): name for name in TORCH_DTYPES}
    specs = sorted((TensorSpec(n, st_of[t.dtype], tuple(t.shape)) for n, t in tensors.items()),
                   key=lambda s: (LIBRARY_DTYPE_ORDER.index(s.dtype), s.name))
    with SafetensorsWriter(path, specs, metadata) as w:
        for s in specs:
            w.write(s.name, [tensors[s.name].detach().to("cpu").contiguous().reshape(-1).view(torch_dtype("U8")).numpy()])


def write_safetensors(path: Path, layout: list[tuple[str, np.dtype[Any], tuple[int, ...]]], arrays: Iterator[np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays to one file tensor by tensor in ``layout`` order (name, dtype, shape), so only
    one array is held at a time."""
    st_of = {dt: name for name, (dt, _) in SAFETENSORS_DTYPES.items() if name != "BF16"}
    with SafetensorsWriter(path, [TensorSpec(n, st_of[np.dtype(dt)], tuple(sh)) for n, dt, sh in layout], metadata) as w:
        for (name, dtype, shape), arr in zip(layout, arrays, strict=True):
            if arr.dtype != dtype or arr.shape != shape:
                raise ValueError(f"{name}: got {arr.dtype}{arr.shape}, layout says {np.dtype(dtype)}{shape}")
            w.write(name, [np.ascontiguousarray(arr)])


def read_range(fd: int, begin: int, end: int, path: Path | None = None) -> bytearray:
    """Bytes ``[begin, end)`` of an open file, read with ``pread`` into a new buffer."""
    buf = bytearray(end - begin)
    view = memoryview(buf)
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [view[done : done + CHUNK]], begin + done)
        if n == 0:
            raise QuantizeError(path, f"file ended at byte {begin + done}, expected data up to {end}; re-download it")
        done += n
    return buf


def iter_range(fd: int, begin: int, end: int, path: Path | None = None) -> Iterable[bytes]:
    """Bytes ``[begin, end)`` of an open file in chunks of at most ``CHUNK``."""
    pos = begin
    while pos < end:
        block = os.pread(fd, min(CHUNK, end - pos), pos)
        if not block:
            raise QuantizeError(path, f"file ended at byte {pos}, expected data up to {end}; re-download it")
        yield block
        pos += len(block)


# safetensors dtype -> torch dtype name (bf16 stays bf16)
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32",
                "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def torch_dtype(st_dtype: str) -> Any:
    import torch

    return getattr(torch, TORCH_DTYPES[st_dtype])


def tensor_from(buf: bytearray, ref: TensorRef) -> Any:
    """A torch tensor over ``buf`` (no copy) with ``ref``'s dtype and shape."""
    import torch

    if not buf:
        return torch.empty(ref.shape, dtype=torch_dtype(ref.dtype))
    return torch.frombuffer(buf, dtype=torch_dtype(ref.dtype)).reshape(ref.shape)


def read_tensor(ref: TensorRef) -> Any:
    """One stored tensor as a torch tensor in its stored dtype, read with ``pread`` (nothing stays mapped)."""
    with open(ref.shard, "rb", buffering=0) as f:
        return tensor_from(read_range(f.fileno(), ref.begin, ref.end, ref.shard), ref)
