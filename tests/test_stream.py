"""The streamed torch stages (one decoder block resident at a time) against the whole model in transformers.

The oracle in each test is what these stages computed before they streamed: the HF model loaded
whole in float32, hooks on its linears (importance matrix) or its logits window by window (the
gate's reference).  On the demo model and on the real Gemma 3 270M (262k vocabulary, sliding and
global attention layers, tied embeddings, final norm offsets).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantize.engine.stream import StreamedModel, StreamSettings
from quantize.errors import QuantizeError
from quantize.evaluate import EvalSettings, log_softmax, reference_logprobs, reference_rows
from quantize.imatrix import ImatrixSettings, compute_imatrix, gguf_matrix_names
from quantize.models.demo import Demo
from quantize.text import token_windows, with_bos

torch = pytest.importorskip("torch")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

CHUNKS, CTX = 4, 512


@pytest.fixture(params=["demo", "gemma3"])
def model_dir(request: pytest.FixtureRequest, demo: Demo) -> Path:
    return demo.spm if request.param == "demo" else request.getfixturevalue("gemma3")


def whole_model(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def windows(path: Path, text: Path, n: int) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(text.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
    return token_windows(with_bos(ids, tok.bos_token_id), CTX, n, tok.bos_token_id, text, "window")


def whole_model_imatrix(path: Path, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Sums of squared linear inputs with hooks on the whole float32 model, chunk by chunk (the stage before streaming)."""
    model = whole_model(path)
    names = gguf_matrix_names(model)
    sums: dict[str, Any] = {}

    def collect(g: str, x: Any) -> None:
        x = x.reshape(-1, x.shape[-1])
        sums[g] = sums.get(g, 0) + (x * x).sum(0)

    hooks = [m.register_forward_hook(lambda _m, i, _o, g=names[n]: collect(g, i[0])) for n, m in model.named_modules() if n in names]
    with torch.no_grad():
        for chunk in tokens:
            model(torch.tensor(chunk[None]))
    for h in hooks:
        h.remove()
    return {k: v.numpy() for k, v in sums.items()}


def test_streamed_imatrix_equals_the_whole_models(model_dir: Path, demo: Demo) -> None:
    im = compute_imatrix(model_dir, demo.text["calib"], ImatrixSettings(CTX, CHUNKS, batch_tokens=2 * CTX))
    want = whole_model_imatrix(model_dir, windows(model_dir, demo.text["calib"], CHUNKS))
    assert set(im.sums) == set(want) and set(im.counts.values()) == {CHUNKS * CTX}
    worst = max(float(np.abs(im.sums[k] - v).max() / np.abs(v).max()) for k, v in want.items())
    print(f"\n{model_dir.name}: {len(want)} matrices, worst relative difference {worst:.2e}")
    assert worst < 1e-5  # float32 sums of 2048 squares, accumulated in another order


def test_streamed_reference_equals_the_whole_models_within_the_cache_rounding(model_dir: Path, demo: Demo, tmp_path: Path) -> None:
    es = EvalSettings(CTX, CHUNKS, batch_tokens=2 * CTX)
    ref = reference_logprobs(model_dir, demo.text["eval"], es, tmp_path / "cache")
    model = whole_model(model_dir)
    rows = ref.windows.rows
    worst_nll, worst_w = 0.0, 0.0
    with torch.no_grad():
        for w, chunk in enumerate(ref.windows.tokens):
            logp = log_softmax(model(torch.tensor(chunk[None])).logits[0, rows].numpy())
            want, stored = reference_rows(logp), ref.window(w)
            worst_w = max(worst_w, float(np.abs(want[0] - stored[0]).max()))
            nll = -logp[np.arange(len(logp)), chunk[rows.start + 1 : rows.stop + 1]]
            worst_nll = max(worst_nll, float(np.abs(nll - ref.nll[w]).max()))
            assert np.allclose(want[1], stored[1], atol=1e-4) and (want[3] == stored[3]).all()
    print(f"\n{model_dir.name}: worst |Δ nll| {worst_nll:.2e}, worst |Δ relative probability| {worst_w:.2e}")
    assert worst_nll < 1e-3 and worst_w < 1e-3


def test_only_one_block_is_resident_at_a_time(demo: Demo) -> None:
    model = StreamedModel(demo.spm, settings=StreamSettings(batch_tokens=CTX))
    seen = []

    @contextlib.contextmanager
    def check(i: int, block: Any) -> Iterator[None]:
        resident = [name for name, p in model.sk.model.named_parameters() if p.device.type != "meta"]
        seen.append(i)
        assert resident and all(n.startswith(f"model.layers.{i}.") for n in resident), resident[:3]
        yield

    acts = model.forward(windows(demo.spm, demo.text["calib"], 2), check)
    acts.close()
    assert seen == list(range(len(model.sk.layers)))
    assert all(p.device.type == "meta" for p in model.sk.model.parameters())


def test_spilled_activations_give_the_same_logits_within_float16(demo: Demo) -> None:
    model = StreamedModel(demo.spm, settings=StreamSettings(batch_tokens=CTX))
    tokens = windows(demo.spm, demo.text["eval"], 2)
    in_ram = list(model.logits(tokens, slice(256, 511)))
    spilled = list(model.logits(tokens, slice(256, 511), spill=True))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(in_ram, spilled, strict=True))
    scale = max(float(np.abs(a).max()) for a in in_ram)
    print(f"\nspilled to float16: max |Δ logit| {diff:.4f} of {scale:.1f}")
    assert 0 < diff < 0.02 * scale  # float16 hidden states between blocks: close, not identical


def sparse_checkpoint(out: Path, tokenizer_from: Path, hidden: int, ff: int) -> Path:
    """A one-block Mistral whose safetensors declare full-size fp16 tensors in a sparse file: headers and sizes
    are real (the preflight reads only those), no weight byte is ever written."""
    import json
    import shutil
    import struct

    heads, kv, vocab = hidden // 128, 8, 32002
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "model.layers.0.input_layernorm.weight": (hidden,), "model.layers.0.post_attention_layernorm.weight": (hidden,),
              "model.layers.0.self_attn.q_proj.weight": (hidden, hidden), "model.layers.0.self_attn.o_proj.weight": (hidden, hidden),
              "model.layers.0.self_attn.k_proj.weight": (kv * 128, hidden), "model.layers.0.self_attn.v_proj.weight": (kv * 128, hidden),
              "model.layers.0.mlp.gate_proj.weight": (ff, hidden), "model.layers.0.mlp.up_proj.weight": (ff, hidden),
              "model.layers.0.mlp.down_proj.weight": (hidden, ff)}
    header, at = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header).encode()
    out.mkdir()
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + at)
    config = json.loads((tokenizer_from / "config.json").read_text())
    config |= {"hidden_size": hidden, "intermediate_size": ff, "num_attention_heads": heads, "num_key_value_heads": kv,
               "head_dim": 128, "num_hidden_layers": 1, "vocab_size": vocab}
    (out / "config.json").write_text(json.dumps(config))
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("stage", ["imatrix", "reference"])
def test_a_block_that_cannot_fit_is_refused_naming_the_figure(stage: str, demo: Demo, tmp_path: Path) -> None:
    import psutil

    hidden, ff = 16384, 131072  # one block: 6.7 G parameters, 27 GB in float32
    assert 3 * hidden * ff * 4 > psutil.virtual_memory().total
    model = sparse_checkpoint(tmp_path / "huge", demo.spm, hidden, ff)
    with pytest.raises(QuantizeError) as err:
        if stage == "imatrix":
            compute_imatrix(model, demo.text["calib"], ImatrixSettings(CTX, 1))
        else:
            reference_logprobs(model, demo.text["eval"], EvalSettings(CTX, 1), tmp_path / "cache")
    msg = str(err.value)
    print(f"\n{msg}")
    assert msg.startswith(f"{model}: ") and "GiB of RAM even one block at a time" in msg and "largest block" in msg
    assert "\n" not in msg and not [p for p in tmp_path.glob("cache/**/*") if p.is_file()]  # nothing half-written
