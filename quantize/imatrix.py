"""Importance matrices: which input columns of each weight matrix matter, from calibration text.

For every weight matrix W (out x in) the quantity ``llama-imatrix`` collects is the per-column
sum of squared activations ``sum_t x_t[j]^2`` over the calibration tokens, with the token count;
llama.cpp's quantizers then weight each column's rounding error by the mean ``sum/count``
(llama.cpp tools/imatrix).  We compute it in torch with forward hooks on the float32 model run one
decoder block at a time over every chunk (:mod:`quantize.engine.stream`), name each matrix by its GGUF tensor name through gguf-py's tensor map, and save it in llama.cpp's GGUF
imatrix layout (``<tensor>.in_sum2``, ``<tensor>.counts``, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``) so ``llama-quantize --imatrix`` reads it too.

The text is tokenized and cut into chunks as ``llama-imatrix`` does (BOS first, then consecutive
chunks of ``ctx`` tokens, each one's first token replaced by BOS), so both tools see the same tokens.
Calibration text is never the evaluation text: the same file is refused, a large overlap warned.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantize.architectures import for_step, lookup
from quantize.atomic import atomic_file
from quantize.engine.stream import (
    CheckpointSource,
    StreamedModel,
    StreamSettings,
    check_stream_fits,
    resolve_device,
    stream_need,
)
from quantize.errors import QuantizeError
from quantize.formats.gguf_read import field_value, open_gguf
from quantize.formats.gguf_write import Writer
from quantize.text import check_calibration_text, hf_tokenizer, token_windows, with_bos

# torch is imported inside the functions that run the model: reading and writing a matrix needs only numpy.

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImatrixSettings:
    ctx: int = 512  # tokens per chunk (llama-imatrix's default -c 512)
    chunks: int | None = None  # None: every full chunk of the text
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else the CPU
    batch_tokens: int = 2048  # chunks per block call: as many as fit in this many tokens (llama-imatrix: -b 2048)


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray]  # GGUF tensor name -> per-input-column sum of squares (float32), experts one after another
    counts: dict[str, int]  # GGUF tensor name -> tokens seen (stacked experts: summed over the experts)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    # stacked expert tensors (ffn_*_exps) -> tokens routed to each expert, as llama-imatrix counts them
    expert_counts: dict[str, np.ndarray] = field(default_factory=dict)

    def per_matrix_counts(self, name: str) -> np.ndarray:
        """Tokens seen by each of the tensor's matrices (one, or one per expert)."""
        return self.expert_counts.get(name, np.array([self.counts[name]]))

    def means(self) -> dict[str, np.ndarray]:
        out = {}
        for k, v in self.sums.items():
            n = self.per_matrix_counts(k).astype(np.float64)
            out[k] = (v.reshape(len(n), -1) / np.maximum(n, 1)[:, None]).reshape(-1).astype(np.float32)
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_file(path) as tmp:
            w = Writer(tmp, arch="")
            w.add_type("imatrix")
            w.add_array("imatrix.datasets", self.datasets)
            w.add_uint32("imatrix.chunk_count", self.chunk_count)
            w.add_uint32("imatrix.chunk_size", self.chunk_size)
            for name in sorted(self.sums):
                n = self.per_matrix_counts(name)
                w.add_tensor(f"{name}.in_sum2", self.sums[name].reshape(len(n), -1).astype(np.float32))
                w.add_tensor(f"{name}.counts", n.reshape(len(n), 1).astype(np.float32))
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
        sums, counts, experts = {}, {}, {}
        for name, data in tensors.items():
            if name.endswith(".in_sum2"):
                base = name.removesuffix(".in_sum2")
                if f"{base}.counts" not in tensors:
                    raise QuantizeError(path, f"{name} has no matching {base}.counts tensor")
                sums[base] = data.reshape(-1)
                n = tensors[f"{base}.counts"].reshape(-1)
                counts[base] = int(n.sum())
                if n.size > 1:
                    experts[base] = n.astype(np.int64)
        return cls(sums, counts, list(field_value(r, "imatrix.datasets") or []),
                   int(field_value(r, "imatrix.chunk_count") or 0), int(field_value(r, "imatrix.chunk_size") or 0), experts)


def _tensor_map(model: Any) -> gguf.TensorNameMap:
    """gguf-py's HF -> GGUF name map for the model's family."""
    return gguf.get_tensor_name_map(lookup(model.config.architectures[0], "config.json").gguf_arch, model.config.num_hidden_layers)


def gguf_matrix_names(model: Any) -> dict[str, str]:
    """HF Linear module name -> GGUF weight name, through gguf-py's tensor map."""
    import torch

    tmap = _tensor_map(model)
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


def expert_names(model: Any) -> dict[str, dict[str, str]]:
    """Mixture-of-experts modules (transformers 5 keeps every expert of a block in 3-D ``gate_up_proj``
    and ``down_proj`` parameters) -> the GGUF names of their stacked tensors and of their router."""
    tmap = _tensor_map(model)
    out = {}
    for mod_name, mod in model.named_modules():
        gate_up, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
        if getattr(gate_up, "ndim", 0) != 3 or getattr(down, "ndim", 0) != 3:
            continue
        parent = mod_name.rsplit(".", 1)[0]
        names = {k: tmap.get_name(f"{mod_name}.{k}_proj.weight", try_suffixes=(".weight",)) for k in ("gate", "up", "down")}
        names["router"] = tmap.get_name(f"{parent}.gate.weight", try_suffixes=(".weight",))
        if None in names.values():
            raise QuantizeError(None, f"{mod_name}: gguf-py maps no stacked expert tensor for it ({names})")
        out[mod_name] = {k: str(v) for k, v in names.items()}
    return out


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, back on after it if it was on."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, then restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_imatrix(source: str | Path, text_file: str | Path, settings: ImatrixSettings = ImatrixSettings(),
                    eval_text: str | Path | None = None) -> Imatrix:
    """Collect per-column sums of squared activations of every matrix over calibration chunks,
    streaming the model one decoder block at a time (:mod:`quantize.engine.stream`) on every core.

    The garbage collector is paused while torch, transformers, the tokenizer and the model skeleton load."""
    source, text_file = Path(source), Path(text_file)
    if source.suffix == ".gguf":
        raise QuantizeError(source, "the importance matrix runs the fp16 Hugging Face checkpoint one block at a time; "
                            "pass the checkpoint folder this GGUF was converted from")
    with collector_paused():  # the imports allocate millions of long-lived objects each collection would traverse
        import torch

        src = CheckpointSource.open(source)  # refuses a folder that is not a complete checkpoint
        for_step(src.ckpt.architecture, "imatrix", source / "config.json")
        text = check_calibration_text(text_file, Path(eval_text) if eval_text else None)
        tok = hf_tokenizer(source)
        tokens = token_windows(with_bos(tok.encode(text), tok.bos), settings.ctx, settings.chunks,
                               tok.bos, text_file, "chunk")  # each chunk starts with BOS, as in llama-imatrix
        stream = StreamSettings(resolve_device(settings.device, source), "float32", settings.batch_tokens)
        spill = check_stream_fits(source, stream_need(src, src.ckpt.config, "float32", tokens.size, stream.batch_tokens),
                                  "the importance matrix")
        model = StreamedModel(source, src, stream)
        names = gguf_matrix_names(model.sk.model)
        experts = expert_names(model.sk.model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    expert_counts: dict[str, np.ndarray] = {}
    # q/k/v (and gate/up) read the same input tensor: its column sums of squares are computed once
    last: list[Any] = [None, None]  # [input tensor, its column sums of squares]

    def collect(gname: str, x: torch.Tensor) -> None:
        if last[0] is not x:
            flat = x.detach().reshape(-1, x.shape[-1])
            last[:] = [x, flat.float().square().sum(0)]
        sq = last[1]
        if gname in sums:
            sums[gname] += sq
        else:
            sums[gname] = sq.clone()
        counts[gname] = counts.get(gname, 0) + x.numel() // x.shape[-1]

    def collect_experts(g: dict[str, str], mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Each expert's inputs: the tokens routed to it for gate/up, its activated products for down."""
        x = (args[0] if args else kwargs["hidden_states"]).detach().float().reshape(-1, mod.gate_up_proj.shape[-1])
        routed = args[1] if len(args) > 1 else kwargs["top_k_index"]
        collect(g["router"], x)
        n_exp = mod.gate_up_proj.shape[0]
        for key, cols in (("gate", x.shape[1]), ("up", x.shape[1]), ("down", mod.down_proj.shape[-1])):
            sums.setdefault(g[key], torch.zeros(n_exp, cols, device=x.device))
            expert_counts.setdefault(g[key], np.zeros(n_exp, dtype=np.int64))
        with torch.no_grad():
            for e in range(n_exp):
                xe = x[(routed == e).any(-1)]
                if not len(xe):
                    continue
                gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e].float()).chunk(2, dim=-1)
                h = mod.act_fn(gate) * up
                for key, v in (("gate", xe), ("up", xe), ("down", h)):
                    sums[g[key]][e] += (v * v).sum(0)
                    expert_counts[g[key]][e] += len(xe)

    @contextlib.contextmanager
    def hooked(_i: int, block: Any) -> Iterator[None]:
        prefix = model.sk.name_of(block)
        handles = [m.register_forward_hook(lambda _m, inp, _o, g=names[f"{prefix}.{n}"]: collect(g, inp[0]))
                   for n, m in block.named_modules() if f"{prefix}.{n}" in names]
        handles += [m.register_forward_hook(lambda mod, args, kwargs, _o, g=experts[f"{prefix}.{n}"]: collect_experts(g, mod, args, kwargs),
                                            with_kwargs=True)
                    for n, m in block.named_modules() if f"{prefix}.{n}" in experts]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            last[:] = [None, None]

    threads = os.cpu_count() or 1
    log.info("imatrix: %d chunks of %d tokens, one block at a time on %s (%d threads)", len(tokens), settings.ctx,
             stream.device, threads)
    with torch_threads(threads):
        acts = model.forward(tokens, hooked, spill, desc="imatrix")
        try:
            head_name = names.get(model.sk.name_of(model.sk.head)) if model.sk.head is not None else None
            if head_name is not None:  # the output matrix reads the final norm's output; no logits are needed
                with model.final() as norm:
                    for b in model.batches(*tokens.shape):
                        collect(head_name, norm(acts.get(b, model.sk.device)))
        finally:
            acts.close()
            last[:] = [None, None]
    log.info("imatrix: %d matrices", len(sums))
    counts |= {k: int(v.sum()) for k, v in expert_counts.items()}
    return Imatrix({k: v.cpu().numpy().astype(np.float32).reshape(-1) for k, v in sums.items()}, counts, [text_file.name],
                   len(tokens), settings.ctx, expert_counts)
