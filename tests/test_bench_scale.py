"""The bench-scale inputs are real: the generator's checkpoint (tiny width, real Mistral tokenizer,
several shards) loads in transformers and converts with `quantize convert`, and its LoRA adapter
loads in peft against it and changes the model's output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MakeTemp

from bench.measure import Shape, random_checkpoint
from bench.scale import mistral_tokenizer, random_adapter

TINY = Shape(256, 512, 4, 2, 32000, layers=2, max_positions=32768)


@pytest.fixture(scope="module")
def inputs(module_mktemp: MakeTemp) -> tuple[Path, Path]:
    root = module_mktemp("bench-scale")
    tok = mistral_tokenizer(root / "tokenizer")
    base = random_checkpoint(root / "base", TINY, tok, shard_bytes=10**7)  # forces several shards
    return base, random_adapter(root / "lora", TINY, base)


def test_checkpoint_loads_in_transformers(inputs: tuple[Path, Path]) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = inputs
    assert len(list(base.glob("model-*.safetensors"))) > 1
    model, info = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    tok = AutoTokenizer.from_pretrained(base)
    assert len(tok) == 32000 == model.config.vocab_size
    ids = tok("To be, or not to be", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1  # BOS
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    name = "model.layers.1.mlp.down_proj.weight"
    shard = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(str(base / shard), "np") as f:
        stored = f.get_tensor(name)
    assert stored.std() == pytest.approx(0.02, rel=0.05)
    assert np.array_equal(model.state_dict()[name].numpy(), stored.astype(np.float32))


def test_checkpoint_converts(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    from gguf import GGUFReader

    base, _ = inputs
    out = tmp_path / "m.F16.gguf"
    subprocess.run([sys.executable, "-m", "quantize", "convert", str(base), "-o", str(out)], check=True)
    r = GGUFReader(out)
    assert len(r.tensors) == len(TINY.tensors())
    tokens = r.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 32000


def test_adapter_loads_in_peft(inputs: tuple[Path, Path]) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base, lora = inputs
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.tensor([[1, 415, 28705, 1014, 2]])
    with torch.no_grad():
        before = model(ids).logits
        peft_model = PeftModel.from_pretrained(model, lora)
        after = peft_model(ids).logits
    stored = load_file(lora / "adapter_model.safetensors")
    assert len(stored) == 2 * 7 * TINY.layers
    state = peft_model.state_dict()
    for key, value in stored.items():  # every stored matrix reached its module (peft drops unmatched keys silently)
        loaded = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(state[loaded], value), key
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after)
