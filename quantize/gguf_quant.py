"""Stage 2: GGUF quantization with llama.cpp's own quantizer (``llama_model_quantize``).

No re-implementation: llama-cpp-python's binding of ``llama_model_quantize`` does the work, in
process.  What this module adds is everything around it a release needs: type names checked
against one table, inputs validated first (GGUF-ness, importance-matrix fit, types llama.cpp
refuses without one), provenance written through llama.cpp's own ``quantize.imatrix.*`` keys plus
ours, deterministic ``<Model>.<TYPE>.gguf`` names and an atomic output.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantize import TOOL_NAME, __version__
from quantize.atomic import atomic_file, check_output, partial_prefix, sha256_file
from quantize.budget import BUDGET_KEY
from quantize.errors import QuantizeError
from quantize.fingerprint import known_sha256, sha256_when_idle
from quantize.formats.gguf_read import read_header
from quantize.formats.gguf_write import PLACEHOLDER, patch_strings
from quantize.imatrix import Imatrix
from quantize.quant_types import QUANT_TYPES, QuantType, quant_type
from quantize.smooth import smooth_gguf
from quantize.versions import package_version

# llama_cpp is imported inside the functions that call it: loading the shared library takes a second.

log = logging.getLogger(__name__)


INPUT_HASH_KEY = f"{TOOL_NAME}.gguf.input_sha256"


@dataclass(frozen=True)
class QuantizeSettings:
    type: str = "Q4_K_M"
    imatrix: Path | None = None
    threads: int = 0  # 0: all cores
    smooth: bool = False  # migrate activation outliers into the weights first (needs the imatrix)
    # (tensor name, ggml type name): that tensor's type instead of the one ``type``'s recipe gives it
    tensor_types: tuple[tuple[str, str], ...] = ()
    budget: str = ""  # the byte budget a searched mix was made for (recorded in the file)


def tensor_pattern(name: str) -> str:
    """The regular expression llama.cpp is given for one tensor: ``name`` exactly (anchored, every
    metacharacter escaped), as its ``std::regex_search`` reads it (``blk.1.`` never matches ``blk.10.``)."""
    return "^" + re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\1", name) + "$"


def ggml_type(name: str, where: Path) -> int:
    """The ``ggml_type`` number of a tensor type name (``Q6_K``, ``IQ4_XS``, ``Q8_0`` ...)."""
    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        raise QuantizeError(where, f"unknown tensor type {name!r}; one of {', '.join(t.name for t in gguf.GGMLQuantizationType)}") from None


def tensor_overrides(types: tuple[tuple[str, str], ...], src: Path, tensors: Mapping[str, Any], has_imatrix: bool) -> Any:
    """llama.cpp's null-terminated ``llama_model_tensor_override`` array for ``types``, checked against
    the tensors of ``src`` first."""
    import llama_cpp as L

    arr: Any = (L.llama_model_tensor_override * (len(types) + 1))()  # zero-filled: the last entry terminates
    for i, (name, tname) in enumerate(types):
        if name not in tensors:
            raise QuantizeError(src, f"has no tensor {name!r} to give type {tname}")
        if not has_imatrix and (ft := QUANT_TYPES.get(tname.upper())) is not None and ft.needs_imatrix:
            raise QuantizeError(src, f"llama.cpp cannot make {tname} tensors ({name}) without an importance matrix; pass --imatrix FILE")
        arr[i].pattern = tensor_pattern(name).encode()
        arr[i].type = ggml_type(tname, src)
    return arr


def artifact_name(model: str, qtype: str) -> str:
    """``AshhLimaRP-Mistral-7B`` + ``Q4_K_M`` -> ``AshhLimaRP-Mistral-7B.Q4_K_M.gguf`` (the name people search for)."""
    return f"{model}.{quant_type(qtype).name}.gguf"


def check_imatrix_fits(im: Imatrix, imatrix_path: Path, model_path: Path) -> None:
    """Every imatrix entry must name a matrix (or stacked experts) of the model with the same number of
    columns (times the number of experts)."""
    cols = {name: dims[0] * (dims[2] if len(dims) > 2 else 1) for name, (dims, _) in read_header(model_path).tensors.items()
            if len(dims) >= 2}
    unknown = sorted(set(im.sums) - set(cols))
    if unknown:
        raise QuantizeError(imatrix_path, f"made for a different model: {len(unknown)} entries name tensors {model_path.name} "
                            f"does not have (e.g. {unknown[0]})")
    for name, v in im.sums.items():
        if v.size != cols[name]:
            raise QuantizeError(imatrix_path, f"made for a different model: {name} has {v.size} columns here, "
                                f"{cols[name]} in {model_path.name}")
    if not np.all(np.isfinite(np.concatenate(list(im.sums.values())))):
        raise QuantizeError(imatrix_path, "contains NaN or infinite values")


def _kv_overrides(items: dict[str, str | int]) -> Any:
    import llama_cpp as L

    arr: Any = (L.llama_model_kv_override * (len(items) + 1))()  # zero-filled: the last entry terminates
    for i, (k, v) in enumerate(items.items()):
        arr[i].key = k.encode()
        if isinstance(v, int):
            arr[i].tag = L.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = v
        else:
            arr[i].tag = L.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = v.encode()[:127]
    return arr


def _imatrix_array(means: dict[str, np.ndarray]) -> tuple[Any, list[object]]:
    import llama_cpp as L

    arr = (L.llama_model_imatrix_data * (len(means) + 1))()  # null-name entry terminates
    keep: list[object] = []
    for i, (name, v) in enumerate(sorted(means.items())):
        data = np.ascontiguousarray(v, dtype=np.float32)
        cname = ctypes.c_char_p(name.encode())
        keep += [data, cname]
        arr[i].name = cname.value
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    return arr, keep


def quantize_gguf(src: str | Path, out: str | Path, settings: QuantizeSettings = QuantizeSettings(),
                  origin: Path | None = None, origin_imatrix: Path | None = None) -> Path:
    """Quantize the F16/BF16/F32 GGUF ``src`` to ``settings.type`` at ``out`` (atomic).

    With ``smooth``, the float model and its importance matrix are first rewritten by
    :func:`quantize.smooth.smooth_gguf` (same function, outliers moved into the weights), in a
    scratch folder beside ``out`` that is removed afterwards.  A build smooths once for every type
    instead and passes the smoothed pair as ``src`` and ``settings.imatrix``, naming what they were
    made from as ``origin`` and ``origin_imatrix`` (what the provenance records)."""
    src, out = Path(src), Path(out)
    quant_type(settings.type)  # unknown names fail before any work
    check_output(out, [src, settings.imatrix, origin, origin_imatrix])
    if not settings.smooth:
        return _quantize(src, out, settings, origin or src, origin_imatrix)
    if settings.imatrix is None:
        raise QuantizeError(src, "--smooth needs the activation statistics of an importance matrix; pass --imatrix FILE")

    read_header(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=partial_prefix(out), dir=out.parent) as scratch:
        sm, smi = Path(scratch) / src.name, Path(scratch) / settings.imatrix.name
        check_imatrix_fits(Imatrix.load(settings.imatrix), settings.imatrix, src)
        smooth_gguf(src, settings.imatrix, sm, smi)
        return _quantize(sm, out, replace(settings, imatrix=smi, smooth=False), src, settings.imatrix)


def _quantize(src: Path, out: Path, settings: QuantizeSettings, origin: Path, origin_imatrix: Path | None = None) -> Path:
    """Run llama.cpp's quantizer on ``src``; provenance names ``origin`` (the user's input)."""
    import llama_cpp as L

    qt: QuantType = quant_type(settings.type)
    input_hash = known_sha256(origin)
    header = read_header(src)  # refuses non-GGUF and truncated files
    if header.kv.get("general.type") == "imatrix":
        raise QuantizeError(src, "is an importance matrix, not a model")
    if qt.needs_imatrix and settings.imatrix is None:
        raise QuantizeError(src, f"llama.cpp cannot make {qt.name} without an importance matrix; pass --imatrix FILE "
                            "(make one with `quantize imatrix`)")
    overrides: dict[str, str | int] = {
        f"{TOOL_NAME}.gguf.type": qt.name,
        # remembered when a build keyed a step by it; otherwise hashed on cores llama.cpp leaves idle
        INPUT_HASH_KEY: input_hash or PLACEHOLDER,
        f"{TOOL_NAME}.gguf.smoothed": int(origin != src),
        f"{TOOL_NAME}.gguf.tool": f"{TOOL_NAME} {__version__}, llama-cpp-python {package_version('llama-cpp-python')}",
    }
    keep: list[object] = []
    params = L.llama_model_quantize_default_params()
    params.ftype = qt.ftype
    params.nthread = settings.threads or (os.cpu_count() or 1)
    if settings.imatrix is not None:
        im = Imatrix.load(settings.imatrix)
        check_imatrix_fits(im, settings.imatrix, src)
        imarr, keep = _imatrix_array(im.means())
        params.imatrix = ctypes.cast(imarr, ctypes.POINTER(L.llama_model_imatrix_data))
        keep.append(imarr)
        # llama.cpp's own keys, as llama-quantize writes them (file name only: no build-machine paths).
        im_file = origin_imatrix or settings.imatrix
        overrides |= {
            "quantize.imatrix.file": im_file.name,
            "quantize.imatrix.dataset": ",".join(im.datasets)[:127],
            "quantize.imatrix.entries_count": len(im.sums),
            "quantize.imatrix.chunks_count": im.chunk_count,
            f"{TOOL_NAME}.gguf.imatrix_sha256": sha256_file(im_file),
        }
    if settings.tensor_types:
        tt = tensor_overrides(settings.tensor_types, src, header.tensors, settings.imatrix is not None)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(L.llama_model_tensor_override))
        keep.append(tt)
        overrides[f"{TOOL_NAME}.gguf.tensor_types"] = len(settings.tensor_types)
    if settings.budget:
        overrides[BUDGET_KEY] = settings.budget
    kv = _kv_overrides(overrides)
    params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(L.llama_model_kv_override))
    hashed = sha256_when_idle(origin) if input_hash is None else None
    with atomic_file(out) as tmp:
        rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise QuantizeError(origin, f"llama.cpp's quantizer failed making {qt.name} (status {rc}); see its log above")
        if hashed is not None:
            patch_strings(tmp, INPUT_HASH_KEY, [hashed.result()])
    del keep, kv
    log.info("wrote %s (%s)", out, qt.name)
    return out
