"""Preflight checks: refuse before heavy work when the machine cannot hold what a step needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import QuantizeError


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse when ``folder``'s filesystem cannot hold ``need`` more bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise QuantizeError(folder, f"{what} needs ~{need / 2**30:.1f} GiB of disk, {free / 2**30:.1f} GiB free; "
                            "free space or build elsewhere (--artifacts DIR)")


def check_float32_fits(model_dir: Path, what: str) -> None:
    """A float32 copy of an fp16 checkpoint in torch needs about twice its size, plus activations."""
    import psutil

    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    need = weights * 2 * 1.2
    avail = psutil.virtual_memory().available
    if need > avail:
        raise QuantizeError(model_dir, f"{what} needs ~{need / 2**30:.1f} GiB of RAM for the float32 model, "
                            f"{avail / 2**30:.1f} GiB available; pass the F16 GGUF instead (llama.cpp runs it in 16 bits)")
