"""Per-tensor types through llama.cpp's own quantizer (``tt_overrides``): the written file holds exactly
the plan's types, each on the tensor it names and no other."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from conftest import MakeTemp

from bench.measure import Shape, random_checkpoint
from quantize.convert import convert
from quantize.errors import QuantizeError
from quantize.formats.gguf_read import read_header
from quantize.gguf_quant import QuantizeSettings, quantize_gguf, tensor_pattern
from quantize.models.demo import Demo

# Twelve blocks: blk.1 and blk.10/blk.11 share a prefix; rows of 256, the K-quants' block size.
TWELVE = Shape(256, 512, 4, 2, 32002, layers=12, eos_token_id=32001)  # the demo's ChatML vocabulary


@pytest.fixture(scope="module")
def f16(demo: Demo, module_mktemp: MakeTemp) -> Path:
    root = module_mktemp("twelve")
    out = root / "twelve.F16.gguf"
    convert(random_checkpoint(root / "hf", TWELVE, demo.spm), out)
    return out


def _types(path: Path) -> dict[str, str]:
    return {name: gguf.GGMLQuantizationType(t).name for name, (_, t) in read_header(path).tensors.items()}


def test_the_file_holds_the_plan(f16: Path, tmp_path: Path) -> None:
    """A plan names every tensor's type (llama.cpp's Q4_K_M recipe chooses ffn_down's type by its position
    among the ffn_down tensors it decides itself, so a partial plan moves the others)."""
    stock = _types(quantize_gguf(f16, tmp_path / "stock.gguf", QuantizeSettings("Q4_K_M")))
    changed = {"blk.1.ffn_down.weight": "Q8_0", "blk.1.attn_q.weight": "Q6_K", "blk.1.ffn_up.weight": "Q3_K",
               "output.weight": "Q4_K", "blk.11.attn_v.weight": "IQ4_XS"}
    plan = {n: t for n, t in {**stock, **changed}.items() if t not in ("F32", "F16")}  # the quantized tensors
    mixed = quantize_gguf(f16, tmp_path / "mixed.gguf", QuantizeSettings("Q4_K_M", tensor_types=tuple(plan.items())))
    got = _types(mixed)
    assert {n: got[n] for n in plan} == plan
    assert {n: t for n, t in got.items() if n not in plan} == {n: t for n, t in stock.items() if n not in plan}
    assert read_header(mixed).kv["quantize.gguf.tensor_types"] == len(plan)


def test_a_tensor_named_is_not_a_prefix_of_others(f16: Path, tmp_path: Path) -> None:
    got = _types(quantize_gguf(f16, tmp_path / "one.gguf", QuantizeSettings("Q4_K_M", tensor_types=(("blk.1.ffn_down.weight", "Q8_0"),))))
    assert got["blk.1.ffn_down.weight"] == "Q8_0"
    assert [n for n, t in got.items() if t == "Q8_0"] == ["blk.1.ffn_down.weight"]  # not blk.10, blk.11


def test_a_stock_file_carries_no_plan_key(f16: Path, tmp_path: Path) -> None:
    assert "quantize.gguf.tensor_types" not in read_header(quantize_gguf(f16, tmp_path / "s.gguf", QuantizeSettings("Q6_K"))).kv


def test_patterns_are_exact_names() -> None:
    import re

    p = tensor_pattern("blk.1.ffn_down.weight")
    assert re.search(p, "blk.1.ffn_down.weight") and not re.search(p, "blk.11.ffn_down.weight")
    assert not re.search(p, "blk.1xffn_down.weight") and not re.search(p, "blk.1.ffn_down.weight.extra")


@pytest.mark.parametrize(("asked", "message"), [
    (("blk.99.ffn_down.weight", "Q8_0"), "has no tensor 'blk.99.ffn_down.weight'"),
    (("blk.1.ffn_down.weight", "Q9_K"), "unknown tensor type 'Q9_K'"),
    (("blk.1.ffn_down.weight", "IQ2_XXS"), "without an importance matrix"),
])
def test_a_bad_tensor_type_is_refused_before_writing(f16: Path, tmp_path: Path, asked: tuple[str, str], message: str) -> None:
    out = tmp_path / "bad.gguf"
    with pytest.raises(QuantizeError, match=message):
        quantize_gguf(f16, out, QuantizeSettings("Q4_K_M", tensor_types=(asked,)))
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_takes_tensor_types(f16: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "cli.gguf"
    ok = subprocess.run([sys.executable, "-m", "quantize", "gguf", str(f16), "--type", "Q6_K", "-o", str(out),
                         "--tensor-type", "blk.2.attn_output.weight=Q8_0"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert _types(out)["blk.2.attn_output.weight"] == "Q8_0"
    bad = subprocess.run([sys.executable, "-m", "quantize", "gguf", str(f16), "-o", str(tmp_path / "x.gguf"),
                          "--tensor-type", "Q8_0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not TENSOR=TYPE" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
