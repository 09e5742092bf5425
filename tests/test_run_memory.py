"""The card's "RAM needed" from the model's shape: KV cache, compute buffer, weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize.run_memory import Shape, shape_of_config, shape_of_gguf

MiB = 2**20

# The published configs' shape keys: Mistral-7B-v0.1 (AshhLimaRP's base), Llama-2-70B (Dolphin 2.2 70B's
# base), Llama-2-7B (no grouped-query attention).
CONFIGS = {
    "Mistral-7B": ({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
                    "vocab_size": 32000}, 0.125),
    "Llama-2-70B": ({"num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "hidden_size": 8192,
                     "vocab_size": 32000}, 0.3125),
    "Llama-2-7B": ({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_size": 4096,
                    "vocab_size": 32000}, 0.5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_kv_cache_per_token_from_the_config(name: str) -> None:
    config, mib_per_token = CONFIGS[name]
    shape = shape_of_config(config)
    assert shape.kv_cache_bytes(1) == mib_per_token * MiB
    assert shape.kv_cache_bytes(4096) == 4096 * mib_per_token * MiB


def test_ram_is_weights_kv_cache_and_compute_buffer() -> None:
    shape = shape_of_config(CONFIGS["Mistral-7B"][0])
    weights = 4_368_439_584  # a Mistral-7B Q4_K_M
    # compute: float32 logits and one layer's attention scores for a 512-token micro-batch
    compute = 4 * 512 * (32000 + 32 * 8192)
    assert shape.ram_bytes(weights, 8192) == weights + 8192 * 0.125 * MiB + compute


def test_the_gguf_header_gives_the_configs_shape(spm_f16: Path, demo) -> None:  # type: ignore[no-untyped-def]
    assert shape_of_gguf(spm_f16) == shape_of_config(json.loads((demo.spm / "config.json").read_text()))


def test_the_cards_ram_column_is_the_formula(release) -> None:  # type: ignore[no-untyped-def]
    """The demo release: every row's figure is its file size plus KV cache and compute buffer at the card's context."""
    from quantize.recipe import load_recipe
    from quantize.run_memory import shape_of

    manifest = json.loads((release.root / "manifest.json").read_text())
    context = load_recipe(Path(__file__).parents[1] / "recipes" / "demo.toml").card.context
    card = (release.root / "README.md").read_text()
    for a in manifest["artifacts"]:
        if a["kind"] in ("imatrix", "SillyTavern"):
            continue
        path = release.root / a["files"][0]["name"].split("/")[0]
        size = sum(f["size"] for f in a["files"] if not f["name"].endswith((".kcpps", ".kcppt")))
        want = shape_of(path).ram_bytes(size, context)
        assert a["ram_bytes"] == want
        assert f"| {want / 2**30:.1f} GiB |" in card


def test_a_shape_without_gqa_keys_uses_the_heads() -> None:
    assert shape_of_config({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256, "vocab_size": 10}) == \
        Shape(2, 4, 4, 64, 64, 10)
