"""Model families the converter knows, as data: one :class:`Architecture` row per HF class.

A row says which GGUF architecture the family becomes, how its ``config.json`` reads into a
typed :class:`ModelConfig` (and what it refuses), which tensors a checkpoint must hold and with
what shapes (symbolic dimensions resolved from the config), which tensors need a transform on the
way (llama.cpp's Q/K row permutation for rotary attention; Gemma's ``1 + weight`` norms), what is
cross-checked against the weights before anything is written, and which added tokens a release
may list beyond its embedding rows.  Tensor *names* come from gguf-py's own ``TensorNameMap`` so
they stay in step with llama.cpp.  A new family is a new row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from .checkpoint import TensorRef
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
    rope_theta_swa: float | None = None  # rope base of the sliding-window layers, when it differs
    final_logit_softcap: float | None = None

    @property
    def dims(self) -> dict[str, int]:
        """Symbolic dimension names used by the shape tables below."""
        return {
            "vocab": self.n_vocab,
            "embd": self.n_embd,
            "ff": self.n_ff,
            "q": self.n_head * self.head_dim,
            "kv": self.n_head_kv * self.head_dim,
            "head": self.head_dim,
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


# --- checks of the config against the weights ---------------------------------------------

Check = Callable[["Architecture", ModelConfig, Mapping[str, TensorRef], str], None]


def check_head_dim(arch: Architecture, c: ModelConfig, tensors: Mapping[str, TensorRef], path: str) -> None:
    """The per-head width of block 0's Q and K projections must be the config's head_dim, so a
    config that lies about it is named, not the first tensor whose shape then disagrees."""
    tmap = gguf.get_tensor_name_map(arch.gguf_arch, c.n_layer)
    rows = {}
    for name, ref in tensors.items():
        mapped = tmap.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is not None and mapped[1] in ("blk.0.attn_q.weight", "blk.0.attn_k.weight") and ref.shape:
            rows[mapped[0]] = ref.shape[0]
    q, k = rows.get(T.ATTN_Q), rows.get(T.ATTN_K)
    if q is None or k is None or (q, k) == (c.n_head * c.head_dim, c.n_head_kv * c.head_dim):
        return  # missing tensors are reported by the planner
    if q % c.n_head == 0 and k % c.n_head_kv == 0 and q // c.n_head == k // c.n_head_kv:
        how = "" if c.head_dim_explicit else " (hidden_size / num_attention_heads)"
        raise QuantizeError(path, f"head_dim={c.head_dim}{how} contradicts the weights: q_proj has {q} rows for "
                                  f"{c.n_head} heads and k_proj {k} rows for {c.n_head_kv} key/value heads, "
                                  f"{q // c.n_head} per head; set head_dim to {q // c.n_head}")


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
    # config-against-weights checks, run before the output is opened
    checks: tuple[Check, ...] = (check_head_dim,)
    # added tokens a release lists beyond its embedding rows, left out (the model never sees them)
    unembedded_tokens: frozenset[str] = frozenset()

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

# --- Gemma 3 ------------------------------------------------------------------------------

# transformers' Gemma3TextConfig defaults, for the keys a Gemma 3 config.json may leave out.
GEMMA3_DEFAULTS: Mapping[str, Any] = {
    "head_dim": 256,
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "sliding_window": 4096,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}
# llama.cpp's gemma3 graph hard-codes its attention schedule (src/llama-model.cpp,
# LLM_ARCH_GEMMA3: set_swa_pattern(6), rope_freq_base_train_swa = 10000): five sliding-window
# layers, then one global; no GGUF key changes it.
LLAMA_CPP_GEMMA3_PATTERN = 6
LLAMA_CPP_GEMMA3_SWA_THETA = 10_000.0
# Config features llama.cpp's gemma3 graph does not have: a model using one would run wrong.
GEMMA3_UNSUPPORTED = {
    "attn_logit_softcapping": "attention logit soft-capping (Gemma 2's, removed in Gemma 3)",
    "use_bidirectional_attention": "bidirectional attention (an encoder, e.g. EmbeddingGemma)",
}
SLIDING, GLOBAL = "sliding_attention", "full_attention"


def _layer_schedule(pattern: int, n_layer: int) -> list[str]:
    """transformers' Gemma3TextConfig: layer i is global when (i + 1) % pattern == 0."""
    return [GLOBAL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layer)]


def read_gemma3_config(cfg: Mapping[str, Any], path: str) -> ModelConfig:
    cfg = {**GEMMA3_DEFAULTS, **cfg, **cfg.get("text_config", {})}
    for key, what in GEMMA3_UNSUPPORTED.items():
        if cfg.get(key):
            raise QuantizeError(path, f"{key}={cfg[key]!r}: {what} is not implemented by llama.cpp's gemma3 graph")
    # Rope: transformers 5 writes one dict per layer kind, older configs rope_theta + rope_local_base_freq.
    params = dict(cfg.get("rope_parameters") or {})
    if GLOBAL in params or SLIDING in params:
        full, local = dict(params.get(GLOBAL) or {}), dict(params.get(SLIDING) or {})
    else:
        full, local = dict(params or cfg.get("rope_scaling") or {}), {}
    if "type" in full and "rope_type" not in full:
        full["rope_type"] = full["type"]
    theta = float(full.get("rope_theta", cfg["rope_theta"]))
    theta_swa = float(local.get("rope_theta", cfg["rope_local_base_freq"]))
    base = read_llama_config({**cfg, "rope_parameters": {**full, "rope_theta": theta}}, path)
    _check_gemma3_schedule(cfg, base.n_layer, theta_swa, path)
    return dataclasses.replace(base, head_dim_explicit=True, rope_theta_swa=theta_swa,
                               final_logit_softcap=cfg.get("final_logit_softcapping"))


def _check_gemma3_schedule(cfg: Mapping[str, Any], n_layer: int, theta_swa: float, path: str) -> None:
    """The config's sliding/global layer schedule must be self-consistent and llama.cpp's."""
    declared = {k: int(cfg[k]) for k in ("sliding_window_pattern", "_sliding_window_pattern") if cfg.get(k) is not None}
    if len(set(declared.values())) > 1:
        raise QuantizeError(path, f"sliding_window_pattern and _sliding_window_pattern disagree ({declared}); keep one")
    pattern = next(iter(declared.values()), None)
    if pattern is not None and pattern < 1:
        raise QuantizeError(path, f"sliding_window_pattern={pattern} must be at least 1")
    layers = cfg.get("layer_types")
    if layers is not None:
        if len(layers) != n_layer or set(layers) - {SLIDING, GLOBAL}:
            raise QuantizeError(path, f"layer_types must list {n_layer} entries (num_hidden_layers), each "
                                      f"{SLIDING!r} or {GLOBAL!r}")
        if pattern is not None:
            want = _layer_schedule(pattern, n_layer)
            bad = next(i for i, (a, b) in enumerate(zip(layers, want, strict=True)) if a != b) if layers != want else None
            if bad is not None:
                raise QuantizeError(path, f"layer_types contradicts sliding_window_pattern={pattern}: layer {bad} is "
                                          f"{layers[bad]!r} but the pattern makes it {want[bad]!r}; fix one of them")
    schedule = list(layers) if layers is not None else _layer_schedule(pattern or LLAMA_CPP_GEMMA3_PATTERN, n_layer)
    if schedule != _layer_schedule(LLAMA_CPP_GEMMA3_PATTERN, n_layer) or not cfg.get("sliding_window"):
        raise QuantizeError(path, "this attention schedule is not Gemma 3's (five sliding-window layers, then one "
                                  "global, with a sliding_window); llama.cpp hard-codes that one and would run this model wrong")
    if theta_swa != LLAMA_CPP_GEMMA3_SWA_THETA:
        raise QuantizeError(path, f"sliding-window rope base {theta_swa:g} is not the {LLAMA_CPP_GEMMA3_SWA_THETA:g} "
                                  "llama.cpp hard-codes for gemma3; it would run this model wrong")


def _gemma3_hparams(w: gguf.GGUFWriter, c: ModelConfig) -> None:
    _llama_hparams(w, c)
    if c.rope_theta_swa is not None:
        w.add_rope_freq_base_swa(c.rope_theta_swa)
    if c.final_logit_softcap:
        w.add_final_logit_softcapping(float(c.final_logit_softcap))


def norm_plus_one(w: np.ndarray, c: ModelConfig) -> np.ndarray:
    """Gemma's RMSNorm scales by ``1 + weight`` (transformers Gemma3RMSNorm); llama.cpp's by
    ``weight``, so the converter stores ``weight + 1``.  The sum is taken in the checkpoint's own
    dtype, rounding as llama.cpp's converter does (for float16, to float16), so the two agree byte
    for byte; bfloat16 arrives here already widened to float32."""
    return w + w.dtype.type(1)


GEMMA3_NORMS = (T.OUTPUT_NORM, T.ATTN_NORM, T.ATTN_POST_NORM, T.FFN_PRE_NORM, T.FFN_POST_NORM, T.ATTN_Q_NORM, T.ATTN_K_NORM)

GEMMA3_SHAPES: Mapping[gguf.MODEL_TENSOR, tuple[str, ...]] = {
    **{k: v for k, v in LLAMA_SHAPES.items() if k != T.FFN_NORM},
    T.ATTN_Q_NORM: ("head",),
    T.ATTN_K_NORM: ("head",),
    T.ATTN_POST_NORM: ("embd",),
    T.FFN_PRE_NORM: ("embd",),
    T.FFN_POST_NORM: ("embd",),
}

# No Q/K permutation: llama.cpp runs gemma3 with NeoX-style rope, HF's own row order.
GEMMA3_TRANSFORMS: Mapping[gguf.MODEL_TENSOR, Transform] = {k: norm_plus_one for k in GEMMA3_NORMS}


# Mistral-7B and Llama-2/3 (incl. grouped-query 70B) are the same graph to llama.cpp.
ARCHITECTURES: dict[str, Architecture] = {
    a.hf_name: a
    for a in (
        Architecture(hf_name="LlamaForCausalLM", **_LLAMA),  # type: ignore[arg-type]
        Architecture(hf_name="MistralForCausalLM", **_LLAMA),  # type: ignore[arg-type]
        # Gemma 3 text models (270M, 1B; the text part of 4B-27B): extra norms after attention and
        # around the MLP, per-head q/k norms, norms stored as 1 + weight, tied embeddings, a
        # sliding-window/global schedule, the 262k SentencePiece vocabulary without dummy prefix.
        Architecture(
            hf_name="Gemma3ForCausalLM",
            gguf_arch=gguf.MODEL_ARCH.GEMMA3,
            read_config=read_gemma3_config,
            write_hparams=_gemma3_hparams,
            shapes=GEMMA3_SHAPES,
            transforms=GEMMA3_TRANSFORMS,
            unembedded_tokens=frozenset({"<image_soft_token>"}),  # the vision processor's placeholder
        ),
    )
}

# Tensor kinds that exist once per block (the others once per model).
BLOCK_TENSORS = frozenset({T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN,
                           T.ATTN_Q_NORM, T.ATTN_K_NORM, T.ATTN_POST_NORM, T.FFN_PRE_NORM, T.FFN_POST_NORM})


def lookup(hf_name: str, where: str) -> Architecture:
    try:
        return ARCHITECTURES[hf_name]
    except KeyError:
        raise QuantizeError(
            where, f"architecture {hf_name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
