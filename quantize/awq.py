"""Stage 3: 4-bit AWQ checkpoints for GPU servers (vLLM, TGI, transformers), with a measured baseline.

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
* :class:`quantize.engine.autoawq_compat.StreamingAwqQuantizer`, which runs AutoAWQ's per-block steps
  with one block resident, fixes a CPU-only aliasing bug in AutoAWQ's scale search and gives each
  block its own attention mask and rotary embedding, and
  :func:`quantize.engine.autoawq_compat.offset_norms_folded`, which folds scales correctly into the
  ``(1 + w)`` norms of the family's row (Gemma's);
* the layer maps of :mod:`quantize.engine.awq_models` (AutoAWQ's, plus ours for Gemma 3 and Phi-3);

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

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from quantize import TOOL_NAME, __version__
from quantize.architectures import ARCHITECTURES, Architecture, for_step
from quantize.atomic import atomic_dir, check_output, sha256_file
from quantize.engine.stream import WIDTH, CheckpointSource, Skeleton, StreamNeed, StreamSettings, resolve_device, stream_need
from quantize.errors import QuantizeError
from quantize.formats.checkpoint import Checkpoint, copy_tokenizer_files, open_checkpoint
from quantize.formats.safetensors import save_tensors
from quantize.text import read_text
from quantize.versions import tool_versions

if TYPE_CHECKING:
    import torch

# torch, transformers and AutoAWQ (through quantize.engine.autoawq_compat and awq_models) are imported inside
# the functions that calibrate or load: each takes seconds, and AutoAWQ is an optional extra.

log = logging.getLogger(__name__)

# AutoAWQ as the README installs it: `pip install --no-deps` (the `awq` extra in pyproject.toml names the
# same pin), because its declared requirements (triton, accelerate, ...) would pull CUDA builds we do not use.
AUTOAWQ = "autoawq==0.2.9"


def require_autoawq() -> None:
    """Import AutoAWQ (through :mod:`quantize.engine.autoawq_compat`, which keeps its farewell notice off the
    console); refuse, as a one-line error, when it cannot be imported."""
    try:
        from quantize.engine import autoawq_compat  # noqa: F401
    except ImportError as e:
        if e.name is None or not e.name.startswith("awq"):
            raise
        raise QuantizeError("awq", f"AutoAWQ (the awq extra) is not installed; pip install --no-deps {AUTOAWQ}") from None


# What provenance.json lists under "autoawq_fixes" (see quantize/engine/autoawq_compat.py).
AUTOAWQ_FIXES = (
    "_compute_best_scale backs the block up with a copy (CopyingAwqQuantizer; CPU aliasing)",
    "each block runs with its own mask and rotary embedding, not block 0's (BlockKwargsAwqQuantizer)",
    "scales fold into (1 + w) norms as (1 + w) / s for Gemma 3 too (offset_norms_folded)",
)

# Device -> dtype the model is calibrated in.  The CPU has no fast float16 matmul and float16
# activations overflow on outlier channels; CUDA runs AutoAWQ's float16 path as upstream does.
CALIB_DTYPES: dict[str, str] = {"cpu": "float32", "cuda": "float16"}
DEVICES = ("auto", *CALIB_DTYPES)
# Settings AutoAWQ's GEMM path can produce and our loader can read back: WQLinear_GEMM packs
# 4-bit values only and needs zero points; GEMV/Marlin/exllama layouts are not unpacked here.
SUPPORTED: dict[str, tuple[Any, ...]] = {"w_bit": (4,), "zero_point": (True,), "version": ("GEMM",), "device": DEVICES}

PACKED = ("qweight", "qzeros", "scales")  # what replaces a quantized linear's ".weight"
OC_BATCH = 64  # AutoAWQ's clip search walks output channels 64 (or 256) at a time and asserts it divides
PACK_NUM_BITS = 32  # values are packed into int32 words

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
    family: Architecture
    n_params: int

    @property
    def arch(self) -> str:
        return self.family.hf_name

    @property
    def model_type(self) -> str:
        """The key of the family's layer map in quantize.engine.awq_models.MODEL_CLASSES."""
        assert self.family.awq_layer_map is not None
        return self.family.awq_layer_map

    @property
    def root(self) -> Path:
        return self.ckpt.root


def calibration_dtype(family: Architecture, device: str) -> str:
    """The dtype a family is calibrated in on ``device`` ("cpu" or "cuda"): the family's row
    overrides the device's default where that cannot hold its activations."""
    return family.calib_dtypes.get(device, CALIB_DTYPES[device])


def awq_family(ckpt: Checkpoint) -> Architecture:
    """The checkpoint's family row, refused when AWQ cannot run on it (one line naming the reason)."""
    where = ckpt.root / "config.json"
    family = for_step(ckpt.architecture, "awq", where)
    if family.awq_layer_map is None:
        raise QuantizeError(where, f"{family.hf_name} has no AWQ layer map; supported for AWQ: "
                                   f"{', '.join(a.hf_name for a in ARCHITECTURES.values() if a.awq_layer_map and 'awq' not in a.refused)}")
    if ckpt.config.get("model_type") != family.model_type:
        raise QuantizeError(where, f"model_type {ckpt.config.get('model_type')!r} does not match {family.hf_name} "
                                   f"(expected {family.model_type!r})")
    return family


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
    check_output(out_dir, [hf_dir], folder=True)
    _check_settings(settings, hf_dir)
    ckpt = open_checkpoint(hf_dir)
    family = awq_family(ckpt)
    _check_linear_shapes(ckpt, settings)
    n_params = sum(ref.n_elements for ref in ckpt.tensors.values())
    return _Source(ckpt, family, n_params)


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


def ram_need(src: _Source, settings: AwqSettings, device: str, calibrate: bool) -> StreamNeed:
    """Host RAM a run needs, roughly and on the safe side, with one block resident at a time.

    One block's weights in the calibration dtype (then its packed copy), the embeddings or the
    output matrix, and the calibration activations AutoAWQ keeps for the block being searched: its
    inputs and outputs, a copy of every linear's input (q, k, v, o, gate, up: ~6x hidden; down:
    intermediate) and the MLP's intermediates, with attention over all samples at once
    (``n_parallel_calib_samples=None``), i.e. a samples x heads x seq^2 score matrix; and the scale
    search's own copies: the backup of the module it inspects (the MLP, three hidden x intermediate
    matrices) and the pseudo-quantizer's temporaries (four of the largest matrix).  On CUDA the
    activations and the search live on the GPU and the host holds the block only while it is moved.
    """
    dtype = calibration_dtype(src.family, device)
    width = WIDTH[dtype]
    base = stream_need(CheckpointSource(src.ckpt), src.ckpt.config, dtype, 0, 0)
    if device == "cuda" or not calibrate:
        return StreamNeed(base.block, base.ends, 0, 0)
    cfg = {**src.ckpt.config, **src.ckpt.config.get("text_config", {})}
    tokens = settings.samples * settings.seq_len
    acts = tokens * (10 * cfg["hidden_size"] + 4 * cfg["intermediate_size"]) * width
    scores = settings.samples * cfg["num_attention_heads"] * settings.seq_len**2 * width
    search = (3 + 4) * cfg["hidden_size"] * cfg["intermediate_size"] * width
    return StreamNeed(base.block, base.ends, tokens * cfg["hidden_size"] * width, acts + scores + search)


def ram_need_for(hf_dir: Path, settings: AwqSettings) -> StreamNeed:
    """:func:`ram_need` of a checkpoint folder for an AWQ run with ``settings``."""
    ckpt = open_checkpoint(hf_dir)
    return ram_need(_Source(ckpt, awq_family(ckpt), 0), settings, resolve_device(settings.device, hf_dir), True)


def _check_ram(src: _Source, settings: AwqSettings, device: str, calibrate: bool) -> None:
    need = ram_need(src, settings, device, calibrate)
    avail = psutil.virtual_memory().available
    log.info("%s: AWQ RAM needed: %s", src.root.name, need.describe())
    if need.total > avail:
        what = f"one block in {calibration_dtype(src.family, device)}" + (" plus calibration activations" if calibrate else "")
        hint = "run it on a GPU machine (--device cuda), lower --samples/--seq-len, or free memory" if device == "cpu" else "free memory"
        raise QuantizeError(src.root, f"needs about {need.total / GiB:.1f} GiB of RAM ({what}; {need.describe()}) but "
                            f"{avail / GiB:.1f} GiB is available; {hint}")


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
    """Check everything, then quantize (AWQ or RTN) one decoder block at a time, writing each block's
    packed weights as soon as it is done, into a folder that appears atomically."""
    require_autoawq()
    src = _check_source(hf_dir, out_dir, settings)
    device = resolve_device(settings.device, hf_dir)
    _check_ram(src, settings, device, calibrate=calib is not None)
    tokenizer, samples, calibration = _calibration(hf_dir, calib, settings) if calib is not None else (None, [], None)
    dtype_name = calibration_dtype(src.family, device)
    log.info("%s: %s on %s in %s, one block at a time", hf_dir, method.upper(), device, dtype_name)
    t0 = time.monotonic()
    with atomic_dir(out_dir) as tmp:
        writer = _ShardWriter(tmp, src, method)
        model = _quantize_streamed(method, src, tokenizer, samples, settings, device, dtype_name, writer)
        t1 = time.monotonic()
        log.info("%s: %s done in %.1fs", hf_dir, method.upper(), t1 - t0)
        provenance = {
            "method": method, "tool": f"{TOOL_NAME} {__version__}", "settings": asdict(settings), "device": device,
            "calibration_dtype": dtype_name, "calibration": calibration, "streamed": "one decoder block resident at a time",
            "seconds": {"quantize": round(t1 - t0, 2)},
            "autoawq_fixes": list(AUTOAWQ_FIXES),
            "versions": tool_versions(VERSIONED_PACKAGES), "source": {"path": str(hf_dir), "sha256": _source_hashes(hf_dir)},
        }
        _write_config(model, src, settings, provenance, tmp)
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


def _quantize_streamed(method: str, src: _Source, tokenizer: Any, samples: list[list[int]], settings: AwqSettings, device: str,
                       dtype: str, writer: _ShardWriter) -> Any:
    """Replace every block linear by a packed ``WQLinear_GEMM``, block by block (AutoAWQ's search, or none for
    RTN), handing each finished block to ``writer``; returns the (meta) model for its configuration.

    ``calib_data`` is always our token list: given a string, AutoAWQ would download a hub data set.
    """
    from quantize.engine import autoawq_compat as compat
    from quantize.engine.awq_models import wrap_model

    sk = Skeleton(src.root, writer.source, StreamSettings(device, dtype))
    awq_model = wrap_model(sk.model, src.model_type)

    def done(i: int, block: Any) -> None:
        writer.write(i + 1, sk.name_of(block), block.state_dict())

    with compat.offset_norms_folded(sk.model, src.family), (compat.pinned_to_cpu() if device == "cpu" else contextlib.nullcontext()):
        if method == "awq":
            def quantizer(*args: Any, **kwargs: Any) -> Any:
                return compat.StreamingAwqQuantizer(sk, done, *args, **kwargs)

            awq_model.quantize(tokenizer, settings.quant_config(), calib_data=samples, max_calib_samples=settings.samples,
                               max_calib_seq_len=settings.seq_len, quantizer_cls=quantizer)
        else:
            for i, block in enumerate(sk.layers):
                with sk.resident(block):
                    compat.round_to_nearest_block(block, settings.w_bit, settings.group_size, settings.zero_point, settings.version)
                    done(i, block)
    writer.finish()
    return sk.model


# --- writing -----------------------------------------------------------------------------


class _ShardWriter:
    """The AWQ folder's weights, written as they are made: one safetensors shard per decoder block
    (packed int32 for quantized linears, float16 for the rest), then a last shard with every other
    tensor of the source (embeddings, final norm, untied output matrix) copied in float16, and the
    shard index.  Only names the source stored are kept (plus the packed triple replacing a
    quantized ``.weight``), so a tied ``lm_head`` stays implicit, as in the source; every source
    tensor must be accounted for."""

    def __init__(self, out: Path, src: _Source, method: str) -> None:
        self.out, self.method = out, method
        self.source = CheckpointSource(src.ckpt)
        self.names = set(src.ckpt.tensors)
        self.count = 1 + len({n.split(".layers.")[1].split(".")[0] for n in self.names if ".layers." in n})
        self.covered: set[str] = set()
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write(self, k: int, prefix: str, state: dict[str, Any]) -> None:
        import torch

        shard = f"model-{k:05d}-of-{self.count:05d}.safetensors"
        out: dict[str, torch.Tensor] = {}
        for leaf_name, t in state.items():
            name = f"{prefix}.{leaf_name}" if prefix else leaf_name
            base, _, leaf = name.rpartition(".")
            if leaf in PACKED and f"{base}.weight" in self.names:
                self.covered.add(f"{base}.weight")
            elif name not in self.names:
                continue
            self.covered.add(name)
            out[name] = t.detach().to("cpu", torch.float16 if t.is_floating_point() else t.dtype).contiguous()
            self.weight_map[name] = shard
            self.total += out[name].numel() * out[name].element_size()
        save_tensors(self.out / shard, out, metadata={"format": "pt", f"{TOOL_NAME}.method": self.method})

    def finish(self) -> None:
        rest = sorted(self.names - self.covered)
        if any(".layers." in n for n in rest):
            raise RuntimeError(f"quantized model lost source tensors: {[n for n in rest if '.layers.' in n][:5]}")
        self.write(self.count, "", {n: self.source.get(n) for n in rest})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_config(model: Any, src: _Source, settings: AwqSettings, provenance: dict[str, Any], out: Path) -> None:
    config = dict(src.ckpt.config)
    config["quantization_config"] = settings.transformers_config()
    config["dtype"] = config["torch_dtype"] = "float16"  # "torch_dtype" for readers older than transformers 4.56
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copied = copy_tokenizer_files(src.root, out)
    if "generation_config.json" not in copied:
        model.generation_config.save_pretrained(out)
    (out / "provenance.json").write_text(json.dumps({**provenance, "copied": copied}, indent=2) + "\n")


def _source_hashes(root: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(root.iterdir()) if p.is_file()}


# --- reading back ------------------------------------------------------------------------


class AwqSource:
    """An AWQ (or RTN) GEMM folder's tensors as float weights: a packed linear's ``X.weight`` ``[out, in]`` is
    dequantized when it is read, ``w = (q - z) * s`` per group (AWQ's asymmetric quantizer) by AutoAWQ's
    ``dequantize_gemm`` in float16, exactly as its CUDA/Triton kernels compute it."""

    def __init__(self, inner: CheckpointSource, bits: int, group_size: int) -> None:
        self.inner, self.bits, self.group_size = inner, bits, group_size
        self.root = inner.root

    @classmethod
    def open(cls, folder: Path) -> AwqSource:
        require_autoawq()  # its unpacking order
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise QuantizeError(folder, "no config.json; not an AWQ checkpoint folder")
        qc = json.loads(cfg_path.read_text(encoding="utf-8")).get("quantization_config") or {}
        if qc.get("quant_method") != "awq" or str(qc.get("version", "")).lower() != "gemm" or qc.get("bits") != 4:
            raise QuantizeError(cfg_path, f"quantization_config {qc or None} is not 4-bit AWQ GEMM; this loader reads only that")
        return cls(CheckpointSource.open(folder), int(qc["bits"]), int(qc["group_size"]))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in self.inner.shapes().items():
            base, _, leaf = name.rpartition(".")
            if leaf == "qweight":
                out[f"{base}.weight"] = (shape[1] * PACK_NUM_BITS // self.bits, shape[0])
            elif leaf not in PACKED:
                out[name] = shape
        return out

    def get(self, name: str) -> Any:
        from awq.utils.packing_utils import dequantize_gemm

        base = name.removesuffix(".weight")
        if name.endswith(".weight") and f"{base}.qweight" in self.inner.ckpt.tensors:
            q, z, s = (self.inner.get(f"{base}.{leaf}") for leaf in PACKED)
            return dequantize_gemm(q, z, s, self.bits, self.group_size).t().contiguous()
        return self.inner.get(name)


def load_awq_as_float(out_dir: str | Path, dtype: torch.dtype | None = None) -> Any:
    """Read an AWQ (or RTN) GEMM folder from disk into an ordinary transformers model in ``dtype`` (float32 by default),
    every linear dequantized by :class:`AwqSource` (the whole model in memory: for tests and small models; the
    quality gate streams the same source block by block)."""
    require_autoawq()  # its unpacking order
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(out_dir)
    dtype = dtype or torch.float32
    source = AwqSource.open(folder)
    state = {name: source.get(name).to(dtype) for name in source.shapes()}
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
