"""Model families the converter knows, as data: one :class:`Architecture` row per HF class.

A row says which GGUF architecture the family becomes, how its ``config.json`` reads into a
typed :class:`ModelConfig` (and what it refuses), which tensors a checkpoint must hold and with
what shapes (symbolic dimensions resolved from the config), which tensors need a transform on the
way (llama.cpp's Q/K row permutation for rotary attention; Gemma's ``1 + weight`` norms), what is
cross-checked against the weights before anything is written, which added tokens a release may
list beyond its embedding rows, which norms feed which linears (the scale groups smoothing and
AWQ rescale), how a mixture of experts' checkpoints name its experts, and what AWQ needs.  Tensor
*names* come from gguf-py's own ``TensorNameMap`` so they stay in step with llama.cpp.  A new
family is a new row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantize.errors import QuantizeError
from quantize.formats.checkpoint import TensorRef

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
    attn_logit_softcap: float | None = None
    n_expert: int = 0  # routed experts per MoE block (0: a dense model)
    n_expert_used: int = 0
    n_ff_exp: int | None = None  # an expert's feed-forward width, when it is not n_ff
    rope_dims: int | None = None  # rotary dimensions per head, when fewer than head_dim

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
            "qkv": (self.n_head + 2 * self.n_head_kv) * self.head_dim,  # fused q, k, v rows
            "ff2": 2 * self.n_ff,  # fused gate and up rows
            "expert": self.n_expert,
            "ff_exp": self.n_ff_exp or self.n_ff,
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
        n_expert=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0),
        n_expert_used=int(cfg.get("num_experts_per_tok") or 0),
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
    w.add_rope_dimension_count(c.rope_dims or c.head_dim)
    if c.sliding_window:
        w.add_sliding_window(int(c.sliding_window))
    if c.n_expert:
        w.add_expert_count(c.n_expert)
        w.add_expert_used_count(c.n_expert_used)
    if c.n_ff_exp:
        w.add_expert_feed_forward_length(c.n_ff_exp)
    if c.attn_logit_softcap:
        w.add_attn_logit_softcapping(float(c.attn_logit_softcap))
    if c.final_logit_softcap:
        w.add_final_logit_softcapping(float(c.final_logit_softcap))
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
    elif kind == "longrope":
        pass  # carried by the rope_factors_long/short tensors (see phi3_rope_factors)
    else:
        raise QuantizeError(None, f"rope scaling type {kind!r} is not supported; supported: default, linear, yarn, llama3, longrope")


def llama3_rope_factors(c: ModelConfig) -> dict[str, np.ndarray]:
    """Llama 3.1's frequency-dependent rope scaling, as the ``rope_freqs`` tensor llama.cpp reads
    (formula from Meta's reference ``apply_scaling``)."""
    r = c.rope_scaling
    if r.get("rope_type") != "llama3":
        return {}
    base = c.rope_theta or 10000.0
    freqs = 1.0 / (base ** (np.arange(0, c.head_dim, 2, dtype=np.float32) / c.head_dim))
    factor, lo, hi = r.get("factor", 8.0), r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
    old = r.get("original_max_position_embeddings", 8192)
    wavelen = 2 * np.pi / freqs
    smooth = (old / wavelen - lo) / (hi - lo)
    out = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, 1 / ((1 - smooth) / factor + smooth)))
    return {_tensor_name(T.ROPE_FREQS): out.astype(np.float32)}


def _tensor_name(kind: gguf.MODEL_TENSOR) -> str:
    return gguf.TENSOR_NAMES[kind] + ".weight"


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
class ScaleGroup:
    """An operation and the linears that read its output channel for channel: per-channel scales
    divided out of ``prev``'s output and multiplied into the readers' input columns leave the model
    unchanged.  HF module names, ``{bid}`` standing for the decoder block.  A row lists the groups
    whose ``prev`` is a norm: smoothing rescales those (in GGUF names, through gguf-py's tensor
    map), the demo plants its activation outliers in them, and the AutoAWQ layer map this tool
    writes for Gemma 3 (:mod:`quantize.engine.awq_models`) scales them."""

    prev: str
    readers: tuple[str, ...]
    # the module whose output AWQ's scale search compares for this group (AutoAWQ's ``module2inspect``;
    # None: the first reader), read where a layer map is built from the row
    inspect: str | None = None


BLOCK = "model.layers.{bid}."  # how scale groups name a decoder block's modules


def _block_groups(attn_norm: str, qkv: tuple[str, ...], ffn_norm: str, ffn_in: tuple[str, ...]) -> tuple[ScaleGroup, ...]:
    blk = BLOCK
    return (
        ScaleGroup(blk + attn_norm, tuple(blk + r for r in qkv), blk + "self_attn"),
        ScaleGroup(blk + ffn_norm, tuple(blk + r for r in ffn_in), blk + "mlp"),
        ScaleGroup("model.norm", ("lm_head",)),
    )


LLAMA_GROUPS = _block_groups("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                             "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
# Gemma 2 and 3: post_attention_layernorm normalises the attention output; the MLP reads pre_feedforward_layernorm.
GEMMA_GROUPS = _block_groups("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                             "pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
PHI3_GROUPS = _block_groups("input_layernorm", ("self_attn.qkv_proj",), "post_attention_layernorm", ("mlp.gate_up_proj",))

# A mixture of experts: the router and every expert's gate/up read the post-attention norm (the
# names are the stacked GGUF tensors' HF names, as gguf-py maps them).
MOE_GROUPS = _block_groups("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                           "post_attention_layernorm", ("mlp.gate", "mlp.experts.gate_proj", "mlp.experts.up_proj"))

# The steps that need a map from HF modules to GGUF tensors, by the name the build uses for them.
STEPS = ("imatrix", "smooth", "awq")
MOE_REFUSED = {"awq": "transformers 5 holds a mixture-of-experts block's experts as 3-D parameters, not the linear "
                      "layers AutoAWQ's Mixtral/Qwen3-MoE classes quantize"}


@dataclass(frozen=True)
class ExpertNames:
    """How a family's checkpoints name a mixture-of-experts block, which transformers 5 holds as
    ``mlp.gate`` (the router) and 3-D ``mlp.experts.<parameter>`` tensors: the block is called
    ``block`` there, and each expert ``i`` stores 2-D ``{block}.experts.{i}.{part}.weight`` tensors,
    ``parts`` naming, per 3-D parameter, those stacked into expert ``i``'s slice (concatenated
    along rows, in this order)."""

    block: str
    parts: Mapping[str, tuple[str, ...]]


MIXTRAL_EXPERTS = ExpertNames("block_sparse_moe", {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)})
QWEN_MOE_EXPERTS = ExpertNames("mlp", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)})


@dataclass(frozen=True)
class Architecture:
    """Everything the build knows about one model family: one row per HF architecture class."""

    hf_name: str
    model_type: str  # config.json's model_type for this class
    gguf_arch: gguf.MODEL_ARCH
    read_config: Callable[[Mapping[str, Any], str], ModelConfig]
    write_hparams: Callable[[gguf.GGUFWriter, ModelConfig], None]
    # tensor kind -> symbolic HF shape (out, in); per-block kinds are marked in BLOCK_TENSORS
    shapes: Mapping[gguf.MODEL_TENSOR, tuple[str, ...]]
    transforms: Mapping[gguf.MODEL_TENSOR, Transform]
    min_llama_cpp: str  # the oldest llama.cpp build that runs this family, and why
    biases: frozenset[gguf.MODEL_TENSOR] = frozenset()  # kinds that also carry a bias of their output width
    # tensors the converter computes from the config (rope factor tables), GGUF name -> data
    extra_tensors: Callable[[ModelConfig], dict[str, np.ndarray]] = lambda c: {}
    # HF tensor-name suffixes that carry nothing llama.cpp needs
    ignored_suffixes: tuple[str, ...] = (".rotary_emb.inv_freq",)
    # config-against-weights checks, run before the output is opened
    checks: tuple[Check, ...] = (check_head_dim,)
    # added tokens a release lists beyond its embedding rows, left out (the model never sees them)
    unembedded_tokens: frozenset[str] = frozenset()
    scale_groups: tuple[ScaleGroup, ...] = LLAMA_GROUPS
    # AWQ: the model_type key of its layer map in quantize.engine.awq_models.MODEL_CLASSES (ours, then AutoAWQ's)
    awq_layer_map: str | None = None
    calib_dtypes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # device -> dtype, where the default cannot hold it
    refused: Mapping[str, str] = dataclasses.field(default_factory=dict)  # step (STEPS) -> why it cannot run on this family
    experts: ExpertNames | None = None  # a mixture of experts: how its checkpoints name the experts

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def refuse(self, step: str, where: str | Path | None) -> None:
        """Raise the one-line error for a step this family cannot take."""
        if step in self.refused:
            raise QuantizeError(where, f"{step} is not available for {self.hf_name}: {self.refused[step]}; "
                                       f"turn it off in the recipe ([ladder] {step} = false)")

    def offset_norms(self, hf_modules: Iterable[str], n_blocks: int) -> list[str]:
        """The modules among ``hf_modules`` (HF names) that compute ``x_hat * (1 + w)``: the norms whose
        weight this row stores as ``w + 1`` (:func:`norm_plus_one`)."""
        tmap = gguf.get_tensor_name_map(self.gguf_arch, n_blocks)
        kinds = {m: tmap.get_type(m) for m in hf_modules}
        return [m for m, kind in kinds.items() if kind is not None and self.transforms.get(kind) is norm_plus_one]

    def norm_groups(self, n_blocks: int) -> list[tuple[str, tuple[str, ...]]]:
        """The scale groups whose ``prev`` is a norm, as GGUF tensor names (norm, readers), every block."""
        tmap = gguf.get_tensor_name_map(self.gguf_arch, n_blocks)
        out = []
        for g in self.scale_groups:
            for bid in range(n_blocks) if "{bid}" in g.prev else [0]:
                mapped = [tmap.get_name(m.format(bid=bid)) for m in (g.prev, *g.readers)]
                names = [n for n in mapped if n is not None]
                if len(names) != len(mapped):
                    if "{bid}" not in g.prev:
                        continue  # output_norm -> output where the GGUF architecture has no output matrix (tied: Gemma)
                    raise AssertionError(f"{self.hf_name}: a scale group names a module gguf-py does not map: {g}")
                if names[0].endswith("_norm"):
                    out.append((names[0] + ".weight", tuple(n + ".weight" for n in names[1:])))
        return out


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


# --- Qwen2, Qwen3, Qwen3-MoE ------------------------------------------------------------------

def read_qwen_config(cfg: Mapping[str, Any], path: str) -> ModelConfig:
    """Qwen2/Qwen3 configs carry a ``sliding_window`` that only ``use_sliding_window`` turns on;
    llama.cpp's qwen2/qwen3 graphs attend over the whole context, so that switch is refused."""
    if cfg.get("use_sliding_window"):
        raise QuantizeError(path, "use_sliding_window=true: llama.cpp's qwen2/qwen3 graphs have no sliding-window "
                                  "attention and would run this model wrong")
    return dataclasses.replace(read_llama_config(cfg, path), sliding_window=None)


def read_qwen3moe_config(cfg: Mapping[str, Any], path: str) -> ModelConfig:
    """Every block must be a mixture of experts whose top-k weights are renormalised: llama.cpp's
    qwen3moe graph hard-codes both."""
    if int(cfg.get("decoder_sparse_step") or 1) != 1 or cfg.get("mlp_only_layers"):
        raise QuantizeError(path, "decoder_sparse_step/mlp_only_layers make some blocks dense; llama.cpp's qwen3moe graph "
                                  "runs every block as a mixture of experts")
    if not cfg.get("norm_topk_prob", False):
        raise QuantizeError(path, "norm_topk_prob=false: llama.cpp's qwen3moe graph always renormalises the top-k "
                                  "expert weights and would run this model wrong")
    c = read_qwen_config(cfg, path)
    return dataclasses.replace(c, n_ff_exp=int(_need(cfg, "moe_intermediate_size", path)))


QWEN2_SHAPES = LLAMA_SHAPES
QWEN3_SHAPES: Mapping[gguf.MODEL_TENSOR, tuple[str, ...]] = {**LLAMA_SHAPES, T.ATTN_Q_NORM: ("head",), T.ATTN_K_NORM: ("head",)}
MOE_SHAPES: Mapping[gguf.MODEL_TENSOR, tuple[str, ...]] = {
    **{k: v for k, v in LLAMA_SHAPES.items() if k not in (T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)},
    T.FFN_GATE_INP: ("expert", "embd"),
    T.FFN_GATE_EXP: ("expert", "ff_exp", "embd"),
    T.FFN_UP_EXP: ("expert", "ff_exp", "embd"),
    T.FFN_DOWN_EXP: ("expert", "embd", "ff_exp"),
}

# --- Phi-3 ---------------------------------------------------------------------------------------

def read_phi3_config(cfg: Mapping[str, Any], path: str) -> ModelConfig:
    c = read_llama_config(cfg, path)
    rope = dict(c.rope_scaling)
    rope.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings", c.n_ctx))
    partial = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    return dataclasses.replace(c, rope_scaling=rope, rope_dims=int(partial * c.n_embd) // c.n_head)


def _phi3_hparams(w: gguf.GGUFWriter, c: ModelConfig) -> None:
    _llama_hparams(w, c)
    w.add_rope_scaling_orig_ctx_len(int(c.rope_scaling["original_max_position_embeddings"]))
    if not c.sliding_window:
        w.add_sliding_window(0)  # llama.cpp tells Phi-4 (no sliding window) from Phi-3 by this 0
    if c.rope_scaling.get("long_factor"):
        scale = c.n_ctx / int(c.rope_scaling["original_max_position_embeddings"])
        orig = int(c.rope_scaling["original_max_position_embeddings"])
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)


def phi3_rope_factors(c: ModelConfig) -> dict[str, np.ndarray]:
    """LongRoPE's per-frequency divisors (Phi-3 128k), as llama.cpp's ``rope_factors_long``/``_short``."""
    r = c.rope_scaling
    if not r.get("long_factor"):
        return {}
    if r.get("rope_type") not in ("longrope", "su"):
        raise QuantizeError(None, f"long_factor/short_factor with rope type {r.get('rope_type')!r}; Phi-3 uses longrope")
    out = {_tensor_name(T.ROPE_FACTORS_LONG): np.asarray(r["long_factor"], np.float32),
           _tensor_name(T.ROPE_FACTORS_SHORT): np.asarray(r.get("short_factor") or (), np.float32)}
    if any(len(v) != (c.rope_dims or c.head_dim) // 2 for v in out.values()):
        raise QuantizeError(None, f"rope long_factor and short_factor must each hold {(c.rope_dims or c.head_dim) // 2} "
                                  "values (half the rotary dimensions)")
    return out


PHI3_SHAPES: Mapping[gguf.MODEL_TENSOR, tuple[str, ...]] = {
    **{k: v for k, v in LLAMA_SHAPES.items() if k not in (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.FFN_GATE, T.FFN_UP)},
    T.ATTN_QKV: ("qkv", "embd"),
    T.FFN_UP: ("ff2", "embd"),
}

# --- Gemma 2 ------------------------------------------------------------------------------------

GEMMA2_DEFAULTS: Mapping[str, Any] = {  # transformers' Gemma2Config defaults
    "head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "sliding_window": 4096, "rope_theta": 10000.0, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
    "query_pre_attn_scalar": 256,
}
LLAMA_CPP_GEMMA2_PATTERN = 2  # llama.cpp: set_swa_pattern(2), even layers sliding-window, odd global
LLAMA_CPP_GEMMA2_27B_LAYERS = 46  # llama.cpp's LLM_TYPE_27B, whose queries it scales by 1/sqrt(n_embd / n_head)


def read_gemma2_config(cfg: Mapping[str, Any], path: str) -> ModelConfig:
    cfg = {**GEMMA2_DEFAULTS, **cfg}
    c = read_llama_config(cfg, path)
    layers = cfg.get("layer_types")
    if layers is not None and list(layers) != _layer_schedule(LLAMA_CPP_GEMMA2_PATTERN, c.n_layer):
        raise QuantizeError(path, "layer_types is not Gemma 2's alternation (sliding-window, then global); llama.cpp "
                                  "hard-codes that one and would run this model wrong")
    scalar = float(cfg["query_pre_attn_scalar"])
    want = c.n_embd / c.n_head if c.n_layer == LLAMA_CPP_GEMMA2_27B_LAYERS else c.head_dim
    if scalar != want:
        raise QuantizeError(path, f"query_pre_attn_scalar={scalar:g}, but llama.cpp's gemma2 graph scales queries by "
                                  f"1/sqrt({want:g}) for a {c.n_layer}-block model; it would run this model wrong")
    return dataclasses.replace(c, head_dim_explicit=True, final_logit_softcap=cfg.get("final_logit_softcapping"),
                               attn_logit_softcap=cfg.get("attn_logit_softcapping"))


GEMMA2_NORMS = (T.OUTPUT_NORM, T.ATTN_NORM, T.ATTN_POST_NORM, T.FFN_PRE_NORM, T.FFN_POST_NORM)
GEMMA2_SHAPES: Mapping[gguf.MODEL_TENSOR, tuple[str, ...]] = {k: v for k, v in GEMMA3_SHAPES.items() if k not in (T.ATTN_Q_NORM, T.ATTN_K_NORM)}

# --- the table ----------------------------------------------------------------------------------

# The oldest llama.cpp builds, from the merge commits of the pull requests that added each feature.
LLAMA_CPP_PRE_KEY = "b2800 (May 2024: GGUF v3 with the tokenizer.ggml.pre pre-tokenizer key)"
LLAMA_CPP_LLAMA = LLAMA_CPP_PRE_KEY[:-1] + "; b3472 for Llama 3.1's rope scaling, PR #8676)"
LLAMA_CPP_QWEN3 = "b5092 (April 2025, PR #12828: Qwen3 and Qwen3-MoE)"

# Mistral-7B and Llama-2/3 (incl. grouped-query 70B) are the same graph to llama.cpp.
LLAMA = Architecture(
    hf_name="LlamaForCausalLM",
    model_type="llama",
    gguf_arch=gguf.MODEL_ARCH.LLAMA,
    read_config=read_llama_config,
    write_hparams=_llama_hparams,
    shapes=LLAMA_SHAPES,
    transforms=LLAMA_TRANSFORMS,
    extra_tensors=llama3_rope_factors,
    min_llama_cpp=LLAMA_CPP_LLAMA,
    awq_layer_map="llama",
)
MISTRAL = dataclasses.replace(LLAMA, hf_name="MistralForCausalLM", model_type="mistral", awq_layer_map="mistral")
# Mixtral: Mistral's attention, a mixture of experts stacked into 3-D tensors (llama arch).
MIXTRAL = dataclasses.replace(LLAMA, hf_name="MixtralForCausalLM", model_type="mixtral", shapes=MOE_SHAPES, scale_groups=MOE_GROUPS,
                              awq_layer_map=None, refused=MOE_REFUSED, experts=MIXTRAL_EXPERTS)
# Qwen2/2.5: biases on q, k, v; NeoX rope (HF's row order, no permutation).
QWEN2 = Architecture(
    hf_name="Qwen2ForCausalLM",
    model_type="qwen2",
    gguf_arch=gguf.MODEL_ARCH.QWEN2,
    read_config=read_qwen_config,
    write_hparams=_llama_hparams,
    shapes=QWEN2_SHAPES,
    transforms={},
    biases=frozenset({T.ATTN_Q, T.ATTN_K, T.ATTN_V}),
    min_llama_cpp="b2961 (May 2024: after the qwen2 pre-tokenizer, PR #7114, landed between b2717 and b2961)",
    awq_layer_map="qwen2",
)
# Qwen3: per-head q/k RMSNorm, no biases.
QWEN3 = dataclasses.replace(QWEN2, hf_name="Qwen3ForCausalLM", model_type="qwen3", gguf_arch=gguf.MODEL_ARCH.QWEN3,
                            shapes=QWEN3_SHAPES, biases=frozenset(), min_llama_cpp=LLAMA_CPP_QWEN3, awq_layer_map="qwen3")
QWEN3_MOE = dataclasses.replace(QWEN3, hf_name="Qwen3MoeForCausalLM", model_type="qwen3_moe", gguf_arch=gguf.MODEL_ARCH.QWEN3MOE,
                                read_config=read_qwen3moe_config, shapes={**MOE_SHAPES, T.ATTN_Q_NORM: ("head",), T.ATTN_K_NORM: ("head",)},
                                scale_groups=MOE_GROUPS, awq_layer_map=None, refused=MOE_REFUSED, experts=QWEN_MOE_EXPERTS)

# Phi-3/3.5/4-mini: fused qkv and gate_up (llama.cpp keeps both fused), LongRoPE factor tables.
PHI3 = Architecture(
    hf_name="Phi3ForCausalLM",
    model_type="phi3",
    gguf_arch=gguf.MODEL_ARCH.PHI3,
    read_config=read_phi3_config,
    write_hparams=_phi3_hparams,
    shapes=PHI3_SHAPES,
    transforms={},
    extra_tensors=phi3_rope_factors,
    scale_groups=PHI3_GROUPS,
    awq_layer_map="phi3",
    min_llama_cpp="b2961 (May 2024, PR #7225: Phi-3 with the 128k rope factor tables)",
)
# Gemma 2: four norms a block, stored as 1 + weight; attention and final logit soft-capping;
# sliding-window and global layers alternating.  Released in bfloat16 and calibrated in it on CUDA,
# as Gemma 3 is (whose activations were measured beyond float16's range; Gemma 2's were not, in the project's measurements).
GEMMA2 = Architecture(
    hf_name="Gemma2ForCausalLM",
    model_type="gemma2",
    gguf_arch=gguf.MODEL_ARCH.GEMMA2,
    read_config=read_gemma2_config,
    write_hparams=_llama_hparams,
    shapes=GEMMA2_SHAPES,
    transforms={k: norm_plus_one for k in GEMMA2_NORMS},
    scale_groups=GEMMA_GROUPS,
    awq_layer_map="gemma2",
    calib_dtypes={"cuda": "bfloat16"},
    min_llama_cpp="b3266 (June 2024, PR #8197: Gemma 2 with logit soft-capping)",
)
# Gemma 3 text models (270M, 1B; the text part of 4B-27B): extra norms after attention and
# around the MLP, per-head q/k norms, norms stored as 1 + weight, tied embeddings, a
# sliding-window/global schedule, the 262k SentencePiece vocabulary without dummy prefix.
GEMMA3 = Architecture(
    hf_name="Gemma3ForCausalLM",
    model_type="gemma3_text",
    gguf_arch=gguf.MODEL_ARCH.GEMMA3,
    read_config=read_gemma3_config,
    write_hparams=_gemma3_hparams,
    shapes=GEMMA3_SHAPES,
    transforms=GEMMA3_TRANSFORMS,
    unembedded_tokens=frozenset({"<image_soft_token>"}),  # the vision processor's placeholder
    scale_groups=GEMMA_GROUPS,
    awq_layer_map="gemma3_text",  # our map (quantize/engine/awq_models.py); AutoAWQ 0.2.9 has none
    # Gemma 3's residual stream outgrows float16 (max 65504): gemma-3-270m reaches 1.04e5 by block 14
    # on Shakespeare and its float16 forward returns non-finite logits, so on CUDA it calibrates in
    # bfloat16, the dtype Gemma 3 is released in.
    calib_dtypes={"cuda": "bfloat16"},
    min_llama_cpp="b4875 (12 March 2025, the first with Gemma 3)",
)

ARCHITECTURES: dict[str, Architecture] = {a.hf_name: a for a in (LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3, QWEN3_MOE, PHI3, GEMMA2, GEMMA3)}

# Tensor kinds that exist once per model (every other kind once per block).
MODEL_TENSORS = frozenset({T.TOKEN_EMBD, T.OUTPUT_NORM, T.OUTPUT, T.ROPE_FREQS, T.ROPE_FACTORS_LONG, T.ROPE_FACTORS_SHORT})
# Tensors llama.cpp keeps in float32 whatever the file type (its converter's list, for the kinds we write).
F32_TENSORS = frozenset({T.FFN_GATE_INP})


def rows_of(arch_name: str) -> list[Architecture]:
    """The rows whose GGUF architecture is ``arch_name`` (none for a file llama.cpp's converter wrote)."""
    return [a for a in ARCHITECTURES.values() if a.arch_name == arch_name]


def for_gguf(arch_name: str, source_arch: str | None, where: str | Path | None) -> list[Architecture]:
    """The rows a GGUF may come from: the one its ``quantize.source.architecture`` names, else every
    row of its GGUF architecture (Llama, Mistral and Mixtral share ``llama``)."""
    if source_arch in ARCHITECTURES:
        return [ARCHITECTURES[source_arch]]
    rows = rows_of(arch_name)
    if not rows:
        raise QuantizeError(where, f"GGUF architecture {arch_name!r} has no row in this tool's table (a file llama.cpp's "
                                   f"converter wrote); known: {', '.join(sorted({a.arch_name for a in ARCHITECTURES.values()}))}")
    return rows


def for_step(hf_name: str, step: str, where: str | Path) -> Architecture:
    """The row of a family for a step that needs its HF module map (STEPS), or the one-line refusal."""
    row = ARCHITECTURES.get(hf_name)
    if row is None:
        able = [a.hf_name for a in ARCHITECTURES.values() if step not in a.refused and (step != "awq" or a.awq_layer_map)]
        raise QuantizeError(where, f"{step} needs this tool's map of {hf_name}'s modules, which it has not (llama.cpp's "
                                   f"converter writes its GGUF); {step} runs on {', '.join(able)}; turn it off in the "
                                   f"recipe ([ladder] {step} = false)")
    row.refuse(step, where)
    return row


def lookup(hf_name: str, where: str) -> Architecture:
    try:
        return ARCHITECTURES[hf_name]
    except KeyError:
        raise QuantizeError(
            where, f"architecture {hf_name!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
