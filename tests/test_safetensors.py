"""The one safetensors writer against the safetensors library: same bytes, and files it reads back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from quantize.formats.safetensors import save_tensors, write_safetensors

DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32,
          torch.float32, torch.float64, torch.int64)


def test_save_tensors_is_byte_identical_to_the_library(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dt in enumerate(DTYPES):  # names out of dtype order, shapes of every rank
        shape = [(3,), (2, 5), (1, 2, 3), ()][i % 4]
        tensors[f"layer.{len(DTYPES) - i}.w"] = (torch.rand(shape, generator=gen) * 100).to(dt)
    meta = {"format": "pt"}  # one key: the library orders several keys by a per-process hash seed
    save_file(tensors, str(tmp_path / "library.safetensors"), metadata=meta)
    save_tensors(tmp_path / "ours.safetensors", tensors, meta)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "library.safetensors").read_bytes()


def test_write_safetensors_streams_arrays_the_library_reads(tmp_path: Path) -> None:
    arrays = {"b": np.arange(6, dtype=np.float16).reshape(2, 3), "a": np.arange(4, dtype=np.int64)}
    layout = [(n, a.dtype, a.shape) for n, a in arrays.items()]
    write_safetensors(tmp_path / "x.safetensors", layout, iter(arrays.values()), {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == arrays.keys() and all(np.array_equal(back[n], a) for n, a in arrays.items())
    with pytest.raises(ValueError, match="layout says"):
        write_safetensors(tmp_path / "y.safetensors", layout, iter([arrays["b"].astype(np.float32), arrays["a"]]))
