"""Writing GGUF files: gguf-py's writer with bulk-packed arrays, metadata copied from a reader,
tensor data copied by the kernel, and header strings patched in place after the data.

``GGUFWriter._pack_val`` packs an array element by element (three Python calls and a type check
each): a 262k-token vocabulary's three arrays cost seconds.  :class:`Writer` packs a homogeneous
array of numbers with one numpy conversion and an array of strings with one join; the bytes are
the same as gguf-py's.

A GGUF's metadata precedes its tensor data, but some provenance (the sha256 of the inputs) is
only known once the single streaming pass over them is done.  Writers reserve a fixed-width
placeholder string (:data:`PLACEHOLDER`) and :func:`patch_strings` fills it in before the file is
renamed to its final name.
"""


from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantize.portable import copy_range

T = gguf.GGUFValueType
PLACEHOLDER = "0" * 64  # a sha256 in hex
NUMPY_OF = {T.UINT8: "u1", T.INT8: "i1", T.UINT16: "u2", T.INT16: "i2", T.UINT32: "u4", T.INT32: "i4",
            T.FLOAT32: "f4", T.UINT64: "u8", T.INT64: "i8", T.FLOAT64: "f8"}


class Writer(gguf.GGUFWriter):
    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if vtype != T.ARRAY or not isinstance(val, Sequence) or isinstance(val, bytes) or len(val) < 2:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        one_of_each = dict(zip(map(type, val), val, strict=True))  # a value of each Python type in the array
        ltype = sub_type if sub_type is not None else T.get_type(val[0])
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        head = struct.pack(f"{order}I", T.ARRAY) if add_vtype else b""
        head += struct.pack(f"{order}IQ", ltype, len(val))
        if ltype == T.STRING and one_of_each.keys() <= {str, bytes}:  # gguf-py writes bytes as they are, str as UTF-8
            length = struct.Struct(f"{order}Q").pack
            return head + b"".join(length(len(b)) + b for b in (v if type(v) is bytes else v.encode("utf-8") for v in val))
        if ltype in NUMPY_OF and (sub_type is not None or all(T.get_type(v) is ltype for v in one_of_each.values())):
            return head + np.asarray(val, dtype=f"{order}{NUMPY_OF[ltype]}").tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, skip: frozenset[str] = frozenset()) -> None:
    """Every metadata key of ``reader`` into ``writer`` with its exact type, except the ones the
    writer sets itself (``general.architecture``) and ``skip``; the data alignment follows."""
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE or key in skip:
            continue
        vtype = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
    if (align := reader.fields.get(gguf.Keys.General.ALIGNMENT)) is not None:
        writer.data_alignment = int(align.contents())


def append_range(fout: Any, src: int, begin: int, end: int) -> None:
    """Append bytes ``[begin, end)`` of the open file ``src`` to the file object ``fout``
    (:func:`quantize.portable.copy_range`)."""
    fout.flush()
    pos = fout.tell()
    copy_range(src, fout.fileno(), begin, pos, end - begin)
    fout.seek(pos + end - begin)


class MappedTensor:
    """Stands in for an ndarray in ``GGUFWriter.write_tensor_data``: one tensor's bytes of the open
    file ``fd``, copied by :func:`quantize.portable.copy_range`."""

    def __init__(self, fd: int, offset: int, nbytes: int) -> None:
        self.fd, self.offset, self.nbytes = fd, offset, nbytes

    def tofile(self, fout: Any) -> None:
        append_range(fout, self.fd, self.offset, self.offset + self.nbytes)


def write_tensors_copied(w: gguf.GGUFWriter, reader: gguf.GGUFReader, fd: int) -> None:
    """Finish ``w`` (its metadata already added) with every tensor of ``reader`` copied unchanged from
    ``fd``, the same file open."""
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w.add_tensor_info(t.name, shape, np.dtype(np.float32), int(t.n_bytes), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in reader.tensors:
        w.write_tensor_data(MappedTensor(fd, int(t.data_offset), int(t.n_bytes)))  # type: ignore[arg-type]
    w.close()


def patch_strings(path: Path, key: str, values: list[str], header_bytes: int = 16 << 20) -> None:
    """Overwrite the leading placeholder strings of ``key`` (a string, or an array of strings)
    with ``values`` of the same length."""
    k = key.encode()
    with open(path, "r+b") as f:
        head = f.read(header_bytes)
        at = head.find(struct.pack("<Q", len(k)) + k)
        if at < 0:
            raise RuntimeError(f"{path}: metadata key {key} not found in the header")
        pos = at + 8 + len(k)
        (vtype,) = struct.unpack_from("<I", head, pos)
        pos += 4
        if vtype == T.ARRAY:
            (etype,) = struct.unpack_from("<I", head, pos)
            assert etype == T.STRING, f"{key} is not an array of strings"
            pos += 4 + 8  # element type, count
        else:
            assert vtype == T.STRING, f"{key} is not a string"
        for value in values:
            (n,) = struct.unpack_from("<Q", head, pos)
            assert n == len(value) and head[pos + 8 : pos + 8 + n] == PLACEHOLDER[:n].encode(), f"{key}: no placeholder"
            f.seek(pos + 8)
            f.write(value.encode())
            pos += 8 + n
