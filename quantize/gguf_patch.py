"""Fill in a GGUF header value after the tensors are written, in place.

A GGUF's metadata precedes its tensor data, but some provenance (the sha256 of the inputs) is
only known once the single streaming pass over them is done.  Writers reserve a fixed-width
placeholder string and patch it here, before the file is renamed to its final name.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf

PLACEHOLDER = "0" * 64  # a sha256 in hex
_STR, _ARR = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)


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
        if vtype == _ARR:
            (etype,) = struct.unpack_from("<I", head, pos)
            assert etype == _STR, f"{key} is not an array of strings"
            pos += 4 + 8  # element type, count
        else:
            assert vtype == _STR, f"{key} is not a string"
        for value in values:
            (n,) = struct.unpack_from("<Q", head, pos)
            assert n == len(value) and head[pos + 8 : pos + 8 + n] == PLACEHOLDER[:n].encode(), f"{key}: no placeholder"
            f.seek(pos + 8)
            f.write(value.encode())
            pos += 8 + n
