"""llama.cpp split shards: a GGUF larger than the Hub's per-file cap, as ``gguf-split`` writes it.

The layout llama.cpp and koboldcpp load when given the first file: ``NAME-00001-of-0000N.gguf`` ...,
the first shard holding all metadata, every shard carrying ``split.no``, ``split.count`` and
``split.tensors.count``, tensors kept whole and in their original order.  gguf-py's ``GGUFWriter``
writes that layout; this module feeds it the source's metadata and streams the tensor bytes from a
memory map, releasing pages as they are written, so memory stays flat on a 140 GB F16.

The shards are written under temporary names in a hidden folder next to the destination and
renamed into place only when all of them are complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .atomic import link_or_copy
from .errors import QuantizeError
from .gguf_info import copy_metadata, open_gguf
from .gguf_writer import Writer
from .portable import copy_range

GB = 1000**3  # gguf-split's --split-max-size counts in powers of 1000, as the Hub's 50 GB cap does
# Keys the split writer sets on each shard itself.
_SPLIT_KEYS = frozenset({gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
                         gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT})


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


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    tmp = dest / f".split-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def split_gguf(src: str | Path, dest: str | Path, max_bytes: int) -> list[Path]:
    """Write ``src`` into folder ``dest`` as llama.cpp split shards of at most ``max_bytes`` each
    (metadata included).  A file that already fits is not split: the caller links it."""
    src, dest = Path(src), Path(dest)
    size = src.stat().st_size
    if size <= max_bytes:
        raise QuantizeError(src, f"is {size} bytes, within the {max_bytes}-byte limit; nothing to split")
    reader = open_gguf(src)
    if (count := reader.fields.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)) is not None and int(count.contents()) > 1:
        raise QuantizeError(src, "is already a split shard; split the merged file instead")
    header = min(t.data_offset for t in reader.tensors)  # metadata and tensor infos: all in the first shard
    biggest = max(reader.tensors, key=lambda t: int(t.n_bytes))
    if int(biggest.n_bytes) + header > max_bytes:
        raise QuantizeError(src, f"tensor {biggest.name} alone ({int(biggest.n_bytes)} bytes) exceeds the split size "
                            f"{max_bytes}; raise split_max_gb")
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    dest.mkdir(parents=True, exist_ok=True)
    with _staging(dest) as tmp, open(src, "rb") as f:
        # The budget leaves room for the (largest) first shard's metadata and per-tensor alignment.
        budget = max_bytes - header - len(reader.tensors) * 32
        w = Writer(tmp / f"{src.stem}.gguf", arch, split_max_size=budget)
        copy_metadata(reader, w, _SPLIT_KEYS)
        write_tensors_copied(w, reader, f.fileno())
        names = sorted(p.name for p in tmp.iterdir())
        if len(names) < 2:
            raise QuantizeError(src, "did not split; the split size is larger than the file")
        for name in names:
            (tmp / name).replace(dest / name)
    return [dest / n for n in names]


def place_gguf(src: Path, dest: Path, max_bytes: int | None) -> list[Path]:
    """Put a GGUF into a release folder: hard-linked as is, or as split shards when it is larger
    than ``max_bytes``.  Returns the files in load order (the first is the one to open)."""
    if max_bytes is not None and src.stat().st_size > max_bytes:
        return split_gguf(src, dest, max_bytes)
    out = dest / src.name
    link_or_copy(src, out)
    return [out]


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
