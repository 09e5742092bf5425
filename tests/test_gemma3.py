"""Gemma 3, a second architecture, on a real pretrained model (Gemma 3 270M from `quantize fetch-real`):
llama.cpp's reference converter byte for byte, llama.cpp tokenizing the *published* GGUF as the
tokenization ground truth, HF's perplexity against llama.cpp running our F16, and configs that lie."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import MakeTemp, copy_checkpoint, load_llama
from test_convert import BATTERY

from quantize.architectures import read_gemma3_config
from quantize.convert import convert
from quantize.errors import QuantizeError
from quantize.formats.gguf_read import open_gguf
from quantize.inspect_gguf import metadata

CHAT = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Speak, good friend:\nwho goes there?"},
        {"role": "assistant", "content": "Nay, answer me."}, {"role": "user", "content": "Long live the king!"}]

GEMMA_BATTERY = [
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos>more<pad>",
    "<unused0><mask>[multimodal]<start_of_image><end_of_image><image_soft_token>",
    "indented:\n    four\n        eight\n\t\ttabs\t\t\n\n\n\nfour newlines",
    "<table><tr><td>cell</td></tr></table> <b>bold</b>",
    "x" + " " * 31 + "y" + " " * 40 + "z",
    "naïve ﬁ ligature, ½, Ⅻ, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, ‍zero width joiner",
]

# Keys our F16 writes that llama.cpp's converter does not: provenance, the EOT token (so llama.cpp
# stops at <end_of_turn>), vocab size and rope dimension count (llama.cpp's defaults, made explicit).
OUR_EXTRA_KEYS = {"gemma3.rope.dimension_count", "gemma3.vocab_size", "tokenizer.ggml.eot_token_id", "quantize.version",
                  "quantize.gguf_py_version", "quantize.source.architecture", "quantize.source.files", "quantize.source.sha256"}


@pytest.fixture(scope="module")
def gemma3_f16(gemma3: Path, module_mktemp: MakeTemp) -> Path:
    t0 = time.perf_counter()
    out = convert(gemma3, module_mktemp("gemma3") / "gemma-3-270m.F16.gguf").path
    print(f"our conversion: {time.perf_counter() - t0:.1f} s")
    return out


def _reference(src: Path, out: Path, converter: Path) -> Path:
    t0 = time.perf_counter()
    subprocess.run([str(converter), str(src), "--outfile", str(out), "--outtype", "f16"], check=True, capture_output=True)
    print(f"reference conversion: {time.perf_counter() - t0:.1f} s")
    return out


def _tensors_identical(ref_path: Path, our_path: Path) -> int:
    ref, ours = open_gguf(ref_path), {t.name: t for t in open_gguf(our_path).tensors}
    assert {t.name for t in ref.tensors} == set(ours)
    for t in ref.tensors:
        o = ours[t.name]
        assert (o.tensor_type, list(o.shape)) == (t.tensor_type, list(t.shape)), t.name
        assert o.data.tobytes() == t.data.tobytes(), t.name
    return len(ref.tensors)


@pytest.mark.reference
def test_matches_reference_converter(gemma3: Path, gemma3_f16: Path, gemma3_published: Path, reference_converter: Path,
                                     tmp_path: Path) -> None:
    ref_path = _reference(gemma3, tmp_path / "reference.gguf", reference_converter)
    n = _tensors_identical(ref_path, gemma3_f16)
    ref_meta, our_meta = metadata(open_gguf(ref_path)), metadata(open_gguf(gemma3_f16))
    assert set(ref_meta) <= set(our_meta), set(ref_meta) - set(our_meta)
    assert {k: ref_meta[k] for k in ref_meta if ref_meta[k] != our_meta[k]} == {}
    assert set(our_meta) - set(ref_meta) <= OUR_EXTRA_KEYS, set(our_meta) - set(ref_meta) - OUR_EXTRA_KEYS
    assert our_meta["tokenizer.ggml.eot_token_id"] == 106  # <end_of_turn>
    # And against the published GGUF: same hyperparameters and vocabulary, key for key (it was made
    # by an older llama.cpp converter, without the swa rope base, sampler defaults or chat template).
    published = metadata(open_gguf(gemma3_published))
    differ = {k for k in published if published[k] != our_meta.get(k)}
    assert differ == {"general.file_type"}, differ
    print(f"{n} tensors byte-identical to llama.cpp's converter; {len(ref_meta)} reference keys equal")


@pytest.mark.reference
@pytest.mark.slow
def test_bf16_checkpoint_matches_reference_converter(gemma3: Path, tmp_path: Path, reference_converter: Path) -> None:
    """Google ships Gemma 3 in bfloat16: the norms' + 1 must then be taken on values, not on bf16 bits."""
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "bf16"
    src.mkdir()
    for f in gemma3.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).symlink_to(f)
    state = {k: v.to(torch.bfloat16) for k, v in load_file(gemma3 / "model.safetensors").items()}
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    del state
    ours = convert(src, tmp_path / "ours.gguf").path
    _tensors_identical(_reference(src, tmp_path / "reference.gguf", reference_converter), ours)


def _vocab_only(path: Path) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_tokenization_matches_published_gguf(gemma3: Path, gemma3_f16: Path, gemma3_published: Path) -> None:
    """Ground truth: llama.cpp tokenizing with the published GGUF's vocabulary."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    truth, ours = _vocab_only(gemma3_published), _vocab_only(gemma3_f16)
    hf = AutoTokenizer.from_pretrained(gemma3)
    sp = spm.SentencePieceProcessor(model_file=str(gemma3 / "tokenizer.model"))
    chat = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<bos><start_of_turn>user\nAnswer in verse.\n\nSpeak") and chat.endswith("<start_of_turn>model\n")
    texts = [*BATTERY, *GEMMA_BATTERY, chat]
    n_tokens, hf_disagrees, sp_disagrees = 0, [], []
    for text in texts:
        want = truth.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.tokenize(text.encode(), add_bos=False, special=True) == want, text
        assert ours.tokenize(text.encode(), add_bos=True, special=False) == truth.tokenize(text.encode(), add_bos=True, special=False), text
        n_tokens += len(want)
        if hf(text, add_special_tokens=False)["input_ids"] != want:
            hf_disagrees.append(text)
        if "<" not in text and sp.encode(text) != want:  # SentencePiece has no notion of special-token parsing
            sp_disagrees.append(text)
    assert ours.tokenize(b"Hello", add_bos=True, special=True)[0] == 2  # <bos>
    print(f"{len(texts)} strings, {n_tokens} tokens: identical to llama.cpp on the published GGUF; "
          f"HF tokenizer disagrees on {hf_disagrees}; SentencePiece on tokenizer.model disagrees on {sp_disagrees}")
    assert not sp_disagrees
    # The HF tokenizer knows <image_soft_token> (id 262144, no embedding row, so not in the GGUF), and
    # the tokenizers library splits whitespace runs longer than the longest whitespace token (31)
    # differently from SentencePiece and llama.cpp (40 spaces: 16 + 24 instead of 31 + 9).
    assert set(hf_disagrees) <= {GEMMA_BATTERY[2], GEMMA_BATTERY[5]}, hf_disagrees


def _held_out_ids(tokenizer: Any, n: int) -> list[int]:
    from quantize.models.corpus import plain_text, play_files

    hamlet = plain_text(play_files()["hamlet"].read_text(encoding="utf-8"))
    ids = tokenizer(hamlet[20000:60000], add_special_tokens=False)["input_ids"]
    assert len(ids) >= n
    return [tokenizer.bos_token_id, *ids[: n - 1]]


def _hf_logits_chunks(model_dir: Path, ids: list[int], chunk: int) -> Any:
    """HF float32 logits, chunk by chunk (a 262k vocabulary makes the full matrix 1 GB per 1k tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        for i in range(0, len(ids), chunk):
            logits = model.lm_head(h[i : i + chunk])
            if model.config.final_logit_softcapping:
                cap = model.config.final_logit_softcapping
                logits = torch.tanh(logits / cap) * cap
            yield logits.numpy()


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    lse = np.logaddexp.reduce(logits.astype(np.float64), axis=-1)
    return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


def _llama_scores(path: Path, ids: list[int]) -> np.ndarray:
    llm = load_llama(path, n_ctx=len(ids), logits_all=True)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float32)


@pytest.mark.slow
def test_perplexity_matches_hf(gemma3: Path, gemma3_f16: Path, gemma3_published: Path) -> None:
    """1024 held-out tokens (Hamlet): twice the sliding window, so the local/global schedule matters."""
    from transformers import AutoTokenizer

    n, chunk = 1024, 128
    ids = _held_out_ids(AutoTokenizer.from_pretrained(gemma3), n)
    targets = np.array(ids[1:])
    ours = _llama_scores(gemma3_f16, ids)
    nll_hf, nll_ours, top1, max_err, scale = [], [], 0, 0.0, 0.0
    for i, ref in enumerate(_hf_logits_chunks(gemma3, ids, chunk)):
        lo = i * chunk
        ref, got, tgt = ref[: n - 1 - lo], ours[lo : lo + chunk][: n - 1 - lo], targets[lo : lo + chunk]
        nll_hf.append(_nll(ref, tgt))
        nll_ours.append(_nll(got, tgt))
        top1 += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
        max_err, scale = max(max_err, float(np.abs(ref - got).max())), max(scale, float(np.abs(ref).max()))
    del ours
    p_hf, p_ours = math.exp(np.concatenate(nll_hf).mean()), math.exp(np.concatenate(nll_ours).mean())
    published = _llama_scores(gemma3_published, ids)
    p_pub = math.exp(np.concatenate([_nll(published[i : i + chunk][: n - 1 - i], targets[i : i + chunk])
                                     for i in range(0, n - 1, chunk)]).mean())
    print(f"perplexity over {n - 1} held-out tokens: HF float32 {p_hf:.4f}, our F16 GGUF in llama.cpp {p_ours:.4f} "
          f"(ratio {p_ours / p_hf:.6f}); published Q4_K_M GGUF {p_pub:.4f}; top-1 agreement {top1 / (n - 1):.4f}, "
          f"max |Δlogit| {max_err:.4f} (logit range {scale:.1f})")
    assert abs(p_ours / p_hf - 1) < 1e-3  # measured 9e-5 (61.6925 vs 61.6981)
    assert top1 / (n - 1) > 0.98


def test_llama_cpp_chat_stops_at_end_of_turn(gemma3_f16: Path) -> None:
    import llama_cpp

    llm = load_llama(gemma3_f16)
    eot = llm.tokenize(b"<end_of_turn>", add_bos=False, special=True)
    assert eot == [106] and llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), 106)
    out = llm.create_completion("To be, or not to be, that is the", max_tokens=8, temperature=0.0)
    assert out["choices"][0]["text"].strip()
    chat = llm.create_chat_completion(CHAT[1:2], max_tokens=32, temperature=0.0, logit_bias={106: 100.0})
    assert chat["choices"][0]["finish_reason"] == "stop"
    assert "<end_of_turn>" not in chat["choices"][0]["message"]["content"]


# --- configs that lie: one line naming config.json, exit 2, nothing written -----------------------


def _edit_config(d: Path, **changes: Any) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").unlink()  # copy_checkpoint may have linked it
    (d / "config.json").write_text(json.dumps(cfg))


def _lie_head_dim(d: Path) -> str:
    _edit_config(d, head_dim=128)
    return "head_dim=128 contradicts the weights"


def _layer_types_vs_pattern(d: Path) -> str:
    layers = json.loads((d / "config.json").read_text())["layer_types"]
    layers[5] = "sliding_attention"
    _edit_config(d, layer_types=layers)
    return "layer 5 is 'sliding_attention' but the pattern makes it 'full_attention'"


def _pattern_vs_layer_types(d: Path) -> str:
    _edit_config(d, sliding_window_pattern=4, _sliding_window_pattern=4)
    return "layer_types contradicts sliding_window_pattern=4"


LIES = {"head_dim": _lie_head_dim, "layer_types": _layer_types_vs_pattern, "sliding_window_pattern": _pattern_vs_layer_types}


@pytest.mark.parametrize("lie", list(LIES))
def test_config_that_lies(lie: str, gemma3: Path, tmp_path: Path) -> None:
    src = copy_checkpoint(gemma3, tmp_path / "model")
    words = LIES[lie](src)
    out = tmp_path / "out" / "model.gguf"
    res = subprocess.run([sys.executable, "-m", "quantize", "convert", str(src), "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"quantize: {src / 'config.json'}: "), res.stderr
    assert words in lines[0], lines[0]
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


# --- the config reader on its own -------------------------------------------------------------------


def _release_config(gemma3: Path) -> dict[str, Any]:
    return json.loads((gemma3 / "config.json").read_text())


def test_transformers5_config_reads_the_same(gemma3: Path) -> None:
    """transformers 5 writes rope_parameters per layer kind instead of rope_theta/rope_local_base_freq."""
    old = _release_config(gemma3)
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling", "_sliding_window_pattern")}
    new["rope_parameters"] = {"full_attention": {"rope_theta": old["rope_theta"], "rope_type": "default"},
                              "sliding_attention": {"rope_theta": old["rope_local_base_freq"], "rope_type": "default"}}
    a, b = read_gemma3_config(old, "config.json"), read_gemma3_config(new, "config.json")
    assert (a.rope_theta, a.rope_theta_swa, a.head_dim, a.sliding_window, a.tie_embeddings) == (1e6, 1e4, 256, 512, True)
    assert (b.rope_theta, b.rope_theta_swa, b.head_dim, b.sliding_window, b.tie_embeddings) == (1e6, 1e4, 256, 512, True)


@pytest.mark.parametrize("change, words", [
    ({"layer_types": None, "_sliding_window_pattern": 4}, "not Gemma 3's"),
    ({"rope_local_base_freq": 50_000.0}, "sliding-window rope base 50000"),
    ({"attn_logit_softcapping": 50.0}, "attention logit soft-capping"),
    ({"use_bidirectional_attention": True}, "bidirectional attention"),
    ({"layer_types": ["sliding_attention"] * 17}, "must list 18 entries"),
    ({"sliding_window_pattern": 6, "_sliding_window_pattern": 5}, "disagree"),
])
def test_config_llama_cpp_would_run_wrong(gemma3: Path, change: dict[str, Any], words: str) -> None:
    with pytest.raises(QuantizeError, match=words) as e:
        read_gemma3_config({**_release_config(gemma3), **change}, "config.json")
    assert str(e.value).startswith("config.json: ") and "\n" not in str(e.value)
