"""Importance matrices: which input columns of each weight matrix matter, from calibration text.

For every weight matrix W (out x in) the quantity ``llama-imatrix`` collects is the per-column
sum of squared activations ``sum_t x_t[j]^2`` over the calibration tokens, with the token count;
llama.cpp's quantizers then weight each column's rounding error by the mean ``sum/count``
(llama.cpp tools/imatrix).  We compute it in torch with forward hooks on the float model, name
each matrix by its GGUF tensor name through gguf-py's tensor map, and save it in llama.cpp's GGUF
imatrix layout (``<tensor>.in_sum2``, ``<tensor>.counts``, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``) so ``llama-quantize --imatrix`` reads it too.

Calibration text is never the evaluation text: the same file is refused, a large overlap warned.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .atomic import atomic_file
from .errors import QuantizeError
from .gguf_info import field_value, open_gguf
from .progress import progress
from .resources import check_float32_fits

log = logging.getLogger(__name__)

OVERLAP_WARN = 0.10  # fraction of calibration lines also found in the evaluation text


@dataclass(frozen=True)
class ImatrixSettings:
    ctx: int = 512  # tokens per chunk (llama-imatrix's default -c 512)
    chunks: int | None = None  # None: every full chunk of the text


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]  # GGUF tensor name -> per-input-column sum of squares (float32)
    counts: dict[str, int]  # GGUF tensor name -> tokens seen
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def means(self) -> dict[str, np.ndarray]:
        return {k: (v / max(self.counts[k], 1)).astype(np.float32) for k, v in self.sums.items()}

    def sha256(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.sums):
            h.update(k.encode())
            h.update(self.sums[k].tobytes())
            h.update(str(self.counts[k]).encode())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_file(path) as tmp:
            w = gguf.GGUFWriter(tmp, arch="")
            w.add_type("imatrix")
            w.add_array("imatrix.datasets", self.datasets)
            w.add_uint32("imatrix.chunk_count", self.chunk_count)
            w.add_uint32("imatrix.chunk_size", self.chunk_size)
            for name in sorted(self.sums):
                w.add_tensor(f"{name}.in_sum2", self.sums[name].reshape(1, -1).astype(np.float32))
                w.add_tensor(f"{name}.counts", np.array([[float(self.counts[name])]], dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        return path

    @classmethod
    def load(cls, path: str | Path) -> Imatrix:
        r = open_gguf(path)
        if field_value(r, "general.type") != "imatrix" and not any(t.name.endswith(".in_sum2") for t in r.tensors):
            raise QuantizeError(path, "not an importance-matrix GGUF (no general.type=imatrix, no *.in_sum2 tensors)")
        tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in r.tensors}
        sums, counts = {}, {}
        for name, data in tensors.items():
            if name.endswith(".in_sum2"):
                base = name.removesuffix(".in_sum2")
                if f"{base}.counts" not in tensors:
                    raise QuantizeError(path, f"{name} has no matching {base}.counts tensor")
                sums[base] = data.reshape(-1)
                counts[base] = int(tensors[f"{base}.counts"].reshape(-1)[0])
        return cls(sums, counts, list(field_value(r, "imatrix.datasets") or []),
                   int(field_value(r, "imatrix.chunk_count") or 0), int(field_value(r, "imatrix.chunk_size") or 0))


def check_calibration_text(calib: Path, eval_text: Path | None) -> None:
    """Refuse calibrating on the evaluation text; warn when they overlap a lot."""
    if eval_text is None:
        return
    if calib.resolve() == eval_text.resolve() or _sha(calib) == _sha(eval_text):
        raise QuantizeError(calib, f"is the evaluation text ({eval_text}); calibrate on different text")
    cal = {ln.strip() for ln in calib.read_text(encoding="utf-8").splitlines() if len(ln.strip()) > 20}
    ev = {ln.strip() for ln in eval_text.read_text(encoding="utf-8").splitlines() if len(ln.strip()) > 20}
    if cal and len(cal & ev) / len(cal) > OVERLAP_WARN:
        msg = f"{calib}: {len(cal & ev) / len(cal):.0%} of its lines also appear in {eval_text}; evaluation will flatter the quants"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_text(path: Path, what: str = "text", hint: str = "") -> str:
    """A UTF-8 text file, or a one-line error naming it (``hint`` says how to pass another)."""
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise QuantizeError(path, f"{what} not found{hint}") from None
    except UnicodeDecodeError as exc:
        raise QuantizeError(path, f"{what} is not UTF-8 (byte {exc.start}); re-encode it") from None


def load_float_model(source: Path) -> tuple[Any, Any]:
    """(model in float32, tokenizer) from an HF folder or an F16/F32 GGUF (dequantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.is_file() and source.suffix == ".gguf":
        kw: dict[str, Any] = {"gguf_file": source.name}
        root = source.parent
    elif (source / "config.json").is_file():
        kw, root = {}, source
    else:
        raise QuantizeError(source, "expected an HF checkpoint folder or a .gguf file")
    if not kw:
        check_float32_fits(root, "the importance matrix")
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(root, **kw)
    return model.eval(), tok


def gguf_matrix_names(model: Any) -> dict[str, str]:
    """HF Linear module name -> GGUF weight name, through gguf-py's tensor map."""
    import torch

    from .architectures import lookup

    arch = lookup(model.config.architectures[0], "config.json")
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, model.config.num_hidden_layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    names = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        gname = tmap.get_name(mod_name + ".weight", try_suffixes=(".weight",))
        if gname is None:
            continue
        if gname == "output.weight" and tied:
            gname = "token_embd.weight"  # llama.cpp multiplies by token_embd when output is tied
        names[mod_name] = gname
    return names


def compute_imatrix(source: str | Path, text_file: str | Path, settings: ImatrixSettings = ImatrixSettings(),
                    eval_text: str | Path | None = None) -> Imatrix:
    """Collect per-column mean squared activations of every matrix over calibration chunks."""
    import torch

    source, text_file = Path(source), Path(text_file)
    check_calibration_text(text_file, Path(eval_text) if eval_text else None)
    text = read_text(text_file, "text file")
    model, tok = load_float_model(source)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_chunks = len(ids) // settings.ctx
    if settings.chunks is not None:
        n_chunks = min(n_chunks, settings.chunks)
    if n_chunks < 1:
        raise QuantizeError(text_file, f"has {len(ids)} tokens, fewer than one chunk of {settings.ctx}")
    names = gguf_matrix_names(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(gname: str) -> Any:
        def collect(_mod: Any, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[gname] = sums.get(gname, 0) + (x * x).sum(0)  # type: ignore[assignment]
            counts[gname] = counts.get(gname, 0) + x.shape[0]

        return collect

    # The output matrix only needs its input, the decoder's last hidden state: running the decoder
    # alone and feeding that to the hook skips the logits, which for a 262k-token vocabulary cost
    # more than the rest of the model.
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    decoder = model.get_decoder() if head_name in names else None
    handles = [mod.register_forward_hook(hook(names[n])) for n, mod in model.named_modules()
               if n in names and not (decoder is not None and n == head_name)]
    bos = tok.bos_token_id
    try:
        with torch.no_grad():
            for c in progress(range(n_chunks), n_chunks, "imatrix"):
                chunk = ids[c * settings.ctx : (c + 1) * settings.ctx]
                if bos is not None:
                    chunk = [bos, *chunk[1:]]  # as llama-imatrix: each chunk starts with BOS
                if decoder is None:
                    model(torch.tensor([chunk]))
                else:
                    hidden = decoder(torch.tensor([chunk])).last_hidden_state
                    hook(names[head_name])(head, (hidden,), None)  # type: ignore[index]
    finally:
        for h in handles:
            h.remove()
    log.info("imatrix: %d chunks of %d tokens, %d matrices", n_chunks, settings.ctx, len(sums))
    return Imatrix({k: v.numpy().astype(np.float32) for k, v in sums.items()}, counts, [text_file.name],
                   n_chunks, settings.ctx)
