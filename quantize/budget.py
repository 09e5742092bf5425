"""Byte budgets for a searched GGUF mix, as a recipe or the command line writes them (standard library
only: ``quantize ladder`` reads recipes without the heavy packages)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from quantize import TOOL_NAME
from quantize.errors import QuantizeError
from quantize.quant_types import QUANT_TYPES

BUDGET_KEY = f"{TOOL_NAME}.gguf.budget"  # the GGUF key that records a searched mix's budget
MIX_SUFFIX = "-mix"  # a searched GGUF's kind is its budget, then this: Q4_K_M-mix, 3.5GB-mix

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(GB|GiB|MB|MiB|KB|KiB|B)$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9, "gib": 2**30}
_BPW = re.compile(r"^(\d+(?:\.\d+)?)\s*bpw$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A budget as the user wrote it: a size (``4.2GB``, ``3.9GiB``), bits per weight (``4.85bpw``) or a
    stock type's name (``Q4_K_M``: that type's tensor bytes for this model)."""

    text: str
    kind: str  # "bytes", "bpw" or "type"
    value: float | str

    @property
    def mix_kind(self) -> str:
        """The searched file's kind in names, the gate and the manifest: ``Q4_K_M-mix``, ``3.5GB-mix``."""
        return self.text.replace(" ", "") + MIX_SUFFIX


def parse_budget(text: str, where: Path | None = None) -> Budget:
    t = text.strip()
    if m := _SIZE.match(t):
        return Budget(t, "bytes", float(m[1]) * _UNITS[m[2].lower()])
    if m := _BPW.match(t):
        return Budget(t, "bpw", float(m[1]))
    if t.upper() in QUANT_TYPES:
        return Budget(t.upper(), "type", t.upper())
    raise QuantizeError(where, f"budget {text!r} is not a size (4.2GB, 3.9GiB), bits per weight (4.85bpw) "
                        "or a llama.cpp type name (Q4_K_M)")
