"""A fast, validating read of a GGUF's header: metadata scalars and tensor infos, no tensor data.

gguf-py's ``GGUFReader`` decodes every array (32k-token vocabularies included) into numpy objects,
which takes about a second per file; the quantize stage only needs to know that its input is a
whole GGUF, what kind, and its tensors' shapes, so it reads the header itself (GGUF v2/v3 layout,
ggml's docs/gguf.md) and checks the file as llama.cpp will read it: every tensor's dimensions, type and offset (packed
in header order, each padded to the alignment), and a data section that ends where the file ends.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from quantize.errors import QuantizeError

V = gguf.GGUFValueType
MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


@dataclass(frozen=True)
class GGUFHeader:
    kv: dict[str, Any]  # scalars and strings; arrays as their element count
    tensors: dict[str, tuple[tuple[int, ...], int]]  # name -> (ggml dims, ne0 first; ggml type id)
    data_end: int  # offset one past the last tensor byte
    size: int
    data_bytes: int  # tensor data, padding excluded
    n_params: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.data_bytes / max(self.n_params, 1)


class _Cursor:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = self.buf[self.pos : self.pos + n]
        if len(s) < n:
            raise struct.error("string past end of header")
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == V.STRING:
            return self.string()
        if vtype == V.ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype == V.STRING:
                for _ in range(count):
                    self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
            elif etype == V.ARRAY:
                for _ in range(count):
                    self.value(V.ARRAY)
            else:
                self.pos += count * struct.calcsize(_SCALAR[V(etype)])
            return count
        return self.take(_SCALAR[V(vtype)])


def read_header(path: str | Path) -> GGUFHeader:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # mapped: only the header's pages are read, however large the file
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else contextlib.nullcontext(b"") as buf:
                kv, infos, end = _parse(path, buf)
    except FileNotFoundError:
        raise QuantizeError(path, "no such file") from None
    except IsADirectoryError:
        raise QuantizeError(path, "is a folder, not a GGUF file") from None
    except PermissionError:
        raise QuantizeError(path, "cannot be read (permission denied)") from None
    return _check_layout(path, kv, infos, end, size)


def _parse(path: Path, buf: Any) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int, int]], int]:
    """The metadata, the tensor infos and where the tensor infos end."""
    if buf[:4] != b"GGUF":
        raise QuantizeError(path, "not a valid GGUF file (no GGUF magic); convert it first with `quantize convert`")
    c = _Cursor(buf)
    c.pos = 4
    try:
        version, n_tensors, n_kv = c.take("<I"), c.take("<Q"), c.take("<Q")
        if version not in (2, 3):
            raise QuantizeError(path, f"GGUF version {version} is not supported (2 or 3)")
        kv = {}
        for _ in range(n_kv):
            key = c.string()
            kv[key] = c.value(c.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.take("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise QuantizeError(path, f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS}); the file is damaged")
            dims = tuple(c.take("<Q") for _ in range(n_dims))
            ttype, offset = c.take("<I"), c.take("<Q")
            infos.append((name, dims, ttype, offset))
    except (struct.error, ValueError, KeyError) as exc:
        raise QuantizeError(path, f"not a valid GGUF file or truncated ({exc})") from None
    return kv, infos, c.pos


def _check_layout(path: Path, kv: dict[str, Any], infos: list[tuple[str, tuple[int, ...], int, int]], end: int,
                  size: int) -> GGUFHeader:
    align = int(kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    if align < 1 or align & (align - 1):
        raise QuantizeError(path, f"general.alignment {align} is not a power of two; the file is damaged")
    data_start = -(-end // align) * align
    tensors, expected, data_bytes, n_params, data_end = {}, 0, 0, 0, data_start
    for name, dims, ttype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise QuantizeError(path, f"tensor {name!r} has ggml type {ttype}, which this gguf-py does not know") from None
        n = math.prod(dims)
        if name in tensors or n == 0 or dims[0] % block:
            problem = "appears twice" if name in tensors else f"has shape {list(dims)}, not whole blocks of {block}"
            raise QuantizeError(path, f"tensor {name!r} {problem}; the file is damaged")
        if offset != expected:  # llama.cpp's own rule: tensors packed in header order, each padded to the alignment
            raise QuantizeError(path, f"tensor {name!r} has data offset {offset}, expected {expected}; the header "
                                "does not describe the data (damaged or hand-edited file)")
        nbytes = n // block * type_size
        tensors[name] = (dims, ttype)
        expected += -(-nbytes // align) * align
        data_end = data_start + offset + nbytes
        data_bytes += nbytes
        n_params += n
    if data_end > size:
        raise QuantizeError(path, f"not a valid GGUF file or truncated: tensor data ends at byte {data_end}, file has {size}")
    if size > data_start + expected:
        raise QuantizeError(path, f"has {size - data_start - expected} bytes after the data of its {len(infos)} tensors; "
                            "the header's tensor count or sizes do not match the file (damaged or hand-edited)")
    return GGUFHeader(kv, tensors, data_end, size, data_bytes, n_params)


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF for reading, turning a non-GGUF, truncated or inconsistent file into a one-line error."""
    path = Path(path)
    read_header(path)  # the layout checks llama.cpp makes, as one line each
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, struct.error) as exc:
        raise QuantizeError(path, f"not a valid GGUF file or truncated ({exc})") from exc


def field_value(reader: gguf.GGUFReader, key: str) -> Any:
    """A metadata value as a Python object (str, int, float, list), or None."""
    f = reader.get_field(key)
    if f is None:
        return None
    return f.contents()
