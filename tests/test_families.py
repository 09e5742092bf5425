"""Every family row beyond Llama/Mistral/Gemma 3, on a tiny random-weight checkpoint built from the
family's own transformers config class (tests/families.py): converted tensors byte-identical to
llama.cpp's converter and its metadata a subset of ours with equal values, logits equal to HF
float32's, tokenization equal to the model's own tokenizer, a Q4_K_M that passes the gate, and the
steps a family cannot take refused by name."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MakeTemp, load_llama
from families import QWEN_VOCAB, TEKKEN_VOCAB, build_family, qwen_tokenizer, tekken_tokenizer
from test_convert import BATTERY

from quantize.convert import convert
from quantize.evaluate import EvalSettings, evaluate
from quantize.formats.gguf_read import open_gguf
from quantize.gguf_quant import QuantizeSettings, quantize_gguf
from quantize.models.demo import Demo

# (HF class, tokenizer): Qwen rows get Qwen's published tokenizer, Mistral-Nemo's shape gets Tekken,
# the others the demo's SentencePiece tokenizer (which llama.cpp's converter reads for them too).
CASES = [
    ("Qwen2ForCausalLM", "qwen"),
    ("Qwen3ForCausalLM", "qwen"),
    ("Qwen3MoeForCausalLM", "qwen"),
    ("Phi3ForCausalLM", "spm"),
    ("Gemma2ForCausalLM", "spm"),
    ("MixtralForCausalLM", "spm"),
    ("MistralForCausalLM", "tekken"),
]
IDS = [f"{a}-{t}" for a, t in CASES]
N_SPM = 32000  # the demo SentencePiece model's own pieces; ChatML's two tokens are added on top


@pytest.fixture(scope="module")
def tokenizers(demo: Demo, module_mktemp: MakeTemp) -> dict[str, tuple[Path, dict[str, int] | None]]:
    return {"spm": (demo.spm, None), "qwen": (qwen_tokenizer(), QWEN_VOCAB),
            "tekken": (tekken_tokenizer(module_mktemp("tekken")), TEKKEN_VOCAB)}


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def family(request: pytest.FixtureRequest, tokenizers: dict[str, tuple[Path, dict[str, int] | None]],
           module_mktemp: MakeTemp) -> tuple[str, str, Path, Path]:
    """(HF class, tokenizer, checkpoint folder, our F16 GGUF)."""
    arch, tok = request.param
    root = module_mktemp(arch)
    tok_dir, vocab = tokenizers[tok]
    # not named after the family: llama.cpp gives a model *named* phi3 Phi-3's own special tokens
    model = build_family(arch, tok_dir, root / "tiny", vocab=vocab)
    return arch, tok, model, convert(model, root / f"{arch}.F16.gguf").path


def _metadata(path: Path) -> dict[str, Any]:
    r = open_gguf(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith(("GGUF.", "quantize."))}


# What may differ from llama.cpp's converter, and why (anything else must be equal):
#  spm:    it drops the ChatML tokens transformers 5 records only in tokenizer.json (see test_convert);
#          for Phi-3 it also marks <unk>, <s>, </s> control tokens scored -1000 (from tokenizer.json's added
#          tokens) where SentencePiece's own entries, which its Llama path writes too, are kept here;
#  Gemma2: it always writes add_space_prefix=false (Gemma's tokenizer has no dummy prefix; the demo's has);
#  tekken: it names the pre-tokenizer by a hash of its output ("pixtral" for this tokenizer.json), we by
#          the regex the file declares ("tekken"); llama.cpp runs both the same (test below).
def _allowed(arch: str, tok: str, key: str, ref: Any, ours: Any) -> bool:
    if tok == "spm" and key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        start = 3 if arch == "Phi3ForCausalLM" and key != "tokenizer.ggml.tokens" else 0
        return bool(ref[start:N_SPM] == ours[start:N_SPM])
    if tok == "tekken" and key == "tokenizer.ggml.pre":
        return (ref, ours) == ("pixtral", "tekken")
    return arch == "Gemma2ForCausalLM" and key == "tokenizer.ggml.add_space_prefix" and (ref, ours) == (False, None)


@pytest.mark.reference
def test_matches_reference_converter(family: tuple[str, str, Path, Path], reference_converter: Path, tmp_path: Path) -> None:
    arch, tok, model, ours_path = family
    ref_path = tmp_path / "reference.gguf"
    subprocess.run([str(reference_converter), str(model), "--outfile", str(ref_path), "--outtype", "f16"],
                   check=True, capture_output=True)
    ref = {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in open_gguf(ref_path).tensors}
    ours = {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in open_gguf(ours_path).tensors}
    assert set(ref) == set(ours)
    assert [n for n in ref if ref[n] != ours[n]] == []
    ref_meta, our_meta = _metadata(ref_path), _metadata(ours_path)
    differ = {k for k in ref_meta if ref_meta[k] != our_meta.get(k)}
    assert {k for k in differ if not _allowed(arch, tok, k, ref_meta[k], our_meta.get(k))} == set()


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    # eager attention: the only transformers path that applies Gemma 2's attention soft-capping
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _ids(model: Path, demo: Demo, n: int = 160) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(demo.text["eval"].read_text()[:3000], add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id if tok.bos_token_id is not None else ids[0], *ids][:n]


def _ppl(logits: np.ndarray, ids: list[int]) -> float:
    lp = logits[:-1] - np.logaddexp.reduce(logits[:-1].astype(np.float64), axis=-1, keepdims=True)
    return math.exp(-float(np.mean(lp[np.arange(len(ids) - 1), ids[1:]])))


def test_logits_match_hf(family: tuple[str, str, Path, Path], demo: Demo) -> None:
    arch, _, model, path = family
    ids = _ids(model, demo)
    ref = _hf_logits(model, ids)
    llm = load_llama(path, n_ctx=len(ids), logits_all=True)
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)], dtype=np.float32)
    err, scale = np.abs(ref - ours), float(np.abs(ref).max())
    print(f"{arch}: max |Δlogit| {err.max():.4f} (range {scale:.1f}); ppl HF {_ppl(ref, ids):.3f} GGUF {_ppl(ours, ids):.3f}")
    assert err.max() < 0.02 * scale
    assert np.mean(np.argmax(ref, -1) == np.argmax(ours, -1)) > 0.98
    assert abs(_ppl(ours, ids) / _ppl(ref, ids) - 1) < 2e-3


EXTRA = ["MixedCase WORDS camelCase HTTPServer iPhone", "path/to/file\n/root", "ÀÉÎ õü ǅungla", "x²+y³ ⅓ ①②",
         "a'b O'Neil don't I'M 'S", "tabs\t\tand\r\n crlf", "digits 1234567890"]


@pytest.mark.parametrize("which", ["qwen", "tekken"])
def test_tokenization_matches_the_models_tokenizer(which: str, tokenizers: dict[str, tuple[Path, dict[str, int] | None]],
                                                   tmp_path: Path) -> None:
    """The BPE pre-tokenizers of real families (Qwen's published tokenizer, Mistral's Tekken), as
    llama.cpp runs them from our GGUF, split text exactly as the model's own tokenizer does."""
    from transformers import AutoTokenizer

    tok_dir, vocab = tokenizers[which]
    arch = "Qwen2ForCausalLM" if which == "qwen" else "MistralForCausalLM"
    model = build_family(arch, tok_dir, tmp_path / arch, vocab=vocab)
    path = convert(model, tmp_path / "m.gguf").path
    assert _metadata(path)["tokenizer.ggml.pre"] == {"qwen": "qwen2", "tekken": "tekken"}[which]
    hf = AutoTokenizer.from_pretrained(model)
    llm = load_llama(path)
    texts = [*BATTERY, *EXTRA]
    if which == "qwen":
        texts.append(hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True))
    bad = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=True) != hf(t, add_special_tokens=False)["input_ids"]]
    assert bad == []


def test_q4_k_m_passes_the_gate(family: tuple[str, str, Path, Path], demo: Demo, tmp_path: Path) -> None:
    """The gate as a build runs it: HF's own model (float32, one block at a time, experts stacked from
    the checkpoint's per-expert tensors) is the reference; the F16 matches it and the Q4_K_M passes."""
    arch, _, model, f16 = family
    q4 = quantize_gguf(f16, tmp_path / "m.Q4_K_M.gguf", QuantizeSettings("Q4_K_M"))
    assert open_gguf(q4).fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    report = evaluate(model, demo.text["eval"], [f16, q4], EvalSettings(ctx=128, chunks=6), tmp_path / "cache")
    f, q = report.results
    print(f"{arch}: F16 KLD {f.mean_kld:.6f}; Q4_K_M ppl ratio {q.ppl_ratio:.4f}, KLD {q.mean_kld:.5f}")
    assert f.mean_kld < 1e-3
    assert report.failures == []


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def test_moe_awq_is_refused_by_name(arch: str, demo: Demo, tmp_path: Path) -> None:
    model = build_family(arch, demo.spm, tmp_path / arch)
    res = subprocess.run([sys.executable, "-m", "quantize", "awq", str(model), "--calib", str(demo.text["calib"]),
                          "-o", str(tmp_path / "x-AWQ")], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr == (f"quantize: {model / 'config.json'}: awq is not available for {arch}: transformers 5 holds a "
                          "mixture-of-experts block's experts as 3-D parameters, not the linear layers AutoAWQ's "
                          "Mixtral/Qwen3-MoE classes quantize; turn it off in the recipe ([ladder] awq = false)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [arch]


DENSE_AWQ = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"]


def _tiny_hf(arch: str, **change: Any) -> Any:
    """A tiny in-memory model of ``arch`` (weights never read: the layer maps only name modules)."""
    import transformers
    from families import COMMON, FAMILIES

    others = {"LlamaForCausalLM": ("LlamaConfig", {}), "Gemma3ForCausalLM": ("Gemma3TextConfig", {})}
    cfg_cls, extra = FAMILIES[arch] if arch in FAMILIES else others[arch]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, "vocab_size": 512, "pad_token_id": 0, **change})
    cfg.architectures = [arch]
    return getattr(transformers, arch)(cfg)


@pytest.mark.parametrize("arch", DENSE_AWQ)
def test_the_rows_norm_groups_fold_exactly(arch: str) -> None:
    """Random scales in [1/8, 8] folded into every norm group of the family's row (what smoothing
    rescales, the demo plants its outliers in and our Gemma 3 layer map scales), by AutoAWQ's own
    ``apply_scale`` under ``offset_norms_folded``, leave the model's logits unchanged: each norm's
    output reaches exactly the linears its group names, and the norms the row stores as ``w + 1``
    get the ``(1 + w) / s`` fold."""
    import torch

    compat = pytest.importorskip("quantize.engine.autoawq_compat")
    from awq.quantize.scale import apply_scale

    from quantize.architectures import ARCHITECTURES

    row = ARCHITECTURES[arch]
    model = _tiny_hf(arch).float().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # away from the initial 1 (or 0): a wrong fold must show
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=gen)
    n = model.config.num_hidden_layers
    groups = [(g.prev.format(bid=b), tuple(r.format(bid=b) for r in g.readers)) for g in row.scale_groups
              for b in (range(n) if "{bid}" in g.prev else [None]) if b is not None or not model.config.tie_word_embeddings]
    assert len(groups) == 2 * n + (not model.config.tie_word_embeddings)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with compat.offset_norms_folded(model, row), compat.pinned_to_cpu():
            apply_scale(model, [(prev, readers, 8 ** (2 * torch.rand(model.get_submodule(readers[0]).in_features, generator=gen) - 1))
                                for prev, readers in groups])
        after = model(input_ids=ids).logits
    assert float((after - before).norm() / before.norm()) < 1e-5


def test_phi3_awq_map_drops_the_inexact_qkv_to_o_group() -> None:
    """AutoAWQ's Phi-3 map folds o_proj's scales into qkv_proj's last rows: the value rows only
    without grouped-query attention; with it (Phi-4-mini's 24/8) our map leaves that group out."""
    from collections import defaultdict

    from quantize.engine.awq_models import wrap_model

    for kv, kept in ((4, True), (2, False)):
        model = _tiny_hf("Phi3ForCausalLM", num_key_value_heads=kv)
        attn = model.model.layers[0].self_attn
        groups = wrap_model(model, "phi3").get_layers_for_scaling(model.model.layers[0], defaultdict(lambda: None), {})  # type: ignore[arg-type]
        assert any(g["prev_op"] is attn.qkv_proj for g in groups) == kept
        assert len(groups) == 3 + kept


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM"])
def test_awq_folder_passes_the_gate(arch: str, demo: Demo, tmp_path: Path) -> None:
    """AWQ runs on each new dense family (AutoAWQ's own map; ours for Phi-3) and its folder passes the
    gate against HF float32 (our loader unpacks it in torch)."""
    from quantize.awq import AwqSettings, quantize_awq

    model = build_family(arch, demo.spm, tmp_path / "tiny")
    out = quantize_awq(model, tmp_path / f"{arch}-AWQ", demo.text["calib"], AwqSettings(samples=8, seq_len=128))
    report = evaluate(model, demo.text["eval"], [out], EvalSettings(ctx=128, chunks=6), tmp_path / "cache")
    print(f"{arch}: AWQ ppl ratio {report.results[0].ppl_ratio:.4f}, KLD {report.results[0].mean_kld:.5f}")
    assert report.failures == []


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM",
                                  "MixtralForCausalLM", "Qwen3MoeForCausalLM"])
def test_imatrix_and_smoothing(arch: str, demo: Demo, tmp_path: Path) -> None:
    """The importance matrix covers every matrix llama.cpp quantizes with one (fused Phi-3 ones and
    stacked experts included, one row per expert, as llama-imatrix writes them), and smoothing
    rescales every block norm group of the row without changing the function: llama.cpp's logits
    of the smoothed F16 are the original's."""
    from quantize.imatrix import Imatrix, ImatrixSettings, compute_imatrix
    from quantize.smooth import smooth_gguf

    model = build_family(arch, demo.spm, tmp_path / "tiny")
    f16 = convert(model, tmp_path / "m.F16.gguf").path
    im = compute_imatrix(model, demo.text["calib"], ImatrixSettings(ctx=128, chunks=4)).save(tmp_path / "m.imatrix.gguf")
    loaded = Imatrix.load(im)
    matrices = {t.name for t in open_gguf(f16).tensors if len(t.shape) >= 2 and t.name != "token_embd.weight"}
    assert matrices <= set(loaded.sums), matrices - set(loaded.sums)
    for name, n in loaded.expert_counts.items():  # every token goes to num_experts_per_tok experts
        assert len(n) == 4 and n.sum() == 2 * loaded.counts["blk.0.attn_q.weight"], (name, n)
    if loaded.expert_counts:  # an all-imatrix type: llama.cpp refuses a tensor the matrix does not cover
        iq = quantize_gguf(f16, tmp_path / "m.IQ2_XS.gguf", QuantizeSettings("IQ2_XS", im))
        load_llama(iq).close()
    plan = smooth_gguf(f16, im, tmp_path / "s.F16.gguf", tmp_path / "s.imatrix.gguf")
    n_blocks = 2
    assert len([n for n in plan.scales if n.startswith("blk.")]) == 2 * n_blocks
    ids = _ids(model, demo, 96)
    logits = []
    for path in (f16, tmp_path / "s.F16.gguf"):
        llm = load_llama(path, n_ctx=len(ids), logits_all=True)
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    err, scale = np.abs(logits[0] - logits[1]).max(), float(np.abs(logits[0]).max())
    print(f"{arch}: smoothing alphas {sorted(set(plan.alphas.values()))}, max |Δlogit| {err:.4f} (range {scale:.1f})")
    assert err < 0.02 * scale
