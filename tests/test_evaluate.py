"""The quality gate: one method for every format, a cached 16-bit reference, and a gate that
fails a damaged artifact by name."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantize.errors import QuantizeError
from quantize.evaluate import (
    EvalSettings,
    evaluate,
    log_softmax,
    reference_logprobs,
    reference_rows,
    window_metrics,
    write_report,
)
from quantize.formats.gguf_read import open_gguf
from quantize.models.demo import Demo

EVAL = EvalSettings(ctx=512, chunks=16)


def test_ladder_report(ladder) -> None:  # type: ignore[no-untyped-def]
    import json

    data = json.loads(ladder.report["json"].read_text())
    res = {r["kind"]: r for r in data["results"]}
    assert data["passed"] and not ladder.failures
    assert abs(res["F16"]["ppl_ratio"] - 1) < 1e-3 and res["F16"]["mean_kld"] < 1e-4
    assert res["F16"]["top1_agreement"] > 0.995
    assert res["Q6_K"]["mean_kld"] < res["Q4_K_M"]["mean_kld"]
    assert data["text_sha256"] and data["n_text_tokens"] > 10_000 and data["scored_tokens"] == 16 * 255
    for r in data["results"]:
        assert r["kld_p99"] <= r["kld_p999"] <= r["kld_max"] and r["ppl_stderr"] > 0
    md = ladder.report["md"].read_text()
    assert "| Demo-Mistral-ChatML.Q4_K_M.gguf | Q4_K_M |" in md
    assert ladder.report["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_f16_perplexity_equals_reference_computed_independently(demo: Demo, ladder) -> None:  # type: ignore[no-untyped-def]
    """The gate's reference perplexity, recomputed here straight from HF logits (no cache)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.spm)
    model = AutoModelForCausalLM.from_pretrained(demo.spm, dtype=torch.float32)
    ids = tok(demo.text["eval"].read_text(), add_special_tokens=False)["input_ids"]
    nll = []
    for w in range(16):
        win = [tok.bos_token_id, *ids[w * 512 : (w + 1) * 512 - 1]]  # llama-perplexity's cut of [BOS, *ids]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([win])).logits[0], -1)
        nll += [-float(lp[j, win[j + 1]]) for j in range(256, 511)]
    ppl = math.exp(sum(nll) / len(nll))
    data = json.loads(ladder.report["json"].read_text())
    assert abs(data["reference_ppl"] / ppl - 1) < 1e-4
    f16 = next(r for r in data["results"] if r["kind"] == "F16")
    assert abs(f16["ppl"] / ppl - 1) < 1e-3


@pytest.fixture(params=["compiled", "torch"])
def row_sums_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The gate's row sums by the compiled kernel (which must build on this machine) or by torch."""
    import quantize.gate_kernel as gk

    if request.param == "compiled":
        assert gk.kernel() is not None, "the gate kernel did not compile; run with -v to see the compiler's error"
    else:
        monkeypatch.setattr(gk, "row_sums", lambda x, w, threads=0: None)
    return str(request.param)


def test_stored_reference_scores_its_own_logits_exactly(row_sums_by: str) -> None:
    """The gate's own scoring (window_metrics, from the stored relative probabilities and per-row
    terms) of the exact logits against their stored distribution: KL divergence zero within 1e-6,
    same top token, the target's log-likelihood exact; a real difference is seen, and matches the
    KL divergence computed directly in float64.  By the compiled kernel and by torch."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 32002)) * 3).astype(np.float32)
    logits[:, :10] += 12  # peaked distributions like a trained LM's
    exact = log_softmax(logits)
    targets = rng.integers(0, 32002, 64)
    nll, kld, top = window_metrics(logits, reference_rows(exact), targets)
    assert np.abs(kld).max() < 1e-6 and top.all()
    assert np.allclose(nll, -exact[np.arange(64), targets], atol=1e-5)
    shifted = logits.copy()
    shifted[:, 0] += 1.0
    shifted[:32, 10] += 3.0  # the top token changes in half the rows
    nll, kld, top = window_metrics(shifted, reference_rows(exact), targets)
    def log_softmax64(z: np.ndarray) -> np.ndarray:
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax64(logits), log_softmax64(shifted)
    direct = (np.exp(lp) * (lp - lq)).sum(-1)
    assert direct.mean() > 1e-3 and np.allclose(kld, direct, rtol=1e-4, atol=1e-6)
    assert np.allclose(nll, -lq[np.arange(64), targets], atol=1e-5)
    assert (top == (exact.argmax(-1) == shifted.argmax(-1))).all() and not top.all()


def test_a_broken_artifact_scores_nan_or_infinite(row_sums_by: str) -> None:
    """NaN logits give a NaN KL divergence and an infinite logit an infinite or NaN one, so the
    gate's "not <=" fails the artifact; finite rows beside them are unaffected."""
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((4, 4096)) * 3).astype(np.float32)
    ref = reference_rows(log_softmax(logits))
    _, clean, _ = window_metrics(logits, ref, np.zeros(4, np.int64))
    broken = logits.copy()
    broken[0, 7], broken[1, 9], broken[2, 11] = np.nan, np.inf, -np.inf
    _, kld, _ = window_metrics(broken, ref, np.zeros(4, np.int64))
    assert np.isnan(kld[0]) and not kld[1] <= 1 and not kld[2] <= 1
    assert kld[3] == pytest.approx(clean[3], abs=1e-7)


def test_compiled_and_torch_row_sums_agree_at_a_262k_vocabulary() -> None:
    from quantize.evaluate import row_sums_torch
    from quantize.gate_kernel import row_sums

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, 262144)) * 4).astype(np.float32)
    x[:, :20] += 15
    w = reference_rows(log_softmax(x + rng.standard_normal(x.shape).astype(np.float32)))[0]
    compiled = row_sums(x, w)
    assert compiled is not None, "the gate kernel did not compile"
    m, sum2, dot = compiled
    tm, tsum2, tdot = row_sums_torch(x, w)
    assert np.array_equal(m, tm) and np.allclose(sum2, tsum2, rtol=1e-6) and np.allclose(dot, tdot, rtol=1e-6)
    # both round b = (x - max) log2 e to float32 (|b| up to ~60 here: ~2e-6 relative in 2^b)
    b = (x.astype(np.float64) - x.max(-1, keepdims=True)) * math.log2(math.e)
    assert np.allclose(sum2, np.exp2(b).sum(-1), rtol=3e-6) and np.allclose(dot, (w * b).sum(-1), rtol=3e-6)


def test_without_a_compiler_the_gate_sums_with_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A compiler that fails leaves nothing in the cache and the gate on torch, saying so once."""
    import quantize.gate_kernel as gk

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    gk.kernel.cache_clear()
    try:
        rng = np.random.default_rng(3)
        logits = (rng.standard_normal((8, 1000)) * 3).astype(np.float32)
        _, kld, top = window_metrics(logits, reference_rows(log_softmax(logits)), np.zeros(8, np.int64))
        assert np.abs(kld).max() < 1e-6 and top.all()
        assert gk.kernel() is None and "sums its rows with torch" in caplog.text
        assert not list((tmp_path / "quantize" / "gate-kernel").glob("*"))
    finally:
        gk.kernel.cache_clear()


@pytest.mark.parametrize("which", ["spm", "bpe", "qwen3", "tekken", "gemma3"])
def test_text_tokenizes_as_transformers_tokenizes_it(which: str, demo: Demo, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    """hf_tokenizer (the tokenizers library on tokenizer.json, BOS from the tokenizer config) gives the
    ids and BOS transformers' AutoTokenizer gives, on text with markup, special-token lookalikes,
    accents, CJK and emoji."""
    from families import qwen_tokenizer, tekken_tokenizer
    from transformers import AutoTokenizer

    from quantize.text import hf_tokenizer

    folder = {"spm": lambda: demo.spm, "bpe": lambda: demo.bpe, "qwen3": qwen_tokenizer,
              "tekken": lambda: tekken_tokenizer(tmp_path / "tekken"), "gemma3": lambda: request.getfixturevalue("gemma3")}[which]()
    text = demo.text["eval"].read_text()[:20000] + "\n<s> </s> <|im_start|>user\n  caf\u00e9 \u6f22\u5b57 \U0001f600\t\tend"
    ours = hf_tokenizer(folder)
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert ours.encode(text) == hf(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert ours.bos == hf.bos_token_id


def test_reference_is_cached(demo: Demo, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ref = reference_logprobs(demo.spm, demo.text["eval"], EvalSettings(ctx=256, chunks=4), cache)
    files = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in ref.root.iterdir()}
    again = reference_logprobs(demo.spm, demo.text["eval"], EvalSettings(ctx=256, chunks=4), cache)
    assert again.root == ref.root and list(cache.iterdir()) == [ref.root]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in again.root.iterdir()} == files
    # A different window size is a different reference.
    other = reference_logprobs(demo.spm, demo.text["eval"], EvalSettings(ctx=128, chunks=4), cache)
    assert other.root != ref.root


def _scramble(src: Path, dst: Path, tensors: tuple[str, ...]) -> Path:
    """Copy a Q4_K_M GGUF and shuffle the quants inside every Q4_K block of some tensors, keeping
    each block's fp16 scales: the file still loads and computes finite, but wrong, numbers."""
    shutil.copyfile(src, dst)
    rng = np.random.default_rng(0)
    block = 144  # bytes per Q4_K block of 256 weights: d, dmin (2 x fp16), 12 scale bytes, 128 quant bytes
    with open(dst, "r+b") as f:
        for t in open_gguf(src).tensors:
            if t.name not in tensors:
                continue
            assert t.tensor_type.name == "Q4_K", t.name
            f.seek(int(t.data_offset))
            raw = np.frombuffer(f.read(int(t.n_bytes)), dtype=np.uint8).reshape(-1, block).copy()
            raw[:, 16:] = rng.permuted(raw[:, 16:], axis=1)
            f.seek(int(t.data_offset))
            f.write(raw.tobytes())
    return dst


DAMAGED = tuple(f"blk.{i}.{m}.weight" for i in range(4) for m in ("ffn_up", "ffn_gate", "attn_q"))


def test_gate_fails_a_damaged_artifact_and_names_it(demo: Demo, ladder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad = _scramble(ladder.quants["Q4_K_M"], tmp_path / "Damaged.Q4_K_M.gguf", DAMAGED)
    rep = evaluate(demo.spm, demo.text["eval"], [ladder.quants["Q6_K"], bad], EVAL, tmp_path / "cache")
    print(rep.to_markdown())
    good, broken = rep.results
    assert good.passed and not broken.passed
    assert rep.failures and all(f.startswith("Damaged.Q4_K_M.gguf: ") for f in rep.failures)
    assert any("mean KLD" in f and "limit 0.06" in f for f in rep.failures)
    paths = write_report(rep, tmp_path / "report")
    assert "**FAIL**" in paths["md"].read_text()


def test_cli_gate_exit_code(demo: Demo, ladder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    bad = _scramble(ladder.quants["Q4_K_M"], tmp_path / "Damaged.Q4_K_M.gguf", DAMAGED)
    res = subprocess.run([sys.executable, "-m", "quantize", "eval", "--reference", str(demo.spm), "--text", str(demo.text["eval"]),
                          "--ctx", "256", "--chunks", "4", "--out-dir", str(tmp_path / "r"), "--cache", str(tmp_path / "c"),
                          str(ladder.f16), str(bad)], capture_output=True, text=True)
    assert res.returncode == 3, res.stderr[-3000:]
    assert "quality gate failed: Damaged.Q4_K_M.gguf" in res.stderr
    assert (tmp_path / "r" / "eval.json").is_file()


# --- bad input --------------------------------------------------------------------------


def test_text_shorter_than_one_window(demo: Demo, ladder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    with pytest.raises(QuantizeError, match="fewer than one evaluation window") as e:
        evaluate(demo.spm, short, [ladder.f16], EVAL, tmp_path / "cache")
    assert str(short) in str(e.value)


def test_text_not_utf8(demo: Demo, ladder, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Ophélie, naïve, ".encode("latin-1") * 400)
    with pytest.raises(QuantizeError, match="not UTF-8") as e:
        evaluate(demo.spm, latin1, [ladder.f16], EVAL, tmp_path / "cache")
    assert str(latin1) in str(e.value)


def test_artifact_of_another_vocabulary(demo: Demo, bpe_f16: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="vocabulary of 8192 tokens differs") as e:
        evaluate(demo.spm, demo.text["eval"], [bpe_f16], EvalSettings(ctx=256, chunks=2), tmp_path / "cache")
    assert str(bpe_f16) in str(e.value)
