"""llama.cpp file types, as data: one row per ``llama_ftype`` the quantizer accepts by name.

Kept in step with llama.cpp's ``enum llama_ftype`` (include/llama.h); a test checks every row
against the ``LLAMA_FTYPE_*`` constants of the llama-cpp-python build in use.  ``bpw`` is the
band of bits per weight a whole file of that type lands in for Llama-family models (the mix
includes the higher-precision tensors llama.cpp keeps for output and attention values);
``needs_imatrix`` marks the types llama.cpp refuses to make without an importance matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantize.errors import QuantizeError


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int
    bpw: tuple[float, float]
    needs_imatrix: bool = False
    note: str = ""


QUANT_TYPES: dict[str, QuantType] = {
    t.name: t
    for t in (
        QuantType("F32", 0, (31.9, 32.1)),
        QuantType("F16", 1, (15.9, 16.1)),
        QuantType("BF16", 32, (15.9, 16.1)),
        QuantType("Q8_0", 7, (8.4, 8.6)),
        QuantType("Q6_K", 18, (6.5, 6.7), note="near-lossless"),
        QuantType("Q5_K_M", 17, (5.5, 6.4)),
        QuantType("Q5_K_S", 16, (5.4, 6.3)),
        QuantType("Q5_1", 9, (5.9, 6.6)),
        QuantType("Q5_0", 8, (5.4, 6.3)),
        QuantType("Q4_K_M", 15, (4.6, 6.0), note="recommended size/quality balance"),
        QuantType("Q4_K_S", 14, (4.5, 5.9)),
        QuantType("Q4_1", 3, (4.9, 6.0)),
        QuantType("Q4_0", 2, (4.4, 5.9)),
        QuantType("IQ4_NL", 25, (4.4, 5.9)),
        QuantType("IQ4_XS", 30, (4.2, 5.9)),
        QuantType("Q3_K_L", 13, (3.9, 5.5)),
        QuantType("Q3_K_M", 12, (3.6, 5.3)),
        QuantType("Q3_K_S", 11, (3.4, 5.2)),
        QuantType("IQ3_M", 27, (3.5, 5.3)),
        QuantType("IQ3_S", 26, (3.4, 5.2)),
        QuantType("IQ3_XS", 22, (3.2, 5.2)),
        QuantType("IQ3_XXS", 23, (3.0, 5.1)),
        QuantType("Q2_K", 10, (2.6, 5.0)),
        QuantType("Q2_K_S", 21, (2.5, 5.0), needs_imatrix=True),
        QuantType("IQ2_M", 29, (2.6, 5.0)),
        QuantType("IQ2_S", 28, (2.4, 5.0), needs_imatrix=True),
        QuantType("IQ2_XS", 20, (2.3, 5.0), needs_imatrix=True),
        QuantType("IQ2_XXS", 19, (2.0, 5.0), needs_imatrix=True),
        QuantType("IQ1_M", 31, (1.7, 5.0), needs_imatrix=True),
        QuantType("IQ1_S", 24, (1.5, 5.0), needs_imatrix=True),
        QuantType("TQ2_0", 37, (2.0, 5.0)),
        QuantType("TQ1_0", 36, (1.6, 5.0)),
    )
}


def quant_type(name: str) -> QuantType:
    try:
        return QUANT_TYPES[name.upper()]
    except KeyError:
        raise QuantizeError(None, f"unknown quantization type {name!r}; valid: {', '.join(QUANT_TYPES)}") from None
