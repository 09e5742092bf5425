"""Preflight disk check: refuse before heavy work when the disk cannot hold what a step writes.

(RAM: :func:`quantize.engine.stream.stream_need` and :func:`quantize.engine.stream.check_stream_fits`.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from quantize.errors import QuantizeError


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse when ``folder``'s filesystem cannot hold ``need`` more bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise QuantizeError(folder, f"{what} needs ~{need / 2**30:.1f} GiB of disk, {free / 2**30:.1f} GiB free; "
                            "free space or build elsewhere (--artifacts DIR)")
