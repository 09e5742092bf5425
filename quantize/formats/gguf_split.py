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

import gguf

from quantize.atomic import link_or_copy
from quantize.errors import QuantizeError
from quantize.formats.gguf_read import open_gguf
from quantize.formats.gguf_write import Writer, copy_metadata, write_tensors_copied

GB = 1000**3  # gguf-split's --split-max-size counts in powers of 1000, as the Hub's 50 GB cap does
# Keys the split writer sets on each shard itself.
_SPLIT_KEYS = frozenset({gguf.Keys.Split.LLM_KV_SPLIT_NO, gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
                         gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT})


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


