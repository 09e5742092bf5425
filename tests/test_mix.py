"""Searched per-tensor types under a byte budget (``quantize gguf --budget``, ``{ budget = ... }`` in a
recipe): the file holds the plan, fits the budget to the byte llama.cpp's dry run gives, the
sensitivity uses llama.cpp's own rounding, and a build ships the stock type when the mix loses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import DEMO_ROOT, ROOT, MakeTemp
from test_release import _recipe

from quantize import ggml
from quantize.errors import QuantizeError
from quantize.formats.gguf_read import open_gguf, read_header
from quantize.gguf_mix import quantize_to_budget, report_path
from quantize.gguf_quant import QuantizeSettings, quantize_gguf
from quantize.imatrix import ImatrixSettings, compute_imatrix
from quantize.mix import Predictor, Sensitivity, dry_run, measure_sensitivity, tensor_bytes
from quantize.models.demo import Demo
from quantize.recipe import load_recipe


@pytest.fixture(scope="module")
def imatrix(demo: Demo, module_mktemp: MakeTemp) -> Path:
    return compute_imatrix(demo.spm, demo.text["calib"], ImatrixSettings(ctx=128, chunks=4)).save(
        module_mktemp("mix-im") / "im.gguf")


@pytest.fixture(scope="module")
def sens(spm_f16: Path, imatrix: Path) -> Sensitivity:
    return measure_sensitivity(spm_f16, imatrix)


def _types(path: Path) -> dict[str, str]:
    return {name: gguf.GGMLQuantizationType(t).name for name, (_, t) in read_header(path).tensors.items()}


@pytest.mark.parametrize("budget", ["Q4_K_M", "5.5bpw", "12.5MB"])
def test_the_file_holds_the_plan_within_the_budget(budget: str, spm_f16: Path, imatrix: Path, sens: Sensitivity,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "mix.gguf"
    rep = quantize_to_budget(spm_f16, out, budget, imatrix, sens=sens, fitted=(None, []))
    got = _types(out)
    assert {n: got[n] for n in rep.plan} == rep.plan
    written = read_header(out).data_bytes
    assert written == rep.bytes <= rep.limit
    # the bytes llama.cpp's own dry run gives for the same overrides
    assert written == tensor_bytes(dry_run(spm_f16, rep.stock, tuple(rep.plan.items())))
    if budget.endswith("bpw"):
        assert written * 8 / sens.n_weights <= 5.5
    if budget.endswith("MB"):
        assert written <= 12.5e6
    if budget == "Q4_K_M":  # the budget is the stock file's tensor bytes
        stock = quantize_gguf(spm_f16, tmp_path / "stock.gguf", QuantizeSettings("Q4_K_M", imatrix))
        assert rep.limit == read_header(stock).data_bytes
    assert json.loads(report_path(out).read_text())["plan"] == rep.plan
    assert read_header(out).kv["quantize.gguf.budget"] == budget


def test_the_sensitivity_is_llama_cpps_own_rounding(spm_f16: Path, imatrix: Path, tmp_path: Path) -> None:
    """ggml's quantize -> dequantize of a tensor gives, bit for bit, the weights of llama.cpp's file."""
    from quantize.imatrix import Imatrix

    means = Imatrix.load(imatrix).means()
    name = "blk.1.ffn_down.weight"
    for qtype in ("Q3_K", "IQ4_XS", "Q5_K"):  # a 3-bit and a 5-bit K-quant, and a non-linear IQ grid
        q = quantize_gguf(spm_f16, tmp_path / f"{qtype}.gguf",
                          QuantizeSettings("Q8_0", imatrix, tensor_types=((name, qtype),)))
        t = next(t for t in open_gguf(q).tensors if t.name == name)
        from_file = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, int(t.shape[0]))
        src = next(t for t in open_gguf(spm_f16).tensors if t.name == name)
        rows = np.asarray(src.data, dtype=np.float32).reshape(-1, int(src.shape[0]))
        assert np.array_equal(ggml.round_trip(rows, qtype, means[name]), from_file), qtype


def test_a_plan_equal_to_the_stock_types_writes_the_stock_tensors(spm_f16: Path, imatrix: Path, tmp_path: Path) -> None:
    stock = quantize_gguf(spm_f16, tmp_path / "stock.gguf", QuantizeSettings("Q4_K_M", imatrix))
    plan = tuple((n, t) for n, t in _types(stock).items() if t not in ("F32", "F16"))
    same = quantize_gguf(spm_f16, tmp_path / "same.gguf", QuantizeSettings("Q4_K_M", imatrix, tensor_types=plan))
    a, b = open_gguf(stock), open_gguf(same)
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.name == tb.name and ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data)


def test_a_budget_below_the_smallest_mix_is_refused_in_one_line(spm_f16: Path, tmp_path: Path) -> None:
    out = tmp_path / "small.gguf"
    res = subprocess.run([sys.executable, "-m", "quantize", "gguf", str(spm_f16), "--budget", "1MB", "-o", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "below the smallest mix" in res.stderr and str(spm_f16) in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "4.2XB"], "is not a size"),
    (["--budget", "Q4_K_M", "--type", "Q6_K"], "leave out --type"),
])
def test_bad_budget_options_are_one_line(args: list[str], message: str, spm_f16: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "quantize", "gguf", str(spm_f16), *args, "-o", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("entry", "message"), [
    ('{ budget = "4.2XB" }', "is not a size"),
    ('{ size = "Q4_K_M" }', "a table entry is { budget"),
    ('{ budget = "Q4_K_M" }, { budget = "q4_k_m" }', "listed twice"),
])
def test_a_bad_budget_in_a_recipe_is_one_line(entry: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f'name = "X"\nbase = "demo:mistral-spm"\n[ladder]\ngguf = ["F16", {entry}]\n')
    with pytest.raises(QuantizeError, match=message) as err:
        load_recipe(path)
    assert err.value.path == path


def test_the_ci_ladder_lists_types_not_budgets() -> None:
    """The workflow's gguf jobs take the plain types; a budget's mix is built where the gate runs."""
    recipe = ROOT / "recipes" / "demo.toml"
    assert load_recipe(recipe).ladder.budgets == ("Q4_K_M",)
    res = subprocess.run([sys.executable, "-m", "quantize", "ladder", str(recipe)], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout) == ["Q6_K", "Q4_K_M"]


def test_a_build_ships_the_stock_type_when_the_mix_loses(demo: Demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A predictor that starves the output matrix (test-only: it weighs the embeddings a million times,
    the output matrix a billionth) makes a mix the gate measures as worse: the release ships the stock type
    at the budget (here a bits-per-weight budget whose stock type the ladder does not list) and says why."""
    import quantize.pipeline as pipeline
    from quantize.pipeline import build_release

    def starving(src, im, sens, text, work):  # type: ignore[no-untyped-def]
        return Predictor(classes={"output": 1e-9, "token_embd": 1e6}), []

    monkeypatch.setattr(pipeline, "fit_predictor", starving)
    recipe = _recipe(tmp_path, demo, ladder="eval_windows = 8\nimatrix_chunks = 8\n")
    recipe.write_text(recipe.read_text().replace('gguf = ["F16", "Q4_K_M"]', 'gguf = ["F16", { budget = "5.5bpw" }]'))
    rel = build_release(recipe, tmp_path / "art", demo_root=DEMO_ROOT)
    manifest = json.loads((rel.root / "manifest.json").read_text())
    (mix,) = manifest["mixes"]
    assert mix["shipped"] == "stock" and mix["mix_kld"] >= mix["stock_kld"] and "is not below" in mix["why"]
    stock = mix["stock"]
    assert [a["kind"] for a in manifest["artifacts"]] == ["F16", stock, "imatrix", "SillyTavern"]
    assert not any("-mix" in p.name for p in rel.root.iterdir())
    assert f"Budget 5.5bpw: {stock} ships, because" in (rel.root / "README.md").read_text()
    assert all(a["verdict"] == "pass" for a in manifest["artifacts"] if a["kind"] not in ("imatrix", "SillyTavern"))
