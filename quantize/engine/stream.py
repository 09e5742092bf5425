"""Run a Hugging Face causal LM one decoder block at a time, each block's weights read from disk when it runs.

The model's own transformers classes do all the computing, so results are those of the
whole-model forward; what changes is where the weights are.  The model is built with its
parameters on PyTorch's ``meta`` device (no memory) and its buffers (rotary frequencies, embedding
scales) real.  A module's parameters are read from the checkpoint one tensor at a time, cast to
the working dtype and placed on the device just before it runs, and dropped after:

    embeddings -> block 0 over every window -> block 1 over every window -> ... -> final norm + head

so resident memory is one block (or the embeddings, or the head) plus the hidden states carried
between blocks, which are spilled to a float16 file when they would not fit in RAM.  Every block
is run with the keyword arguments the model's own forward gives that block (attention mask,
rotary embedding of its layer type), recorded once by running the decoder with stand-ins.

Used by the importance matrix, the quality gate's float32 reference and its AWQ engine, and the
AWQ stage (through AutoAWQ's own per-block steps).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psutil

from quantize.architectures import ARCHITECTURES, ExpertNames
from quantize.errors import QuantizeError
from quantize.formats.checkpoint import Checkpoint, TensorRef, open_checkpoint
from quantize.formats.safetensors import read_tensor
from quantize.portable import reserve_space, unnamed_file
from quantize.progress import progress

# torch and transformers are imported inside the functions that build or run the model: the RAM preflight
# and the tensor sources need only numpy.

log = logging.getLogger(__name__)

GiB = 1 << 30

WIDTH = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class StreamSettings:
    """Where and in what dtype blocks run, and how many tokens go through a block at once."""

    device: str = "cpu"  # "cpu" or "cuda" (resolve "auto" with resolve_device first)
    dtype: str = "float32"
    batch_tokens: int = 4096  # windows per block call: as many as fit in this many tokens (at least one)
    spill_dir: Path | None = None  # where carried activations go when RAM is short (default: the system temp dir)


def resolve_device(requested: str, where: Path) -> str:
    """``auto`` -> ``cuda`` if torch sees a GPU, else ``cpu``; ``cuda`` without one is refused."""
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if requested == "cuda" and not has_cuda:
        raise QuantizeError(where, f"--device cuda asked for, but torch {torch.__version__} sees no CUDA GPU here; run on a GPU "
                            "machine with a CUDA build of torch, or use --device cpu (slower)")
    if requested not in ("cpu", "cuda"):
        raise QuantizeError(where, f"device {requested!r} unknown; use auto, cuda or cpu")
    return requested


# --- where tensors come from -----------------------------------------------------------------


class TensorSource(Protocol):
    """Named tensors read one at a time."""

    root: Path

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def get(self, name: str) -> Any: ...  # a torch tensor in its stored dtype (or a float dtype for derived tensors)


class CheckpointSource:
    """The tensors of a safetensors checkpoint folder, each read with ``pread`` into its own buffer.

    Nothing stays mapped, so the page cache the reads fill is never counted as this process's
    memory and a tensor's bytes are freed with the tensor."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.root = ckpt.root

    @classmethod
    def open(cls, root: Path) -> CheckpointSource:
        return cls(open_checkpoint(root))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: ref.shape for name, ref in self.ckpt.tensors.items()}

    def ref(self, name: str) -> TensorRef:
        return self.ckpt.tensors[name]

    def get(self, name: str) -> Any:
        return read_tensor(self.ckpt.tensors[name])


# A parameter's source: one checkpoint tensor, or (stacked experts) per expert the tensors
# concatenated along rows into that expert's slice.
Source = str | tuple[tuple[str, ...], ...]


def per_expert_sources(name: str, shapes: Mapping[str, tuple[int, ...]], experts: ExpertNames | None) -> Source | None:
    """The per-expert checkpoint tensors a 3-D expert parameter (or a renamed router) is made of, if present.

    transformers 5 keeps a mixture-of-experts block's experts in 3-D parameters; checkpoints (and
    transformers 5's own ``save_pretrained``) keep one 2-D tensor per expert, named as the family's
    row says (:class:`quantize.architectures.ExpertNames`)."""
    if experts is None:
        return None
    renamed = name.replace(".mlp.", f".{experts.block}.")
    if renamed != name and renamed in shapes:
        return renamed  # the router, under the checkpoint's name of the block
    parent, _, leaf = renamed.rpartition(".")
    parts = experts.parts.get(leaf)
    if not parts:
        return None
    found: list[tuple[str, ...]] = []
    while all(f"{parent}.{len(found)}.{part}.weight" in shapes for part in parts):
        found.append(tuple(f"{parent}.{len(found)}.{part}.weight" for part in parts))
    return tuple(found) or None


def _source_shape(src: Source, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    if isinstance(src, str):
        return tuple(shapes[src])
    rows = [sum(shapes[n][0] for n in parts) for parts in src]
    return (len(src), rows[0], shapes[src[0][0]][1]) if len(set(rows)) == 1 else ()


def _read_source(source: TensorSource, src: Source) -> Any:
    import torch

    if isinstance(src, str):
        return source.get(src)
    return torch.stack([torch.cat([source.get(n) for n in parts]) for parts in src])


# --- the model without its weights ------------------------------------------------------------


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built in this block get their parameters on the meta device; buffers stay real."""
    import torch
    from torch import nn

    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        with torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _set_tensor(module: Any, name: str, value: Any) -> None:
    """Replace parameter or buffer ``name`` (dotted, relative to ``module``)."""
    from torch import nn

    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def release_free_memory() -> None:
    """Hand memory freed by the last module back to the system (glibc keeps freed heap pages of tensors under
    its mmap threshold, e.g. k/v projections, and the resident set would creep up block after block)."""

    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


class _StandIn:
    """Takes a block's place for one forward pass: records its keyword arguments and passes the hidden states on."""

    class Done(Exception):
        """Raised by the last stand-in: every block's arguments are known."""

    def __init__(self, record: list[dict[str, Any]], last: bool) -> None:
        self.record, self.last = record, last

    def module(self) -> Any:
        from torch import nn

        outer = self

        class StandIn(nn.Module):
            def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
                if args:
                    raise TypeError(f"a block was called with {len(args)} positional arguments after the hidden states; "
                                    "only keyword arguments are recorded")
                outer.record.append(kwargs)
                if outer.last:
                    raise _StandIn.Done
                return hidden_states

        return StandIn()


def record_block_kwargs(decoder: Any, hidden: Any) -> list[dict[str, Any]]:
    """The keyword arguments ``decoder``'s own forward gives each of its blocks for inputs shaped like ``hidden``.

    Every block is replaced by a stand-in for one pass (no block computes; the pass stops at the
    last one), so the mask and rotary embedding each block gets are the model's own, per layer
    type.  The blocks are put back whatever happens."""
    import torch

    blocks = decoder.layers
    record: list[dict[str, Any]] = []
    originals = list(blocks)
    try:
        for i in range(len(blocks)):
            blocks[i] = _StandIn(record, last=i == len(blocks) - 1).module()
        with torch.no_grad():
            decoder(inputs_embeds=hidden, use_cache=False)
    except _StandIn.Done:
        pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if len(record) != len(blocks):
        raise RuntimeError(f"recorded the arguments of {len(record)} of {len(blocks)} blocks")
    return record


def to_device(value: Any, device: Any) -> Any:
    """Tensors (also inside tuples and dicts) moved to ``device``; anything else as it is."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class Skeleton:
    """A causal LM from its ``config.json`` with every parameter on the meta device, filled module by module from a source."""

    def __init__(self, folder: Path, source: TensorSource, settings: StreamSettings) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.settings = settings
        self.source = source
        self.device = torch.device(settings.device)
        self.dtype = getattr(torch, settings.dtype)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        config.use_cache = False
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # the source hands out float weights
        with _parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype).eval()
        self.config = self.model.config
        self.decoder = self.model.get_decoder()
        self.layers = self.decoder.layers
        self.embed = self.model.get_input_embeddings()
        self.head = self.model.get_output_embeddings()
        self.prefix = {id(m): name for name, m in self.model.named_modules()}
        # Buffers are real and small (rotary frequencies, embedding scale): put them all on the device now.
        for name, buf in list(self.model.named_buffers()):
            _set_tensor(self.model, name, buf.to(self.device))
        row = ARCHITECTURES.get((config.architectures or [""])[0])
        self.names = self._source_names(folder, row.experts if row is not None else None)

    def _source_names(self, folder: Path, experts: ExpertNames | None) -> dict[str, Source]:
        """Parameter name -> source tensor name (or the per-expert tensors stacked into it), every shape
        checked before any weight is read."""
        shapes = self.source.shapes()
        tied = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        names: dict[str, Source] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            src: Source = name
            if src not in shapes and tied.get(id(p), name) != name:
                src = tied[id(p)]
            if src not in shapes:
                emb = self.prefix[id(self.embed)] + ".weight"
                if self.head is not None and name == self.prefix[id(self.head)] + ".weight" and emb in shapes:
                    src = emb  # tied output matrix stored once, as the embeddings
                elif (stacked := per_expert_sources(name, shapes, experts)) is not None:
                    src = stacked
                else:
                    raise QuantizeError(folder, f"has no tensor {name!r}, which {self.config.architectures[0]} needs; "
                                        "the checkpoint does not match its config.json")
            shape = _source_shape(src, shapes)
            if shape != tuple(p.shape):
                raise QuantizeError(folder, f"tensor {src if isinstance(src, str) else name!r} has shape {list(shape)}, "
                                            f"the config implies {list(p.shape)}")
            names[name] = src
        return names

    def name_of(self, module: Any) -> str:
        return self.prefix[id(module)]

    @contextlib.contextmanager
    def resident(self, module: Any) -> Iterator[Any]:
        """``module`` with its weights read, cast to the working dtype and on the device, for the block."""

        prefix = self.name_of(module)
        buffers = {n for n, _ in module.named_buffers()}
        try:
            for n, _ in list(module.named_parameters()):
                full = f"{prefix}.{n}" if prefix else n
                t = _read_source(self.source, self.names[full])
                _set_tensor(module, n, t.to(self.device, self.dtype if t.is_floating_point() else t.dtype))
                del t
            yield module
        finally:
            # Whatever the module holds now (its weights, or what replaced them, e.g. packed AWQ
            # buffers) goes back to the meta device; its own small buffers stay.
            for n, p in list(module.named_parameters()):
                _set_tensor(module, n, p.detach().to("meta"))
            for n, b in list(module.named_buffers()):
                if n not in buffers:
                    _set_tensor(module, n, b.to("meta"))
            release_free_memory()

    def block_kwargs(self, ctx: int) -> list[dict[str, Any]]:
        """Per block, the keyword arguments the decoder gives it for windows of ``ctx`` tokens (batch-broadcastable)."""
        import torch

        hidden = torch.zeros(1, ctx, self.config.get_text_config().hidden_size, dtype=self.dtype, device=self.device)
        return record_block_kwargs(self.decoder, hidden)

    def head_logits(self, normed: Any) -> Any:
        """The output projection of normed hidden states (head resident), with the family's final soft-capping."""
        import torch

        logits = self.head(normed)
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


# --- carried activations ---------------------------------------------------------------------


class Activations:
    """The hidden states of every window between blocks: in RAM in the working dtype, or in a float16
    file (then each block reads and writes its batch)."""

    def __init__(self, n: int, ctx: int, hidden: int, dtype: Any, spill: bool, spill_dir: Path | None) -> None:
        import torch

        self.shape = (n, ctx, hidden)
        self.dtype = dtype
        self._file: Any = None
        if spill:  # a file without a name (O_TMPFILE, else unlinked as soon as made): a killed run leaves nothing
            self._file = unnamed_file(spill_dir, prefix="quantize-activations-", suffix=".f16")
            where = spill_dir or tempfile.gettempdir()
            reserve_space(self._file.fileno(), int(np.prod(self.shape)) * 2, f"{where}/quantize-activations-*.f16")
            self._map = np.memmap(self._file, dtype=np.float16, mode="w+", shape=self.shape)
            log.info("carried activations spilled to an unnamed file in %s (%.1f GiB, float16)",
                     spill_dir or tempfile.gettempdir(), self._map.nbytes / GiB)
        else:
            self._ram = torch.empty(self.shape, dtype=dtype)

    def get(self, rows: slice, device: Any) -> Any:
        import torch

        if self._file is None:
            return self._ram[rows].to(device)
        return torch.from_numpy(np.array(self._map[rows])).to(device, self.dtype)

    def set(self, rows: slice, value: Any) -> None:
        if self._file is None:
            self._ram[rows] = value.to("cpu", self.dtype)
        else:
            self._map[rows] = value.to("cpu").float().numpy().astype(np.float16)

    def close(self) -> None:
        if self._file is not None:
            del self._map
            self._file.close()
            self._file = None


# --- the streamed forward ----------------------------------------------------------------------


BlockHook = Callable[[int, Any], contextlib.AbstractContextManager[Any]]


class StreamedModel:
    """A causal LM run over many windows at once, one block resident at a time."""

    def __init__(self, folder: Path, source: TensorSource | None = None, settings: StreamSettings = StreamSettings()) -> None:
        self.folder = folder
        self.source = source or CheckpointSource.open(folder)
        self.settings = settings
        self.sk = Skeleton(folder, self.source, settings)

    @property
    def hidden_size(self) -> int:
        return int(self.sk.config.get_text_config().hidden_size)

    @property
    def n_vocab(self) -> int:
        return int(self.sk.head.weight.shape[0])

    def batches(self, n: int, ctx: int) -> list[slice]:
        """Window slices of at most ``batch_tokens`` tokens (at least one window each)."""
        per = max(1, self.settings.batch_tokens // ctx)
        return [slice(i, min(i + per, n)) for i in range(0, n, per)]

    def forward(self, tokens: np.ndarray, hook: BlockHook | None = None, spill: bool = False, desc: str = "blocks") -> Activations:
        """Embed ``tokens`` (n, ctx) and run every block over all of them; ``hook(i, block)`` wraps block ``i``'s
        pass (e.g. to register forward hooks).  Returns the last block's output, before the final norm."""
        import torch

        n, ctx = tokens.shape
        sk, dev = self.sk, self.sk.device
        acts = Activations(n, ctx, self.hidden_size, sk.dtype, spill, self.settings.spill_dir)
        batches = self.batches(n, ctx)
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
        try:
            with torch.no_grad():
                with sk.resident(sk.embed) as embed:
                    for b in batches:
                        acts.set(b, embed(ids[b].to(dev)))
                kwargs = sk.block_kwargs(ctx)
                for i, block in progress(enumerate(sk.layers), len(sk.layers), desc):
                    kw = to_device(kwargs[i], dev)
                    with sk.resident(block), hook(i, block) if hook else contextlib.nullcontext():
                        for b in batches:
                            out = block(acts.get(b, dev), **kw)
                            acts.set(b, out[0] if isinstance(out, tuple) else out)
                    log.debug("block %d of %d done", i + 1, len(sk.layers))
        except BaseException:
            acts.close()
            raise
        return acts

    @contextlib.contextmanager
    def final(self) -> Iterator[Callable[[Any], Any]]:
        """A function from last-block hidden states to normed hidden states, with the final norm resident."""
        import torch

        norm = self.sk.decoder.norm
        with torch.no_grad(), self.sk.resident(norm):
            yield lambda h: norm(h.to(self.sk.device, self.sk.dtype))

    @contextlib.contextmanager
    def head(self) -> Iterator[Callable[[Any], Any]]:
        """A function from normed hidden states to logits, with the output matrix resident."""
        import torch

        with torch.no_grad(), self.sk.resident(self.sk.head):
            yield self.sk.head_logits

    def logits(self, tokens: np.ndarray, rows: slice, spill: bool = False) -> Iterator[np.ndarray]:
        """For each window of ``tokens``, the float32 logits of positions ``rows`` (the streamed whole-model forward)."""
        acts = self.forward(tokens, spill=spill)
        try:
            with self.final() as norm, self.head() as head:
                for w in range(tokens.shape[0]):
                    yield head(norm(acts.get(slice(w, w + 1), self.sk.device)[0, rows])).float().cpu().numpy()
        finally:
            acts.close()


# --- memory needed ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamNeed:
    """Bytes of RAM a streamed step needs, by part; ``total`` is what the preflight compares with what is available."""

    block: int  # the largest block's weights in the working dtype (plus one tensor's stored bytes being read)
    ends: int  # the embeddings or the output matrix, whichever is larger, in the working dtype
    activations: int  # hidden states carried between blocks
    transient: int  # one batch's intermediates inside a block, and one window's logits
    overhead: int = GiB  # interpreter, torch, tokenizer

    @property
    def total(self) -> int:
        return self.block + self.ends + self.activations + self.transient + self.overhead

    def parts(self) -> dict[str, int]:
        return {"largest block": self.block, "embeddings/head": self.ends, "carried activations": self.activations,
                "batch intermediates": self.transient, "runtime": self.overhead}

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts().items()) + f" (GiB); total {self.total / GiB:.2f} GiB"


def block_bytes(shapes: dict[str, tuple[int, ...]], width: int) -> tuple[int, int]:
    """(largest decoder block, larger of embeddings and output matrix), in bytes at ``width`` bytes per value."""
    blocks: dict[str, int] = {}
    ends = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        parts = name.split(".")
        if "layers" in parts and parts.index("layers") + 1 < len(parts):
            i = parts.index("layers")
            key = ".".join(parts[: i + 2])
            blocks[key] = blocks.get(key, 0) + n
        elif len(shape) == 2:
            ends = max(ends, n)
    return max(blocks.values(), default=0) * width, ends * width


def stream_need(source: TensorSource, config: dict[str, Any], dtype: str, carried_tokens: int, batch_tokens: int,
                spill: bool = False, head_rows: int = 0) -> StreamNeed:
    """What a streamed pass over ``carried_tokens`` tokens needs, from the checkpoint's headers and config alone."""
    cfg = {**config, **config.get("text_config", {})}
    width = WIDTH[dtype]
    shapes = source.shapes()
    block, ends = block_bytes(shapes, width)
    largest_read = max((int(np.prod(s, dtype=np.int64)) * 2 for s in shapes.values()), default=0)
    hidden, ff = int(cfg["hidden_size"]), int(cfg.get("intermediate_size") or 4 * cfg["hidden_size"])
    heads = int(cfg.get("num_attention_heads") or 1)
    carried = 0 if spill else carried_tokens * hidden * width  # spilled: on disk, only the batch below is in RAM
    batch = min(batch_tokens, carried_tokens) or batch_tokens
    seq = min(batch, int(cfg.get("max_position_embeddings") or batch))
    # a block call on one batch: its input and output, q/k/v/o, the MLP's three intermediates,
    # the attention scores of one window when the kernel materialises them
    transient = batch * (6 * hidden + 3 * ff) * width + heads * seq * seq * width
    vocab = int(cfg.get("vocab_size") or 0)
    logits = head_rows * vocab * 4 * 3  # logits, their log-softmax, and the reference's row block
    return StreamNeed(block + largest_read, ends, carried, transient + logits)


def check_stream_fits(where: Path, need: StreamNeed, what: str) -> bool:
    """Refuse when even one block cannot be held; return whether the carried activations must be spilled to disk."""
    avail = psutil.virtual_memory().available
    if need.total <= avail:
        return False
    without = need.total - need.activations
    if without <= avail:
        log.warning("%s: carried activations (%.1f GiB) do not fit beside one block in %.1f GiB available; "
                    "spilling them to disk in float16", what, need.activations / GiB, avail / GiB)
        return True
    raise QuantizeError(where, f"{what} needs ~{without / GiB:.1f} GiB of RAM even one block at a time "
                        f"({need.describe()}), {avail / GiB:.1f} GiB available; free memory or use a machine with more")
