"""Stage: 4-bit AWQ checkpoints for GPU servers (vLLM, TGI, transformers), with a measured baseline.

AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024) multiplies each input channel of a block's linears by
``s = mean|x|^a / mean|w~|^(1-a)`` (normalised by ``sqrt(max(s) * min(s))``) before 4-bit
round-to-nearest, folds ``1/s`` into the operation that feeds them (an RMSNorm or the previous
linear), and picks ``a`` on a 20-point grid to minimise the block's output error on calibration
activations; it then searches a clipping range per group the same way.  AutoAWQ 0.2.9 implements
it; this module drives it with:

* the model loaded by transformers itself, in float32 on the CPU and float16 on CUDA;
* calibration tokens cut from *our* text with the model's own tokenizer (AutoAWQ would otherwise
  download ``mit-han-lab/pile-val-backup``);
* :class:`quantize.autoawq_compat.BlockKwargsAwqQuantizer`, which fixes a CPU-only aliasing bug in
  AutoAWQ's scale search and gives each block its own attention mask and rotary embedding, and
  :func:`quantize.autoawq_compat.offset_norms_folded`, which folds scales correctly into Gemma's
  ``(1 + w)`` norms;
* the layer maps of :mod:`quantize.awq_models` (AutoAWQ's, plus ours for Gemma 3);

and writes the folder itself, atomically: packed ``qweight``/``qzeros``/``scales`` (AutoAWQ's GEMM
layout, what vLLM's and transformers' AWQ kernels read) plus every other tensor in float16, the
source's config with a ``quantization_config``, its tokenizer and generation files, and
``provenance.json``.

:func:`quantize_rtn` is the baseline (plain 4-bit round-to-nearest, same grouping, same packing,
same folder) so that AWQ's gain is measured rather than assumed.  :func:`load_awq_as_float` reads
either back from disk into an ordinary float transformers model (AutoAWQ's own loader needs
Intel's IPEX on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import TOOL_NAME, __version__
from .atomic import atomic_dir, sha256_file
from .checkpoint import Checkpoint, open_checkpoint
from .errors import QuantizeError
from .imatrix import read_text

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# HF architecture -> model_type, the key of its layer map in quantize.awq_models.MODEL_CLASSES (ours,
# then AutoAWQ's).  Only the families whose layer map has been run against transformers 5 here are
# allowed; AutoAWQ knows more (qwen2, gemma, phi3, ...) and each one is a new row plus a test.
FAMILIES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Gemma3ForCausalLM": "gemma3_text",  # our map (quantize/awq_models.py); AutoAWQ 0.2.9 has none
}
# AutoAWQ as the README installs it: `pip install --no-deps` (the `awq` extra in pyproject.toml names the
# same pin), because its declared requirements (triton, accelerate, ...) would pull CUDA builds we do not use.
AUTOAWQ = "autoawq==0.2.9"


def require_autoawq() -> None:
    """Refuse, as a one-line error, when AutoAWQ cannot be imported (a plain ``pip install`` lacks it)."""
    try:
        import awq  # noqa: F401
    except ImportError:
        raise QuantizeError("awq", f"AutoAWQ is not installed; pip install --no-deps {AUTOAWQ} (see README)") from None


# What provenance.json lists under "autoawq_fixes" (see quantize/autoawq_compat.py).
AUTOAWQ_FIXES = (
    "_compute_best_scale backs the block up with a copy (CopyingAwqQuantizer; CPU aliasing)",
    "each block runs with its own mask and rotary embedding, not block 0's (BlockKwargsAwqQuantizer)",
    "scales fold into (1 + w) norms as (1 + w) / s for Gemma 3 too (offset_norms_folded)",
)

# Device -> dtype the model is calibrated in.  The CPU has no fast float16 matmul and float16
# activations overflow on outlier channels; CUDA runs AutoAWQ's float16 path as upstream does.
CALIB_DTYPES: dict[str, str] = {"cpu": "float32", "cuda": "float16"}
DEVICES = ("auto", *CALIB_DTYPES)
# (model_type, device) -> dtype, where the device's default cannot hold a family's activations.
# Gemma 3's residual stream outgrows float16 (max 65504): gemma-3-270m reaches 1.04e5 by block 14
# on Shakespeare and its float16 forward returns non-finite logits, so on CUDA it calibrates in
# bfloat16, the dtype Gemma 3 is released in.  (The packed weights are float16 either way:
# AutoAWQ quantizes every linear in float16.)
CALIB_DTYPE_OVERRIDES: dict[tuple[str, str], str] = {("gemma3_text", "cuda"): "bfloat16"}

# Settings AutoAWQ's GEMM path can produce and our loader can read back: WQLinear_GEMM packs
# 4-bit values only and needs zero points; GEMV/Marlin/exllama layouts are not unpacked here.
SUPPORTED: dict[str, tuple[Any, ...]] = {"w_bit": (4,), "zero_point": (True,), "version": ("GEMM",), "device": DEVICES}

PACKED = ("qweight", "qzeros", "scales")  # what replaces a quantized linear's ".weight"
OC_BATCH = 64  # AutoAWQ's clip search walks output channels 64 (or 256) at a time and asserts it divides
PACK_NUM_BITS = 32  # values are packed into int32 words

# Files of the source copied as they are: the tokenizer (every format transformers writes or
# reads), chat templates and generation defaults.
SIDE_FILE_PATTERNS = (
    "tokenizer*", "*.model", "*.tiktoken", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
    "merges.txt", "chat_template*", "additional_chat_templates", "generation_config.json",
)
VERSIONED_PACKAGES = ("autoawq", "torch", "transformers", "tokenizers", "safetensors", "accelerate")
GiB = 1 << 30


@dataclass(frozen=True)
class AwqSettings:
    """What to quantize to and how to calibrate.  Defaults are AutoAWQ's (128 samples of 512 tokens)."""

    group_size: int = 128
    w_bit: int = 4
    zero_point: bool = True
    version: str = "GEMM"
    samples: int = 128
    seq_len: int = 512
    device: str = "auto"  # auto: CUDA if torch sees a GPU, else the CPU

    def quant_config(self) -> dict[str, Any]:
        """The dict ``BaseAWQForCausalLM.quantize`` takes."""
        return {"zero_point": self.zero_point, "q_group_size": self.group_size, "w_bit": self.w_bit, "version": self.version}

    def transformers_config(self) -> dict[str, Any]:
        """``config.json``'s ``quantization_config``, as AutoAWQ's ``AwqConfig.to_transformers_dict`` writes it."""
        return {"quant_method": "awq", "zero_point": self.zero_point, "group_size": self.group_size, "bits": self.w_bit,
                "version": self.version.lower(), "modules_to_not_convert": None}


@dataclass(frozen=True)
class _Source:
    """A checked source checkpoint: what the stages need before loading any weight."""

    ckpt: Checkpoint
    arch: str
    model_type: str
    n_params: int

    @property
    def root(self) -> Path:
        return self.ckpt.root


def calibration_dtype(model_type: str, device: str) -> str:
    """The dtype a family is calibrated in on ``device`` ("cpu" or "cuda")."""
    return CALIB_DTYPE_OVERRIDES.get((model_type, device), CALIB_DTYPES[device])


# --- checks (all before any heavy work) --------------------------------------------------


def _check_settings(settings: AwqSettings, where: Path) -> None:
    for name, allowed in SUPPORTED.items():
        value = getattr(settings, name)
        value = value.upper() if name == "version" else value
        if value not in allowed:
            raise QuantizeError(where, f"{name}={getattr(settings, name)!r} is not supported; use one of {', '.join(map(str, allowed))}")
    if settings.group_size <= 0 or settings.samples <= 0 or settings.seq_len < 2:
        raise QuantizeError(where, "group_size and samples must be positive and seq_len at least 2")


def _check_source(hf_dir: Path, out_dir: Path, settings: AwqSettings) -> _Source:
    """Open the checkpoint headers and refuse what AutoAWQ or our packing cannot take."""
    if out_dir.resolve() == hf_dir.resolve():
        raise QuantizeError(out_dir, "is the source checkpoint itself; choose another -o folder")
    _check_settings(settings, hf_dir)
    ckpt = open_checkpoint(hf_dir)
    arch = ckpt.architecture
    if arch not in FAMILIES:
        raise QuantizeError(hf_dir / "config.json", f"{arch} is not supported for AWQ; supported: {', '.join(FAMILIES)} "
                            "(the AutoAWQ 0.2.9 families checked against transformers 5)")
    model_type = FAMILIES[arch]
    if ckpt.config.get("model_type") != model_type:
        raise QuantizeError(hf_dir / "config.json", f"model_type {ckpt.config.get('model_type')!r} does not match {arch} "
                            f"(expected {model_type!r})")
    _check_linear_shapes(ckpt, settings)
    n_params = sum(ref.n_elements for ref in ckpt.tensors.values())
    return _Source(ckpt, arch, model_type, n_params)


def _check_linear_shapes(ckpt: Checkpoint, settings: AwqSettings) -> None:
    """Every block matrix must split into whole groups and whole int32 words (WQLinear_GEMM's asserts)."""
    per_word = PACK_NUM_BITS // settings.w_bit
    shapes = {name: ref.shape for name, ref in ckpt.tensors.items() if ".layers." in name and len(ref.shape) == 2}
    common = math.gcd(*(in_f for _, in_f in shapes.values()))
    for name, (out_f, in_f) in shapes.items():
        if in_f % settings.group_size:
            fits = [str(g) for g in (128, 64, 32) if common % g == 0] or ["none of 128/64/32"]
            raise QuantizeError(ckpt.root, f"{name} has {in_f} input columns, not a multiple of --group-size "
                                f"{settings.group_size}; group sizes that divide every block matrix: {', '.join(fits)}")
        if out_f % per_word or out_f % OC_BATCH:
            raise QuantizeError(ckpt.root, f"{name} has {out_f} output rows; AutoAWQ's GEMM packing and clip search "
                                f"need a multiple of {OC_BATCH}")


def resolve_device(requested: str, where: Path) -> str:
    """``auto`` -> ``cuda`` if torch sees a GPU, else ``cpu``; ``cuda`` without one is refused."""
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if requested == "cuda" and not has_cuda:
        raise QuantizeError(where, f"--device cuda asked for, but torch {torch.__version__} sees no CUDA GPU here; run on a GPU "
                            "machine with a CUDA build of torch, or use --device cpu (slower, calibrates in float32)")
    return requested


def _ram_needed(src: _Source, settings: AwqSettings, device: str, calibrate: bool) -> int:
    """Bytes of host RAM a run needs, roughly and on the safe side.

    The whole model is loaded on the host in the calibration dtype (float32 on the CPU, float16 or
    bfloat16 for CUDA, which then takes one block at a time).  On the CPU the calibration activations live in
    RAM too: AutoAWQ keeps a block's inputs and outputs, a copy of every linear's input
    (q, k, v, o, gate, up: ~6x hidden; down: intermediate) and the MLP's intermediates, and runs
    attention on all samples at once (``n_parallel_calib_samples=None``), i.e. a
    samples x heads x seq^2 score matrix.
    """
    width = 4 if calibration_dtype(src.model_type, device) == "float32" else 2
    weights = src.n_params * width
    if device == "cuda" or not calibrate:
        return int(weights * 1.2) + GiB
    cfg = {**src.ckpt.config, **src.ckpt.config.get("text_config", {})}
    tokens = settings.samples * settings.seq_len
    acts = tokens * (10 * cfg["hidden_size"] + 4 * cfg["intermediate_size"]) * width
    scores = settings.samples * cfg["num_attention_heads"] * settings.seq_len**2 * width
    return int(weights * 1.2 + acts + scores) + GiB


def _check_ram(src: _Source, settings: AwqSettings, device: str, calibrate: bool) -> None:
    import psutil

    need = _ram_needed(src, settings, device, calibrate)
    avail = psutil.virtual_memory().available
    if need > avail:
        what = f"{src.n_params / 1e9:.2f} B parameters in {calibration_dtype(src.model_type, device)}"
        what += " plus calibration activations" if calibrate else ""
        hint = "run it on a GPU machine (--device cuda), lower --samples/--seq-len, or free memory" if device == "cpu" else "free memory"
        raise QuantizeError(src.root, f"needs about {need / GiB:.1f} GiB of RAM ({what}) but {avail / GiB:.1f} GiB is available; {hint}")


# --- calibration text --------------------------------------------------------------------


def calibration_samples(tokenizer: Any, text_file: Path, samples: int, seq_len: int) -> tuple[list[list[int]], int]:
    """``samples`` windows of exactly ``seq_len`` tokens spread evenly over the text, and its token count.

    The text goes through the model's own tokenizer once; windows start at evenly spaced offsets
    (so a long text is sampled throughout, not just its beginning) and do not overlap.  Each
    starts with BOS when the tokenizer has one, as real prompts do, so the attention-sink
    activations a model puts on its first token are part of what AWQ sees.
    """
    text = read_text(text_file, "calibration text", "; pass a UTF-8 text file with --calib")
    ids: list[int] = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = tokenizer.bos_token_id
    body = seq_len - (bos is not None)
    if len(ids) < samples * body:
        raise QuantizeError(text_file, f"holds {len(ids)} tokens, but {samples} samples x {seq_len} tokens need {samples * body}; "
                            "give a longer calibration text (--calib) or lower --samples/--seq-len")
    stride = len(ids) // samples
    head = [bos] if bos is not None else []
    return [head + ids[i * stride : i * stride + body] for i in range(samples)], len(ids)


# --- the stages --------------------------------------------------------------------------


def quantize_awq(hf_dir: str | Path, out_dir: str | Path, calib_text_file: str | Path, settings: AwqSettings = AwqSettings()) -> Path:
    """AWQ-quantize a float16/bf16/fp32 HF checkpoint folder to a 4-bit GEMM AWQ folder ``out_dir``."""
    return _run("awq", Path(hf_dir), Path(out_dir), Path(calib_text_file), settings)


def quantize_rtn(hf_dir: str | Path, out_dir: str | Path, settings: AwqSettings = AwqSettings()) -> Path:
    """The baseline: plain 4-bit round-to-nearest with the same groups, zero points, packing and folder as AWQ."""
    return _run("rtn", Path(hf_dir), Path(out_dir), None, settings)


def _run(method: str, hf_dir: Path, out_dir: Path, calib: Path | None, settings: AwqSettings) -> Path:
    """Check everything, load, quantize (AWQ or RTN), then write the folder atomically."""
    require_autoawq()
    import torch

    src = _check_source(hf_dir, out_dir, settings)
    device = resolve_device(settings.device, hf_dir)
    _check_ram(src, settings, device, calibrate=calib is not None)
    tokenizer, samples, calibration = _calibration(hf_dir, calib, settings) if calib is not None else (None, [], None)

    dtype_name = calibration_dtype(src.model_type, device)
    dtype = getattr(torch, dtype_name)
    t0 = time.monotonic()
    model = _load_float_model(src, dtype)
    t1 = time.monotonic()
    log.info("%s: %s on %s in %s (%.1fs to load)", hf_dir, method.upper(), device, dtype, t1 - t0)
    _quantize_in_place(method, model, src, tokenizer, samples, settings, device)
    t2 = time.monotonic()
    log.info("%s: %s done in %.1fs", hf_dir, method.upper(), t2 - t1)
    provenance = {
        "method": method, "tool": f"{TOOL_NAME} {__version__}", "settings": asdict(settings), "device": device,
        "calibration_dtype": dtype_name, "calibration": calibration,
        "seconds": {"load": round(t1 - t0, 2), "quantize": round(t2 - t1, 2)},
        "autoawq_fixes": list(AUTOAWQ_FIXES),
        "versions": _versions(), "source": {"path": str(hf_dir), "sha256": _source_hashes(hf_dir)},
    }
    with atomic_dir(out_dir) as tmp:
        _write_folder(model, src, settings, provenance, tmp)
    log.info("%s: written", out_dir)
    return out_dir


def _calibration(hf_dir: Path, calib: Path, settings: AwqSettings) -> tuple[Any, list[list[int]], dict[str, Any]]:
    """(tokenizer, token samples, provenance record) for a calibration text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    samples, n_tokens = calibration_samples(tokenizer, calib, settings.samples, settings.seq_len)
    record = {"file": str(calib), "sha256": sha256_file(calib), "text_tokens": n_tokens, "samples": settings.samples,
              "seq_len": settings.seq_len, "bos_first": tokenizer.bos_token_id is not None}
    return tokenizer, samples, record


def _quantize_in_place(method: str, model: Any, src: _Source, tokenizer: Any, samples: list[list[int]], settings: AwqSettings,
                       device: str) -> None:
    """Replace every block linear of ``model`` by a packed ``WQLinear_GEMM``: AutoAWQ's search, or none (RTN).

    ``calib_data`` is always our token list: given a string, AutoAWQ would download a hub data set.
    """
    from . import autoawq_compat as compat
    from .awq_models import wrap_model

    awq_model = wrap_model(model, src.model_type)
    with compat.offset_norms_folded(), (compat.pinned_to_cpu() if device == "cpu" else contextlib.nullcontext()):
        if method == "awq":
            awq_model.quantize(tokenizer, settings.quant_config(), calib_data=samples, max_calib_samples=settings.samples,
                               max_calib_seq_len=settings.seq_len, quantizer_cls=compat.BlockKwargsAwqQuantizer)
        else:
            compat.round_to_nearest(awq_model, settings.w_bit, settings.group_size, settings.zero_point, settings.version)


def _load_float_model(src: _Source, dtype: torch.dtype) -> Any:
    """The source model in ``dtype`` through its own transformers class, cache off.

    AutoAWQ's ``from_pretrained`` is bypassed (see :mod:`quantize.autoawq_compat`).  ``use_cache``
    is switched off because the KV cache AutoAWQ's layer-0 catcher captures would otherwise be
    handed to every calibration forward and grow with each.
    """
    import transformers

    model = getattr(transformers, src.arch).from_pretrained(src.root, dtype=dtype, local_files_only=True)
    model.config.use_cache = False
    return model.eval()


# --- writing -----------------------------------------------------------------------------


def _write_folder(model: Any, src: _Source, settings: AwqSettings, provenance: dict[str, Any], out: Path) -> None:
    from safetensors.torch import save_file

    save_file(_disk_state_dict(model, set(src.ckpt.tensors)), str(out / "model.safetensors"),
              metadata={"format": "pt", f"{TOOL_NAME}.method": provenance["method"]})
    config = dict(src.ckpt.config)
    config["quantization_config"] = settings.transformers_config()
    config["dtype"] = config["torch_dtype"] = "float16"  # "torch_dtype" for readers older than transformers 4.56
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = _copy_side_files(src.root, out)
    if "generation_config.json" not in copied:
        model.generation_config.save_pretrained(out)
    (out / "provenance.json").write_text(json.dumps({**provenance, "copied": copied}, indent=2) + "\n")


def _disk_state_dict(model: Any, source_names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors that go on disk: packed int32 for quantized linears, float16 for everything else.

    Only names the source stored are kept (plus the packed triple replacing a quantized
    ``.weight``), so a tied ``lm_head`` stays implicit, as in the source, and nothing is lost:
    every source tensor must be accounted for.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for name, t in model.state_dict().items():
        base, _, leaf = name.rpartition(".")
        if leaf in PACKED and f"{base}.weight" in source_names:
            covered.add(f"{base}.weight")
        elif name not in source_names:
            continue
        covered.add(name)
        t = t.detach().to("cpu", torch.float16 if t.is_floating_point() else t.dtype)
        out[name] = t.contiguous()
    if missing := sorted(source_names - covered):
        raise RuntimeError(f"quantized model lost source tensors: {missing[:5]}")
    return out


def _copy_side_files(src: Path, out: Path) -> list[str]:
    names = sorted({p.name for pattern in SIDE_FILE_PATTERNS for p in src.glob(pattern)})
    for name in names:
        copy = shutil.copytree if (src / name).is_dir() else shutil.copy2
        copy(src / name, out / name)
    return names


def _source_hashes(root: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(root.iterdir()) if p.is_file()}


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "absent"
    return found


# --- reading back ------------------------------------------------------------------------


def unpack_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM-packed int32 words -> (weights ``[in, out]``, zeros ``[groups, out]``) as int32 in ``0..2^bits-1``.

    AutoAWQ's own helpers (awq/utils/packing_utils.py): ``unpack_awq`` shifts the nibbles out,
    ``reverse_awq_order`` undoes the interleaving, and the mask drops the sign bits the int8
    cast carries.
    """
    import torch
    from awq.utils.packing_utils import reverse_awq_order, unpack_awq

    iw, iz = reverse_awq_order(*unpack_awq(qweight, qzeros, bits), bits)
    mask = (1 << bits) - 1
    return iw.to(torch.int32) & mask, iz.to(torch.int32) & mask


def pack_gemm(iweight: torch.Tensor, izeros: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`unpack_gemm`: AutoAWQ's GEMM layout (``WQLinear_GEMM.from_linear``).

    Each int32 holds ``32/bits`` consecutive output columns, nibble ``i`` holding column
    ``AWQ_ORDER[i]`` = ``[0, 2, 4, 6, 1, 3, 5, 7][i]`` of its group of 8 (the order AWQ's CUDA
    kernel dequantizes in).
    """
    from awq.utils.packing_utils import AWQ_ORDER

    return _pack_columns(iweight, bits, AWQ_ORDER), _pack_columns(izeros, bits, AWQ_ORDER)


def _pack_columns(values: torch.Tensor, bits: int, order: list[int]) -> torch.Tensor:
    import torch

    per = PACK_NUM_BITS // bits
    rows, cols = values.shape
    v = values.to(torch.int32).reshape(rows, cols // per, per)
    packed = torch.zeros(rows, cols // per, dtype=torch.int32, device=values.device)
    for i, col in enumerate(order):
        packed |= v[..., col] << (i * bits)  # int32 shifts wrap into the sign bit, as AutoAWQ's do
    return packed


def dequantize_state_dict(tensors: dict[str, torch.Tensor], bits: int, group_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace every ``X.qweight/qzeros/scales`` triple by ``X.weight`` ``[out, in]`` in ``dtype``.

    ``w = (q - z) * s`` per group (AWQ's asymmetric quantizer), computed by AutoAWQ's
    ``dequantize_gemm`` in float16 exactly as its CUDA/Triton kernels do, then widened.
    """
    from awq.utils.packing_utils import dequantize_gemm

    out = {k: v.to(dtype) for k, v in tensors.items() if k.rpartition(".")[2] not in PACKED}
    for name in tensors:
        base, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            w = dequantize_gemm(tensors[name], tensors[f"{base}.qzeros"], tensors[f"{base}.scales"], bits, group_size)
            out[f"{base}.weight"] = w.t().contiguous().to(dtype)
    return out


def load_awq_as_float(out_dir: str | Path, dtype: torch.dtype | None = None) -> Any:
    """Read an AWQ (or RTN) GEMM folder from disk into an ordinary transformers model in ``dtype`` (float32 by default).

    For evaluation on machines without AWQ kernels: weights are dequantized once, so the model
    computes exactly what the packed integers say, in ordinary ``nn.Linear`` layers.
    """
    require_autoawq()  # its unpacking order
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(out_dir)
    dtype = dtype or torch.float32
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise QuantizeError(folder, "no config.json; not an AWQ checkpoint folder")
    qc = json.loads(cfg_path.read_text(encoding="utf-8")).get("quantization_config") or {}
    if qc.get("quant_method") != "awq" or str(qc.get("version", "")).lower() != "gemm" or qc.get("bits") != 4:
        raise QuantizeError(cfg_path, f"quantization_config {qc or None} is not 4-bit AWQ GEMM; this loader reads only that")
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise QuantizeError(folder, "no .safetensors files; the AWQ folder is incomplete")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(shard)))
    state = dequantize_state_dict(tensors, int(qc["bits"]), int(qc["group_size"]), dtype)

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    del config.quantization_config  # the weights are float now; keep transformers from looking for AWQ kernels
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.get_text_config().tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise QuantizeError(folder, f"tensors do not match {config.architectures}: missing {sorted(set(missing) - tied)[:5]}, "
                            f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    return model.eval()


# --- command line ------------------------------------------------------------------------


def add_awq_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """``quantize awq HF_DIR -o OUT_DIR [--calib FILE] [--device ...] [--group-size N] [--samples N --seq-len N] [--method rtn]``."""
    d = AwqSettings()
    s = subparsers.add_parser("awq", help="4-bit AWQ (AutoAWQ, GEMM layout) of an HF checkpoint, or its RTN baseline")
    s.add_argument("hf_dir", type=Path)
    s.add_argument("-o", "--output", type=Path, required=True, help="output folder (written atomically)")
    s.add_argument("--calib", type=Path, help="UTF-8 calibration text (default: the demo's calibration split, Shakespeare; "
                   "use text from the model's own domain for a release)")
    s.add_argument("--device", choices=DEVICES, default=d.device, help="auto: CUDA if available, else CPU (float32, slow)")
    s.add_argument("--group-size", type=int, default=d.group_size)
    s.add_argument("--samples", type=int, default=d.samples, help="calibration windows")
    s.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per calibration window")
    s.add_argument("--method", choices=("awq", "rtn"), default="awq", help="rtn: the round-to-nearest baseline (no calibration)")
    s.set_defaults(func=_awq_command)
    return s


def _awq_command(a: argparse.Namespace) -> int:
    require_autoawq()
    settings = AwqSettings(group_size=a.group_size, samples=a.samples, seq_len=a.seq_len, device=a.device)
    if a.method == "rtn":
        out = quantize_rtn(a.hf_dir, a.output, settings)
    elif a.calib is not None:
        out = quantize_awq(a.hf_dir, a.output, a.calib, settings)
    else:
        from .corpus import TextSplit, write_splits

        log.warning("no --calib given: calibrating on the demo's Shakespeare split")
        with tempfile.TemporaryDirectory(prefix="quantize-calib-") as tmp:
            out = quantize_awq(a.hf_dir, a.output, write_splits(TextSplit(), Path(tmp))["calib"], settings)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{out}: {a.method.upper()} {settings.w_bit}-bit g{settings.group_size}, {size / 2**20:.1f} MiB")
    return 0
