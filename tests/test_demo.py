"""The demo builds only what a recipe names: each part (texts, each model) is written atomically on
its own and reused; a recipe naming one model never trains the other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from quantize.models.demo import DemoRecipe, ModelRecipe, build_demo
from quantize.sources import resolve

TINY = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            steps=2, batch=2, seq_len=32, outlier_channels=2)
RECIPE = DemoRecipe(models=(ModelRecipe("a-spm", "mistral-spm", "MistralForCausalLM", vocab_size=32002, **TINY),  # type: ignore[arg-type]
                            ModelRecipe("b-bpe", "bpe", "LlamaForCausalLM", vocab_size=512, tie_word_embeddings=True, **TINY)))  # type: ignore[arg-type]


def test_only_the_named_models_are_built_and_parts_are_reused(tmp_path: Path) -> None:
    demo = build_demo(tmp_path, RECIPE, models=["a-spm"])
    built = {p.name for p in demo.root.iterdir() if not p.name.startswith(".")}
    assert built == {"text", "a-spm", "reports"}
    stamp = (demo.root / "a-spm" / "model.safetensors").stat().st_mtime_ns
    again = build_demo(tmp_path, RECIPE, models=["a-spm", "b-bpe"])
    assert (again.root / "b-bpe" / "model.safetensors").is_file()
    assert (again.root / "a-spm" / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained


def test_a_text_part_builds_no_model(tmp_path: Path) -> None:
    calib = resolve("demo:calib", tmp_path / "r.toml", tmp_path, "calibration")
    assert calib.is_file() and calib.stat().st_size > 100_000
    root = calib.parent.parent
    assert {p.name for p in root.iterdir() if not p.name.startswith(".")} == {"text"}


def test_the_same_part_is_the_same_whichever_else_is_built(tmp_path: Path) -> None:
    """Each model seeds its own training: built alone or after the other, its weights are the same bytes."""
    alone = build_demo(tmp_path / "alone", RECIPE, models=["b-bpe"])
    both = build_demo(tmp_path / "both", dataclasses.replace(RECIPE), models=None)
    assert (alone.root / "b-bpe" / "model.safetensors").read_bytes() == (both.root / "b-bpe" / "model.safetensors").read_bytes()
