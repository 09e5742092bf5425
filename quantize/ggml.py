"""ggml's own quantizers and dequantizers, through the library llama-cpp-python ships.

``ggml_quantize_chunk`` is the function llama.cpp's quantizer calls for every tensor (importance
matrix included), and each type's ``to_float`` trait is what llama.cpp's CPU backend dequantizes
with, so :func:`round_trip` gives the exact weights a llama.cpp file of that type holds.
"""

from __future__ import annotations

import ctypes
from functools import cache
from typing import Any

import gguf
import numpy as np

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits (ggml/include/ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


@cache
def _lib() -> Any:
    from llama_cpp._ggml import libggml

    f32p = ctypes.POINTER(ctypes.c_float)
    libggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, f32p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                            ctypes.c_int64, f32p]
    libggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    libggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    libggml.ggml_row_size.restype = ctypes.c_size_t
    libggml.ggml_blck_size.argtypes = [ctypes.c_int]
    libggml.ggml_blck_size.restype = ctypes.c_int64
    libggml.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    libggml.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    libggml.ggml_get_type_traits.argtypes = [ctypes.c_int]
    libggml.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    return libggml


def type_id(name: str) -> int:
    return int(gguf.GGMLQuantizationType[name.upper()])


def row_size(qtype: str, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` values in ``qtype`` (``ggml_row_size``)."""
    return int(_lib().ggml_row_size(type_id(qtype), n_per_row))


def block_size(qtype: str) -> int:
    return int(_lib().ggml_blck_size(type_id(qtype)))


def requires_imatrix(qtype: str) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(type_id(qtype)))


def round_trip(rows: np.ndarray, qtype: str, imatrix: np.ndarray | None) -> np.ndarray:
    """``rows`` (float32, ``(n, n_per_row)``) quantized to ``qtype`` by ggml and dequantized again."""
    lib, t = _lib(), type_id(qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, per_row = rows.shape
    dst = np.empty(n * row_size(qtype, per_row), dtype=np.uint8)
    f32p = ctypes.POINTER(ctypes.c_float)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_chunk(t, rows.ctypes.data_as(f32p), dst.ctypes.data_as(ctypes.c_void_p), 0, n, per_row,
                            None if im is None else im.ctypes.data_as(f32p))
    out = np.empty_like(rows)
    to_float = _TO_FLOAT(lib.ggml_get_type_traits(t).contents.to_float)
    to_float(dst.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(f32p), rows.size)
    return out
