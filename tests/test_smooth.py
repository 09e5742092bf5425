"""Outlier smoothing of a float GGUF: an exact reparametrisation, checked tensor by tensor and by
running the smoothed and the original F16 in llama.cpp."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MakeTemp, load_llama

from quantize.formats.gguf_read import open_gguf
from quantize.imatrix import Imatrix, ImatrixSettings, compute_imatrix
from quantize.models.demo import Demo
from quantize.smooth import SmoothPlan, smooth_gguf


@pytest.fixture(scope="module")
def smoothed(demo: Demo, spm_f16: Path, module_mktemp: MakeTemp) -> tuple[Path, Path, Path, SmoothPlan]:
    tmp = module_mktemp("smooth")
    im = compute_imatrix(demo.spm, demo.text["calib"], ImatrixSettings(ctx=256, chunks=8)).save(tmp / "im.gguf")
    out, out_im = tmp / "smoothed.F16.gguf", tmp / "smoothed.imatrix.gguf"
    res = subprocess.run([sys.executable, "-m", "quantize", "smooth", str(spm_f16), "--imatrix", str(im), "-o", str(out),
                          "--imatrix-out", str(out_im)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    plan = smooth_gguf(spm_f16, im, tmp / "again.gguf", tmp / "again.imatrix.gguf")
    assert (tmp / "again.gguf").read_bytes() == out.read_bytes()  # the CLI and the function write the same file
    return im, out, out_im, plan


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in open_gguf(path).tensors}


def test_rescaled_tensors_are_exact(spm_f16: Path, smoothed: tuple[Path, Path, Path, SmoothPlan]) -> None:
    """Norm weights are divided by power-of-two scales and their readers' columns multiplied by
    them.  A power of two only shifts the exponent, so every value is the original times its scale
    exactly, except where a product falls below float16's smallest normal (2^-14) and loses bits
    as a subnormal: there it is the product rounded to float16 (on the demo, 120 of 10.2M values)."""
    im, out, out_im, plan = smoothed
    orig, new = _tensors(spm_f16), _tensors(out)
    assert list(orig) == list(new)
    readers = {r: n for n, rs in plan.readers.items() for r in rs}
    assert len(plan.scales) == 4 * 2 + 1  # attn_norm and ffn_norm of 4 blocks, output_norm
    assert any(not np.all(s == 1) for s in plan.scales.values())  # something moved
    inexact = total = 0
    for name, o in orig.items():
        n = new[name]
        assert n.dtype == o.dtype and n.shape == o.shape
        if name in plan.scales:
            s = plan.scales[name]
            assert np.all(np.exp2(np.rint(np.log2(s))) == s)  # powers of two
            assert np.array_equal(n.astype(np.float32) * s, o.astype(np.float32)), name
        elif name in readers:
            exact = o.astype(np.float32) * plan.scales[readers[name]][None, :]
            assert np.array_equal(n, exact.astype(np.float16)), name
            normal = np.abs(exact) >= np.finfo(np.float16).smallest_normal
            assert np.array_equal(n.astype(np.float32)[normal], exact[normal]), name
            inexact += int((n.astype(np.float32) != exact).sum())
            total += n.size
        else:
            assert np.array_equal(n, o), name
    print(f"rescaled matrix values not exact (float16 subnormals): {inexact} of {total}")
    assert inexact <= 1e-4 * total
    a, b = Imatrix.load(im), Imatrix.load(out_im)
    for name, sums in a.sums.items():
        s = plan.scales[readers[name]] if name in readers else np.ones_like(sums)
        assert np.array_equal(b.sums[name], sums / s**2), name  # a power of two: exact
        assert b.counts[name] == a.counts[name]


def test_smoothed_f16_computes_the_same_function(spm_f16: Path, smoothed: tuple[Path, Path, Path, SmoothPlan]) -> None:
    """llama.cpp's logits of the smoothed F16 equal the original's: the scales are powers of two, so
    activations and weights round to float16 exactly as before, only shifted in exponent.  What is
    left is float32 rounding inside llama.cpp's kernels (about 5e-7 on logits spanning ~20)."""
    _, out, _, _ = smoothed
    tokens = load_llama(spm_f16).tokenize(b"To be, or not to be, that is the question:")
    logits = []
    for path in (spm_f16, out):
        llm = load_llama(path, n_ctx=64, logits_all=True)
        llm.eval(tokens)
        logits.append(np.array(llm.scores[: len(tokens)], dtype=np.float32))
    diff = np.abs(logits[0] - logits[1]).max()
    print(f"max abs logit difference smoothed vs original F16: {diff} (logit range {np.ptp(logits[0]):.1f})")
    assert diff <= 1e-4


def test_no_known_group_is_refused_not_skipped(spm_f16: Path, smoothed: tuple[Path, Path, Path, SmoothPlan],
                                               tmp_path: Path) -> None:
    """A model whose block matrices smoothing cannot pair with its norms (here: an importance matrix
    with only the output matrix, as for a family whose tensor names differ) is refused by name; no copy
    marked smoothed is written."""
    im = Imatrix.load(smoothed[0])
    only_output = Imatrix({k: v for k, v in im.sums.items() if not k.startswith("blk.")},
                          {k: v for k, v in im.counts.items() if not k.startswith("blk.")}, im.datasets, im.chunk_count,
                          im.chunk_size).save(tmp_path / "head-only.imatrix.gguf")
    res = subprocess.run([sys.executable, "-m", "quantize", "smooth", str(spm_f16), "--imatrix", str(only_output),
                          "-o", str(tmp_path / "s.gguf"), "--imatrix-out", str(tmp_path / "s.imatrix.gguf")],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"quantize: {spm_f16}: smoothing found no decoder-block norm group"), res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head-only.imatrix.gguf"]
