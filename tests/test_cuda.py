"""The CUDA paths against the CPU: the streamed forward behind the importance matrix, and AWQ
calibration.  Each test skips with ``CUDA_SKIP`` where torch sees no GPU (the one skip CI accepts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ci_skips import CUDA_SKIP

from quantize.imatrix import ImatrixSettings, compute_imatrix
from quantize.models.demo import Demo

torch = pytest.importorskip("torch")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=f"{CUDA_SKIP}: torch sees no GPU")


@needs_gpu
def test_streamed_imatrix_on_the_gpu_matches_the_cpu(demo: Demo) -> None:
    """The same chunks through the streamed forward on each device: every tensor's column sums agree."""
    cpu = compute_imatrix(demo.spm, demo.text["calib"], ImatrixSettings(ctx=256, chunks=8, device="cpu"))
    gpu = compute_imatrix(demo.spm, demo.text["calib"], ImatrixSettings(ctx=256, chunks=8, device="cuda"))
    assert cpu.counts == gpu.counts
    for name, want in cpu.sums.items():
        got = gpu.sums[name]
        cos = float(np.dot(want, got) / (np.linalg.norm(want) * np.linalg.norm(got)))
        assert cos > 0.9999, f"{name}: cosine {cos}"
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-4 * float(want.max()))


@needs_gpu
def test_awq_on_the_gpu_is_as_good_as_on_the_cpu(demo: Demo, tmp_path: Path) -> None:
    """AWQ calibrated on the GPU (float16, AutoAWQ's device) against the same calibration on the CPU
    (float32): the quantized model's mean KL divergence from fp16 on held-out text is within 25 %."""
    pytest.importorskip("quantize.engine.autoawq_compat", reason="AutoAWQ is not installed: pip install --no-deps autoawq==0.2.9")
    from test_awq import compare, fp16_reference, token_windows

    from quantize.awq import AwqSettings, load_awq_as_float, quantize_awq

    out = {dev: quantize_awq(demo.spm, tmp_path / dev, demo.text["calib"], AwqSettings(samples=8, seq_len=128, device=dev))
           for dev in ("cpu", "cuda")}
    ref = fp16_reference(demo.spm)
    scores = compare({dev: load_awq_as_float(path) for dev, path in out.items()}, ref, token_windows(demo.spm, demo.text["eval"]))
    print({dev: s.kld for dev, s in scores.items()})
    assert scores["cuda"].kld <= 1.25 * scores["cpu"].kld
