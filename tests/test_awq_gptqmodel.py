"""The AWQ folder where AWQ is served in 2026: transformers 5 loads AWQ checkpoints through GPTQModel
(``transformers/quantizers/quantizer_awq.py`` requires ``gptqmodel``, whose CPU kernel is
``gptqmodel/nn_modules/qlinear/torch_aten_kernel_awq.py``: ``TorchAtenAwqLinear``).

The demo AWQ folder is loaded by ``AutoModelForCausalLM.from_pretrained`` in a venv of its own
(torch 2.13 CPU, transformers 5.23, gptqmodel; built by ``nox -s tests``, since GPTQModel's
dependencies must not replace the project's), and compared with the project's loader
(``quantize.awq.load_awq_as_float``): every quantized matrix as GPTQModel's module dequantizes it,
and the logits on held-out text.  GPTQModel's CPU forward runs in bfloat16
(``_weight_int4pack_mm_for_cpu``), so logits agree to bfloat16's precision, not bit for bit.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MakeTemp, side_tool

from quantize.awq import AwqSettings, load_awq_as_float, quantize_awq
from quantize.models.demo import Demo

GPTQMODEL_SIDE = r'''
import sys, torch
from transformers import AutoModelForCausalLM
folder, ids_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
weights, kernels = {}, set()
for name, module in model.named_modules():
    if hasattr(module, "awq_weight_dequantize"):  # before the first forward repacks it for the CPU kernel
        weights[name] = module.awq_weight_dequantize(device="cpu", dtype=torch.float32).t().contiguous()
        kernels.add(type(module).__name__)
with torch.no_grad():
    logits = torch.stack([model(input_ids=x[None]).logits[0].float() for x in torch.load(ids_file)])
torch.save({"weights": weights, "kernels": sorted(kernels), "logits": logits}, out_file)
'''


@pytest.fixture(scope="module")
def gptqmodel_python() -> Path:
    return side_tool("QUANTIZE_GPTQMODEL_PYTHON", "_gptqmodel", "python", "the GPTQModel venv")


@pytest.fixture(scope="module")
def served(demo: Demo, gptqmodel_python: Path, module_mktemp: MakeTemp) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tmp = module_mktemp("gptqmodel")
    folder = quantize_awq(demo.spm, tmp / "mistral-spm-awq", demo.text["calib"], AwqSettings(samples=4, seq_len=128))
    tok = AutoTokenizer.from_pretrained(demo.spm)
    ids = tok(demo.text["eval"].read_text(encoding="utf-8")[:20000], add_special_tokens=False)["input_ids"]
    windows = torch.tensor([tok.bos_token_id, *ids[: 4 * 128 - 1]]).view(4, 128)
    torch.save(windows, tmp / "ids.pt")
    out = subprocess.run([str(gptqmodel_python), "-c", GPTQMODEL_SIDE, str(folder), str(tmp / "ids.pt"), str(tmp / "out.pt")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    return {"folder": folder, "windows": windows, **torch.load(tmp / "out.pt")}


def test_gptqmodel_dequantizes_every_matrix_as_our_loader(served: dict[str, Any]) -> None:
    """Same integers, zero points, scales, packing order and group layout: the matrices agree exactly."""
    ours = load_awq_as_float(served["folder"]).state_dict()
    assert served["kernels"] == ["TorchAtenAwqLinear"]
    names = sorted(served["weights"])
    assert len(names) == 4 * 7  # q, k, v, o, gate, up, down in each of the demo's 4 layers
    for name in names:
        assert torch.equal(served["weights"][name], ours[f"{name}.weight"]), name


def test_gptqmodel_logits_match_our_loader_to_bfloat16_precision(served: dict[str, Any]) -> None:
    model = load_awq_as_float(served["folder"])
    with torch.no_grad():
        ours = torch.stack([model(input_ids=x[None]).logits[0].float() for x in served["windows"]])
    theirs = served["logits"]
    lp, lq = ours.log_softmax(-1), theirs.log_softmax(-1)
    kld = float((lp.exp() * (lp - lq)).sum(-1).mean())
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    print(f"\nGPTQModel vs load_awq_as_float: mean KLD {kld:.2e}, top-1 agreement {top1:.4f}")
    assert kld < 1e-4 and top1 > 0.99
