"""Importance matrices: which input columns of each weight matrix matter, from calibration text.

For every weight matrix W (out x in) the quantity ``llama-imatrix`` collects is the per-column
sum of squared activations ``sum_t x_t[j]^2`` over the calibration tokens, with the token count;
llama.cpp's quantizers then weight each column's rounding error by the mean ``sum/count``
(llama.cpp tools/imatrix).  We compute it in torch with forward hooks on the float32 model run one
decoder block at a time over every chunk (:mod:`quantize.stream`), name each matrix by its GGUF tensor name through gguf-py's tensor map, and save it in llama.cpp's GGUF
imatrix layout (``<tensor>.in_sum2``, ``<tensor>.counts``, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``) so ``llama-quantize --imatrix`` reads it too.

Calibration text is never the evaluation text: the same file is refused, a large overlap warned.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .atomic import atomic_file
from .errors import QuantizeError
from .gguf_info import field_value, open_gguf
from .text import check_calibration_text, token_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImatrixSettings:
    ctx: int = 512  # tokens per chunk (llama-imatrix's default -c 512)
    chunks: int | None = None  # None: every full chunk of the text
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else the CPU
    batch_tokens: int = 4096  # chunks per block call: as many as fit in this many tokens


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]  # GGUF tensor name -> per-input-column sum of squares (float32)
    counts: dict[str, int]  # GGUF tensor name -> tokens seen
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def means(self) -> dict[str, np.ndarray]:
        return {k: (v / max(self.counts[k], 1)).astype(np.float32) for k, v in self.sums.items()}

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
    """Collect per-column sums of squared activations of every matrix over calibration chunks,
    streaming the model one decoder block at a time (:mod:`quantize.stream`)."""
    import torch
    from transformers import AutoTokenizer

    from .architectures import for_step
    from .stream import CheckpointSource, StreamedModel, StreamSettings, check_stream_fits, resolve_device, stream_need

    source, text_file = Path(source), Path(text_file)
    if source.suffix == ".gguf":
        raise QuantizeError(source, "the importance matrix runs the fp16 Hugging Face checkpoint one block at a time; "
                            "pass the checkpoint folder this GGUF was converted from")
    src = CheckpointSource.open(source)  # refuses a folder that is not a complete checkpoint
    for_step(src.ckpt.architecture, "imatrix", source / "config.json")
    text = check_calibration_text(text_file, Path(eval_text) if eval_text else None)
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokens = token_windows(tok(text, add_special_tokens=False, verbose=False)["input_ids"], settings.ctx, settings.chunks,
                           tok.bos_token_id, text_file, "chunk")  # each chunk starts with BOS, as in llama-imatrix
    stream = StreamSettings(resolve_device(settings.device, source), "float32", settings.batch_tokens)
    spill = check_stream_fits(source, stream_need(src, src.ckpt.config, "float32", tokens.size, stream.batch_tokens),
                              "the importance matrix")
    model = StreamedModel(source, src, stream)
    names = gguf_matrix_names(model.sk.model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(gname: str, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        sums[gname] = sums[gname] + (x * x).sum(0) if gname in sums else (x * x).sum(0)
        counts[gname] = counts.get(gname, 0) + x.shape[0]

    @contextlib.contextmanager
    def hooked(_i: int, block: Any) -> Iterator[None]:
        prefix = model.sk.name_of(block)
        handles = [m.register_forward_hook(lambda _m, inp, _o, g=names[f"{prefix}.{n}"]: collect(g, inp[0]))
                   for n, m in block.named_modules() if f"{prefix}.{n}" in names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    log.info("imatrix: %d chunks of %d tokens, one block at a time on %s", len(tokens), settings.ctx, stream.device)
    acts = model.forward(tokens, hooked, spill, desc="imatrix")
    try:
        head_name = names.get(model.sk.name_of(model.sk.head)) if model.sk.head is not None else None
        if head_name is not None:  # the output matrix reads the final norm's output; no logits are needed
            with model.final() as norm:
                for b in model.batches(*tokens.shape):
                    collect(head_name, norm(acts.get(b, model.sk.device)))
    finally:
        acts.close()
    log.info("imatrix: %d matrices", len(sums))
    return Imatrix({k: v.cpu().numpy().astype(np.float32) for k, v in sums.items()}, counts, [text_file.name],
                   len(tokens), settings.ctx)
