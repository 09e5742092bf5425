"""The streamed LoRA merge against peft's own merge_and_unload, on the demo model and its adapter;
sharded bases; adapters that do not fit, refused before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MakeTemp
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quantize.engine.lora import merge_lora, train_demo_lora
from quantize.errors import QuantizeError
from quantize.models.demo import Demo


@pytest.fixture(scope="module")
def adapter(demo: Demo) -> Path:
    return train_demo_lora(demo.spm, demo.text["train"], demo.root / "lora")


@pytest.fixture(scope="module")
def merged(demo: Demo, adapter: Path, module_mktemp: MakeTemp) -> Path:
    return merge_lora(demo.spm, adapter, module_mktemp("merge") / "merged")


def _peft_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_streamed_merge_equals_peft(demo: Demo, adapter: Path, merged: Path) -> None:
    """Every tensor of the streamed merge equals peft's merge_and_unload of the fp16 base, bit for bit.

    Both compute float32(B) @ float32(A) with torch's matmul on the same shapes, multiply by the same
    Python-float scale, add the widened fp16 weight in float32 and round once to fp16, so there is
    no rounding step where they could differ: the max abs difference seen is 0, and 0 is asserted.
    """
    ref = _peft_merge(demo.spm, adapter)
    ours = _load_dir(merged)
    base = _load_dir(demo.spm)
    assert set(ours) == set(base) and set(ours) <= set(ref)
    diffs = {k: (ours[k].float() - ref[k].float()).abs().max().item() for k in ours}
    print(f"max abs difference streamed vs peft merge: {max(diffs.values())}")
    assert all(ours[k].dtype == base[k].dtype == torch.float16 for k in ours)
    assert all(torch.equal(ours[k], ref[k]) for k in ours)
    # The adapter did change the weights it targets (so equality is not trivially base == base).
    changed = {k for k in ours if not torch.equal(ours[k], base[k])}
    assert len(changed) == 7 * 4 and all(k.endswith("_proj.weight") for k in changed)
    meta = json.loads((merged / "merge.json").read_text())
    assert meta["merged_tensors"] == 28 and meta["r"] == 8 and meta["lora_alpha"] == 16
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (merged / f).read_bytes() == (demo.spm / f).read_bytes()


def _shard(base: Path, dest: Path, parts: int) -> Path:
    """``base`` rewritten as ``parts`` safetensors shards with an index, as save_pretrained shards."""
    tensors = load_file(base / "model.safetensors")
    names = list(tensors)
    per = -(-len(names) // parts)
    dest.mkdir()
    weight_map = {}
    for i in range(parts):
        fname = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        save_file(chunk, str(dest / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chunk, fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    for f in base.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, dest / f.name)
    return dest


def test_sharded_base_gives_same_shards(demo: Demo, adapter: Path, merged: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = _shard(demo.spm, tmp_path / "sharded", 3)
    out = merge_lora(base, adapter, tmp_path / "out")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_text() == (base / "model.safetensors.index.json").read_text()
    for name in shards:  # each shard holds the same tensors as the base's, in the same order
        with safe_open(str(base / name), "pt") as a, safe_open(str(out / name), "pt") as b:
            assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata()
    single = _load_dir(merged)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in single.items())


def _copy_adapter(src: Path, dst: Path, edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None]) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    edit(cfg, tensors)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_the_merge_record_does_not_depend_on_the_adapters_module_order(demo: Demo, adapter: Path, merged: Path,
                                                                       tmp_path: Path) -> None:
    """peft saves target_modules from a set, so the same adapter's config lists them in any order; the
    merged folder (whose files key the later build steps) must be the same."""
    def reverse(cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
        cfg["target_modules"] = sorted(cfg["target_modules"], reverse=True)

    out = merge_lora(demo.spm, _copy_adapter(adapter, tmp_path / "reordered", reverse), tmp_path / "out")
    record, again = (json.loads((d / "merge.json").read_text()) for d in (merged, out))
    assert {**record, "adapter": None, "adapter_sha256": None} == {**again, "adapter": None, "adapter_sha256": None}


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _narrow_a(cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    t[Q_A] = t[Q_A][:, :128].contiguous()  # lora_A of a model half as wide


def _missing_module(cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    for k in (Q_A, Q_B):  # layer 9 of a 4-layer model
        t[k.replace("layers.0.", "layers.9.")] = t.pop(k)


def _dora(cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    cfg["use_dora"] = True


def _lonely_a(cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> None:
    del t[Q_B]


@pytest.mark.parametrize(("edit", "message"), [
    (_narrow_a, r"does not fit the base model .*q_proj: lora_A \[8, 128\] and lora_B \[256, 8\]"),
    (_missing_module, r"does not fit the base model .*no tensor model\.layers\.9\.self_attn\.q_proj\.weight"),
    (_dora, r"use_dora = True is not supported"),
    (_lonely_a, r"has lora_A but not its other factor"),
])
def test_bad_adapter_is_refused_before_writing(demo: Demo, adapter: Path, tmp_path: Path,
                                               edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None],
                                               message: str) -> None:
    bad = _copy_adapter(adapter, tmp_path / "bad", edit)
    out = tmp_path / "out" / "merged"
    with pytest.raises(QuantizeError, match=message):
        merge_lora(demo.spm, bad, out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_cli_refuses_in_one_line(demo: Demo, adapter: Path, tmp_path: Path) -> None:
    bad = _copy_adapter(adapter, tmp_path / "bad", _narrow_a)
    res = subprocess.run([sys.executable, "-m", "quantize", "merge", str(demo.spm), str(bad), "-o", str(tmp_path / "m")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith(f"quantize: {bad}: does not fit the base model") and res.stderr.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_pickled_adapter_merges_only_with_opt_in(demo: Demo, adapter: Path, merged: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(adapter / "adapter_config.json", pickled / "adapter_config.json")
    torch.save(load_file(adapter / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    with pytest.raises(QuantizeError, match="is a pickle"):
        merge_lora(demo.spm, pickled, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = merge_lora(demo.spm, pickled, tmp_path / "out", allow_pickle=True)
    assert (out / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes()
