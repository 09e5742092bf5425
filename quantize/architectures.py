"""Model families the converter knows, as data: one :class:`Architecture` row per HF class.

A row says which GGUF architecture the family becomes, how its ``config.json`` reads into a
typed :class:`ModelConfig`, which tensors a checkpoint must hold and with what shapes (symbolic
dimensions resolved from the config), and which tensors need a transform on the way (llama.cpp's
Q/K row permutation for rotary attention).  Tensor *names* come from gguf-py's own
``TensorNameMap`` so they stay in step with llama.cpp.  A new family is a new row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from .errors import QuantizeError

T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class ModelConfig:
    """The hyperparameters of a decoder-only transformer, read from ``config.json``."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_explicit: bool  # config.json names head_dim (then GGUF records key/value length)
    n_vocab: int
    n_ctx: int
    rms_eps: float
    rope_theta: float | None
    rope_scaling: Mapping[str, Any]
    tie_embeddings: bool
    sliding_window: int | None
    raw: Mapping[str, Any]

    @property
    def dims(self) -> dict[str, int]:
        """Symbolic dimension names used by the shape tables below."""
        return {
            "vocab": self.n_vocab,
            "embd": self.n_embd,
            "ff": self.n_ff,
            "q": self.n_head * self.head_dim,
            "kv": self.n_head_kv * self.head_dim,
        }


def _need(cfg: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise QuantizeError(path, f"missing '{key}', which a {cfg.get('architectures', ['?'])[0]} config must have")
    return cfg[key]


def read_llama_config(cfg: Mapping[str, Any], path: str) -> ModelConfig:
    cfg = {**cfg, **cfg.get("text_config", {})}
    n_embd = int(_need(cfg, "hidden_size", path))
    n_head = int(_need(cfg, "num_attention_heads", path))
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = cfg.get("head_dim")
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
        raise QuantizeError(path, f"num_attention_heads={n_head} is not a multiple of num_key_value_heads={n_head_kv}")
    if head_dim is None and n_embd % n_head:
        raise QuantizeError(path, f"hidden_size={n_embd} is not divisible by num_attention_heads={n_head}; set head_dim")
    # transformers 5 moves rope_theta/rope_scaling into one rope_parameters dict; older configs keep them apart.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    return ModelConfig(
        n_layer=int(_need(cfg, "num_hidden_layers", path)),
        n_embd=n_embd,
        n_ff=int(_need(cfg, "intermediate_size", path)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=int(head_dim) if head_dim is not None else n_embd // n_head,
        head_dim_explicit=head_dim is not None,
        n_vocab=int(_need(cfg, "vocab_size", path)),
        n_ctx=int(_need(cfg, "max_position_embeddings", path)),
        rms_eps=float(_need(cfg, "rms_norm_eps", path)),
        rope_theta=None if theta is None else float(theta),
        rope_scaling=rope,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_window=cfg.get("sliding_window"),
        raw=cfg,
    )


def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores rotary Q/K rows as [first halves | second halves] per head; llama.cpp wants the
    halves interleaved (GPT-NeoX vs GPT-J layout).  Same permutation as llama.cpp's
    convert_hf_to_gguf.py ``LlamaModel.permute``: (n_head, 2, d/2, ...) -> (n_head, d/2, 2, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _llama_hparams(w: gguf.GGUFWriter, c: ModelConfig) -> None:
    w.add_block_count(c.n_layer)
    w.add_context_length(c.n_ctx)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.n_ff)
    w.add_head_count(c.n_head)
    w.add_head_count_kv(c.n_head_kv)
    if c.rope_theta is not None:
        w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_eps)
    if c.head_dim_explicit:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_vocab_size(c.n_vocab)
    w.add_rope_dimension_count(c.head_dim)
    if c.sliding_window:
        w.add_sliding_window(int(c.sliding_window))
    _rope_scaling(w, c.rope_scaling)


def _rope_scaling(w: gguf.GGUFWriter, rope: Mapping[str, Any]) -> None:
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind in (None, "default"):
        return
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "llama3":
        pass  # carried by the rope_freqs tensor (see llama3_rope_factors)
    else:
        raise QuantizeError(None, f"rope scaling type {kind!r} is not supported; supported: default, linear, yarn, llama3")


def llama3_rope_factors(c: ModelConfig) -> np.ndarray | None:
    """Llama 3.1's frequency-dependent rope scaling, as the ``rope_freqs`` tensor llama.cpp reads
    (formula from Meta's reference ``apply_scaling``)."""
    r = c.rope_scaling
    if r.get("rope_type") != "llama3":
        return None
    base = c.rope_theta or 10000.0
    freqs = 1.0 / (base ** (np.arange(0, c.head_dim, 2, dtype=np.float32) / c.head_dim))
    factor, lo, hi = r.get("factor", 8.0), r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
    old = r.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - lo) / (hi - lo)
    out = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, 1 / ((1 - smooth) / factor + smooth)))
    return out.astype(np.float32)


@dataclass(frozen=True)
class Architecture:
    hf_name: str
    gguf_arch: gguf.MODEL_ARCH
    read_config: Callable[[Mapping[str, Any], str], ModelConfig]
    write_hparams: Callable[[gguf.GGUFWriter, ModelConfig], None]
    # tensor kind -> symbolic HF shape (out, in); per-block kinds are marked in BLOCK_TENSORS
    shapes: Mapping[gguf.MODEL_TENSOR, tuple[str, ...]]
    transforms: Mapping[gguf.MODEL_TENSOR, Transform]
    # HF tensor-name suffixes that carry nothing llama.cpp needs
    ignored_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


LLAMA_SHAPES: Mapping[gguf.MODEL_TENSOR, tuple[str, ...]] = {
    T.TOKEN_EMBD: ("vocab", "embd"),
    T.OUTPUT_NORM: ("embd",),
    T.OUTPUT: ("vocab", "embd"),
    T.ATTN_NORM: ("embd",),
    T.ATTN_Q: ("q", "embd"),
    T.ATTN_K: ("kv", "embd"),
    T.ATTN_V: ("kv", "embd"),
    T.ATTN_OUT: ("embd", "q"),
    T.FFN_NORM: ("embd",),
    T.FFN_GATE: ("ff", "embd"),
    T.FFN_UP: ("ff", "embd"),
    T.FFN_DOWN: ("embd", "ff"),
}

LLAMA_TRANSFORMS: Mapping[gguf.MODEL_TENSOR, Transform] = {
    T.ATTN_Q: lambda w, c: permute_rope_rows(w, c.n_head),
    T.ATTN_K: lambda w, c: permute_rope_rows(w, c.n_head_kv),
}

_LLAMA = dict(
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    read_config=read_llama_config,
    write_hparams=_llama_hparams,
    shapes=LLAMA_SHAPES,
    transforms=LLAMA_TRANSFORMS,
)

# Mistral-7B and Llama-2/3 (incl. grouped-query 70B) are the same graph to llama.cpp.
ARCHITECTURES: dict[str, Architecture] = {
    a.hf_name: a
    for a in (
        Architecture(hf_name="LlamaForCausalLM", **_LLAMA),  # type: ignore[arg-type]
        Architecture(hf_name="MistralForCausalLM", **_LLAMA),  # type: ignore[arg-type]
    )
}

# Tensor kinds that exist once per block (the others once per model).
BLOCK_TENSORS = frozenset({T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN})


def lookup(hf_name: str, where: str) -> Architecture:
    try:
        return ARCHITECTURES[hf_name]
    except KeyError:
        raise QuantizeError(
            where, f"architecture {hf_name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
