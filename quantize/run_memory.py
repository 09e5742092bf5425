"""What running a released model takes in memory, from its shape: the card's "RAM needed" column.

    weights (the file's size) + KV cache + compute buffer

* KV cache: ``context x layers x KV heads x (key length + value length) x 2 bytes`` (llama.cpp's default
  f16 cache): 0.125 MiB a token for Mistral-7B (32 layers, 8 KV heads of 128), 0.3125 MiB for
  Llama-2-70B (80 layers, 8 KV heads), 0.5 MiB for Llama-2-7B (32 KV heads, no GQA).  Sliding-window
  layers are counted at the full context, so for those families it is an upper bound.
* Compute buffer: llama.cpp's largest float32 intermediates for one micro-batch of 512 tokens, the
  logits (``vocab x 512``) and one layer's attention scores without flash attention
  (``heads x context x 512``).

Full GPU offload needs about the same in VRAM.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize.formats.gguf_read import read_header

KV_BYTES = 2  # f16 cache entries
UBATCH = 512  # llama.cpp's default micro-batch (n_ubatch)


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    key_length: int
    value_length: int
    vocab: int

    def kv_cache_bytes(self, context: int) -> int:
        return context * self.layers * self.kv_heads * (self.key_length + self.value_length) * KV_BYTES

    def compute_bytes(self, context: int) -> int:
        return 4 * UBATCH * (self.vocab + self.heads * context)

    def ram_bytes(self, weights: int, context: int) -> int:
        return weights + self.kv_cache_bytes(context) + self.compute_bytes(context)


def shape_of_config(config: dict[str, Any]) -> Shape:
    """From a Hugging Face ``config.json`` (a multimodal one's ``text_config``)."""
    c = config.get("text_config") or config
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    return Shape(int(c["num_hidden_layers"]), heads, int(c.get("num_key_value_heads") or heads), head_dim, head_dim,
                 int(c["vocab_size"]))


def shape_of_gguf(path: Path) -> Shape:
    """From a GGUF's header (``<arch>.block_count``, ``.attention.head_count[_kv]``, ``.attention.key_length``
    ...; the vocabulary's length)."""
    kv = read_header(path).kv
    arch = kv["general.architecture"]
    heads = int(kv[f"{arch}.attention.head_count"])
    head_dim = int(kv[f"{arch}.embedding_length"]) // heads
    return Shape(int(kv[f"{arch}.block_count"]), heads, int(kv.get(f"{arch}.attention.head_count_kv", heads)),
                 int(kv.get(f"{arch}.attention.key_length", head_dim)), int(kv.get(f"{arch}.attention.value_length", head_dim)),
                 int(kv["tokenizer.ggml.tokens"]))


def shape_of(artifact: Path) -> Shape:
    """A GGUF's shape, or a checkpoint folder's (an AWQ folder)."""
    if artifact.is_file():
        return shape_of_gguf(artifact)
    return shape_of_config(json.loads((artifact / "config.json").read_text()))
