"""The converter against the real things: llama.cpp loading, tokenizing and running what we
wrote, HF's own logits, and llama.cpp's reference converter byte for byte."""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MakeTemp, copy_checkpoint, load_llama

from quantize.convert import convert
from quantize.formats.gguf_read import open_gguf
from quantize.inspect_gguf import metadata, summarize
from quantize.models.demo import Demo

CHATML = [{"role": "system", "content": "You are a player."}, {"role": "user", "content": "Speak, good friend:\nwho goes there?"}]

BATTERY = [
    "To be, or not to be, that is the question:",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "runs    of     spaces",
    "tab\tseparated\t\tvalues",
    "new\nlines\n\nand\n\n\nparagraphs\n",
    "digits 0 1 12 123 1234 12345 3.14159 1,000,000",
    "unicode: café naïve Straße Ελληνικά русский 日本語 한국어",
    "emoji: 🦙🚀 😶‍🌫️ ✅",
    "<|im_start|>user\nhello<|im_end|>",
    "text<|im_end|>more text<|im_start|>",
    "<|im_start|><|im_end|>",
    "''' \"quotes\" `code` ...!!! ???",
]


def sentencepiece_ids(tokenizer_model: Path, text: str, specials: dict[str, int]) -> list[int]:
    """SentencePiece's own tokenization, with the added special tokens matched first (as every
    HF/llama.cpp tokenizer does) and each remaining fragment encoded by SentencePiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    ids: list[int] = []
    pattern = "(" + "|".join(re.escape(s) for s in specials) + ")"
    for part in re.split(pattern, text):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids.extend(sp.encode(part))
    return ids


def test_summary_and_metadata(spm_f16: Path, bpe_f16: Path) -> None:
    s = summarize(spm_f16)
    assert s.architecture == "llama" and s.file_type == "MOSTLY_F16"
    assert s.n_tokens == 32002 and s.chat_template
    assert s.special["eos"] == 32001 and s.special["bos"] == 1 and s.special["eot"] == 32001
    assert s.tensor_types == {"F16": 4 * 7 + 2, "F32": 4 * 2 + 1}
    meta = metadata(open_gguf(spm_f16))
    assert meta["tokenizer.ggml.tokens"][32000:] == ["<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.ggml.token_type"][32000:] == [3, 3]  # CONTROL
    assert meta["tokenizer.ggml.add_bos_token"] is True and not meta.get("tokenizer.ggml.add_eos_token")
    assert len(meta["quantize.source.sha256"]) == len(meta["quantize.source.files"])
    assert "0" * 64 not in meta["quantize.source.sha256"]
    b = summarize(bpe_f16)
    assert b.tokenizer == "gpt2 (pre: llama-bpe)"
    assert "output.weight" not in {t.name for t in open_gguf(bpe_f16).tensors}  # tied embeddings


def test_source_hashes_are_the_files_sha256(demo: Demo, spm_f16: Path) -> None:
    from quantize.atomic import sha256_file

    meta = metadata(open_gguf(spm_f16))
    for name, digest in zip(meta["quantize.source.files"], meta["quantize.source.sha256"], strict=True):
        assert sha256_file(demo.spm / name) == digest, name


def test_a_changed_shard_is_hashed_again(demo: Demo, tmp_path: Path) -> None:
    """Shard hashes are remembered across conversions, and a shard rewritten with other bytes of the
    same size gets its new sha256 in the next conversion's provenance, not the remembered one."""
    import shutil

    from quantize.atomic import sha256_file

    src = tmp_path / "model"
    shutil.copytree(demo.spm, src)
    shard = next(src.glob("*.safetensors"))

    def recorded(out: Path) -> str:
        convert(src, out)
        meta = metadata(open_gguf(out))
        return dict(zip(meta["quantize.source.files"], meta["quantize.source.sha256"], strict=True))[shard.name]

    first = recorded(tmp_path / "a.gguf")
    assert first == recorded(tmp_path / "b.gguf") == sha256_file(shard)
    data = bytearray(shard.read_bytes())
    data[-2:] = bytes(b ^ 0xFF for b in data[-2:])  # the last weight's bits: same size, other content
    shard.write_bytes(bytes(data))
    assert recorded(tmp_path / "c.gguf") == sha256_file(shard) != first


def test_the_hash_cache_forgets_changed_and_removed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import quantize.fingerprint as fp

    monkeypatch.setattr(fp, "HASH_CACHE", tmp_path / "cache" / "sha256.json")
    a, b, c, d = (tmp_path / n for n in "abcd")
    for f in (a, b, c, d):
        f.write_bytes(f.name.encode() * 1000)
    fp.cached_sha256(a), fp.cached_sha256(b)
    kept = fp.file_key(a)
    b.unlink()
    fp.cached_sha256(c)  # the next write drops b's entry and keeps a's
    assert set(json.loads(fp.HASH_CACHE.read_text())) == {kept, fp.file_key(c)}
    os.utime(a, ns=(1, 1))  # a changed: its remembered key no longer matches
    fp.cached_sha256(d)
    assert set(json.loads(fp.HASH_CACHE.read_text())) == {fp.file_key(c), fp.file_key(d)}


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_llama_cpp_loads_and_stops_at_im_end(which: str, spm_f16: Path, bpe_f16: Path) -> None:
    import llama_cpp

    path = spm_f16 if which == "spm" else bpe_f16
    llm = load_llama(path)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    im_end = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    assert len(im_end) == 1
    assert llama_cpp.llama_vocab_is_eog(vocab, im_end[0])
    # Plain generation produces text.
    out = llm.create_completion("To be, or not to be", max_tokens=16, temperature=0.0)
    assert out["choices"][0]["text"].strip()
    # Chat generation through the embedded template stops at <|im_end|>: bias the model towards
    # it and the completion must end there ("stop"), with the token not leaked into the text.
    chat = llm.create_chat_completion(CHATML, max_tokens=32, temperature=0.0, logit_bias={im_end[0]: 100.0})
    choice = chat["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "<|im_end|>" not in choice["message"]["content"]


def test_tokenization_spm_matches_sentencepiece(demo: Demo, spm_f16: Path) -> None:
    from transformers import AutoTokenizer

    llm = load_llama(spm_f16)
    hf = AutoTokenizer.from_pretrained(demo.spm)
    specials = {"<|im_start|>": 32000, "<|im_end|>": 32001}
    chat = hf.apply_chat_template(CHATML, tokenize=False, add_generation_prompt=True)
    hf_disagrees = []
    for text in [*BATTERY, chat]:
        truth = sentencepiece_ids(demo.spm / "tokenizer.model", text, specials)
        ours = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours == truth, text
        if hf(text, add_special_tokens=False)["input_ids"] != truth:
            hf_disagrees.append(text)
    # transformers 5 derives tokenizer.json from tokenizer.model and gets some whitespace wrong
    # (runs of spaces, a leading space): documented in the README; the GGUF follows SentencePiece.
    print("HF's derived tokenizer.json disagrees with SentencePiece on:", hf_disagrees)
    # With BOS, as llama.cpp adds it for this model.
    assert llm.tokenize(b"Hello", add_bos=True, special=True)[0] == 1


def test_tokenization_bpe_matches_tokenizers(demo: Demo, bpe_f16: Path) -> None:
    from transformers import AutoTokenizer

    llm = load_llama(bpe_f16)
    hf = AutoTokenizer.from_pretrained(demo.bpe)
    chat = hf.apply_chat_template(CHATML, tokenize=False, add_generation_prompt=True)
    for text in [*BATTERY, chat]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf(text, add_special_tokens=False)["input_ids"], text
    assert llm.tokenize(b"Hello", add_bos=True, special=True) == hf("Hello")["input_ids"]


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = load_llama(path, n_ctx=len(ids), logits_all=True)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _ppl(logits: np.ndarray, ids: list[int]) -> float:
    lp = logits[:-1] - np.logaddexp.reduce(logits[:-1].astype(np.float64), axis=-1, keepdims=True)
    return math.exp(-float(np.mean(lp[np.arange(len(ids) - 1), ids[1:]])))


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_logits_match_hf(which: str, demo: Demo, spm_f16: Path, bpe_f16: Path) -> None:
    from transformers import AutoTokenizer

    model_dir, path = (demo.spm, spm_f16) if which == "spm" else (demo.bpe, bpe_f16)
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = demo.text["eval"].read_text()[:4000]
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]][:384]
    ref, ours = _hf_logits(model_dir, ids), _llama_logits(path, ids)
    err = np.abs(ref - ours)
    scale = float(np.abs(ref).max())
    p_ref, p_ours = _ppl(ref, ids), _ppl(ours, ids)
    print(f"{which}: max |Δlogit| {err.max():.4f} (logit range {scale:.1f}), mean {err.mean():.5f}; ppl HF {p_ref:.4f} GGUF {p_ours:.4f}")
    # llama.cpp rounds activations to f16 before F16 matrix products: small, bounded error.
    assert err.max() < 0.02 * scale
    assert np.mean(np.argmax(ref, -1) == np.argmax(ours, -1)) > 0.98
    assert abs(p_ours / p_ref - 1) < 1e-3


@pytest.mark.reference
def test_matches_reference_converter(demo: Demo, spm_f16: Path, reference_converter: Path, tmp_path: Path) -> None:
    ref_path = tmp_path / "reference.gguf"
    subprocess.run([str(reference_converter), str(demo.spm), "--outfile", str(ref_path), "--outtype", "f16"],
                   check=True, capture_output=True)
    ref, ours = open_gguf(ref_path), open_gguf(spm_f16)
    ours_t = {t.name: t for t in ours.tensors}
    assert {t.name for t in ref.tensors} == set(ours_t)
    for t in ref.tensors:
        o = ours_t[t.name]
        assert (o.tensor_type, list(o.shape)) == (t.tensor_type, list(t.shape)), t.name
        assert o.data.tobytes() == t.data.tobytes(), t.name
    ref_meta, our_meta = metadata(ref), metadata(ours)
    missing = set(ref_meta) - set(our_meta)
    assert not missing, missing
    # Deliberate difference: the reference drops the ChatML tokens that transformers 5 records
    # only in tokenizer.json, writing "[PAD32000]" / "[PAD32001]" (UNUSED) instead.
    assert ref_meta["tokenizer.ggml.tokens"][32000:] == ["[PAD32000]", "[PAD32001]"]
    differ = {k for k in ref_meta if ref_meta[k] != our_meta[k]}
    assert differ <= {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}, differ
    for key in differ:
        assert ref_meta[key][:32000] == our_meta[key][:32000], key


@pytest.mark.parametrize("values", [
    [b"<s>", b"</s>", b"\xe2\x96\x81the"],  # token pieces as SentencePiece vocabularies hold them
    ["<s>", "caf\u00e9", "\u2581the"], [b"raw", "text"], [0.0, -1000.0, 0.5], [1, 2, 3], [True, False],
    [1, 2.5], [[1, 2], [3]],
])
def test_metadata_arrays_pack_as_gguf_py_packs_them(values: list[object], tmp_path: Path) -> None:
    import gguf

    from quantize.formats.gguf_write import Writer

    files = []
    for cls in (gguf.GGUFWriter, Writer):
        w = cls(tmp_path / f"{cls.__name__}.gguf", "llama")
        try:
            w.add_array("test.values", values)
            w.write_header_to_file()
            w.write_kv_data_to_file()
        except (ValueError, TypeError, struct.error) as e:  # refused by both, with the same error
            files.append(type(e))
        else:
            files.append((tmp_path / f"{cls.__name__}.gguf").read_bytes())
        finally:
            w.close()
    assert files[0] == files[1]


# Llama 3.1's rope scaling on the demo's SentencePiece model relabelled Llama (same tensors; a tokenizer
# llama.cpp's converter knows): head_dim 32 and an original context of 256 put its 16 frequencies in
# all three bands of the scaling (kept, smoothed, divided by the factor).
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}


@pytest.fixture(scope="module")
def llama31(demo: Demo, module_mktemp: MakeTemp) -> tuple[Path, Path]:
    """A Llama with Llama 3.1 rope scaling in its config, and its F16 GGUF."""
    d = copy_checkpoint(demo.spm, module_mktemp("llama31") / "llama31")
    cfg = json.loads((d / "config.json").read_text())
    cfg |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_parameters": LLAMA31_ROPE}
    del cfg["sliding_window"]
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return d, convert(d, d.parent / "llama31.F16.gguf").path


def test_llama31_rope_scaling_matches_hf(demo: Demo, llama31: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    model_dir, path = llama31
    factors = {t.name: np.array(t.data) for t in open_gguf(path).tensors}["rope_freqs.weight"]
    assert sorted(set(np.round(factors, 3).tolist()))[0] == 1.0 and factors.max() == 8.0 and len(set(factors.tolist())) > 2
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok.bos_token_id, *tok(demo.text["eval"].read_text()[:4000], add_special_tokens=False)["input_ids"]][:384]
    ref, ours = _hf_logits(model_dir, ids), _llama_logits(path, ids)
    plain = _llama_logits(convert(demo.spm, model_dir.parent / "plain.gguf").path, ids)
    err, scale = np.abs(ref - ours), float(np.abs(ref).max())
    print(f"llama3 rope: max |Δlogit| {err.max():.4f} (range {scale:.1f}); without the scaling {np.abs(ref - plain).max():.4f}")
    assert err.max() < 0.02 * scale
    assert np.abs(ref - plain).max() > 10 * err.max()  # the scaling changes the function, and llama.cpp applies it
    assert abs(_ppl(ours, ids) / _ppl(ref, ids) - 1) < 1e-3


@pytest.mark.reference
def test_llama31_rope_scaling_matches_reference_converter(llama31: tuple[Path, Path], reference_converter: Path,
                                                         tmp_path: Path) -> None:
    model_dir, path = llama31
    ref_path = tmp_path / "reference.gguf"
    subprocess.run([str(reference_converter), str(model_dir), "--outfile", str(ref_path), "--outtype", "f16"],
                   check=True, capture_output=True)
    ref = {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in open_gguf(ref_path).tensors}
    ours = {t.name: (t.tensor_type, list(t.shape), t.data.tobytes()) for t in open_gguf(path).tensors}
    assert "rope_freqs.weight" in ref and ref == ours
    ref_meta, our_meta = metadata(open_gguf(ref_path)), metadata(open_gguf(path))
    rope_keys = {k for k in ref_meta if ".rope." in k}
    assert {k: ref_meta[k] for k in rope_keys} == {k: our_meta.get(k) for k in rope_keys}


def test_sharded_bf16_and_fp32_inputs(demo: Demo, spm_f16: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo.spm, dtype=torch.float16)
    sharded = copy_checkpoint(demo.spm, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="8MB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    ours = {t.name: t.data.tobytes() for t in open_gguf(spm_f16).tensors}
    conv = {t.name: t.data.tobytes() for t in open_gguf(convert(sharded, tmp_path / "sharded.gguf").path).tensors}
    assert conv == ours
    for dtype in (torch.float32, torch.bfloat16):  # .to() is in place: widen before narrowing
        d = copy_checkpoint(demo.spm, tmp_path / str(dtype))
        (d / "model.safetensors").unlink()
        model.to(dtype).save_pretrained(d)
        got = open_gguf(convert(d, tmp_path / f"{dtype}.gguf").path)
        for t in got.tensors:
            want = np.frombuffer(ours[t.name], dtype=np.float16 if t.tensor_type.name == "F16" else np.float32)
            if dtype == torch.float32:  # fp16 -> fp32 -> fp16 is exact
                assert t.data.tobytes() == ours[t.name], t.name
            else:  # bf16 rounding: within bf16's 8-bit mantissa of the f16 value
                np.testing.assert_allclose(np.asarray(t.data).ravel().astype(np.float32), want.astype(np.float32), rtol=1 / 128, atol=1e-6)


# --- bad input: each a one-line error naming the file, exit 2, nothing at the output path ---


def _break_missing_config(d: Path) -> str:
    (d / "config.json").unlink()
    return "config.json"


def _break_architecture(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]  # no row here: llama.cpp's converter is tried, and refuses these weights
    (d / "config.json").write_text(json.dumps(cfg))
    return "has no row in this tool's table and llama.cpp's converter failed on it: ValueError: Can not map tensor"


def _break_truncated(d: Path) -> str:
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data[: len(data) // 2])
    return "truncated"


def _break_missing_shard(d: Path) -> str:
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model-00002-of-00002.safetensors"


def _break_shape(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 1024
    (d / "config.json").write_text(json.dumps(cfg))
    return "shape"


def _break_vocab(d: Path) -> str:
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["added_tokens"].append({**tj["added_tokens"][-1], "id": 32002, "content": "<|extra|>"})
    (d / "tokenizer.json").write_text(json.dumps(tj))
    return "embedding rows"


BROKEN = {
    "missing config.json": _break_missing_config,
    "unsupported architecture": _break_architecture,
    "truncated shard": _break_truncated,
    "shard missing from index": _break_missing_shard,
    "shape disagrees with config": _break_shape,
    "vocabulary larger than embeddings": _break_vocab,
}


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantize", *args], capture_output=True, text=True)


@pytest.mark.parametrize("case", list(BROKEN))
def test_bad_input(case: str, demo: Demo, tmp_path: Path) -> None:
    src = copy_checkpoint(demo.spm, tmp_path / "model")
    words = BROKEN[case](src)
    out = tmp_path / "out" / "model.gguf"
    res = _run_cli("convert", str(src), "-o", str(out))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantize: "), res.stderr
    assert str(src) in lines[0] and words in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob("*")) if out.parent.exists() else True


def _readonly_dir(tmp_path: Path) -> Path:
    d = tmp_path / "locked"
    d.mkdir()
    d.chmod(0o500)
    if os.access(d, os.W_OK):  # root ignores permission bits: use a read-only filesystem instead
        return Path("/proc/quantize-test")
    return d


@pytest.mark.parametrize("where", ["read-only folder", "parent is a file"])
def test_unwritable_output_folder(where: str, demo: Demo, tmp_path: Path) -> None:
    if where == "read-only folder":
        folder = _readonly_dir(tmp_path)
    else:
        (tmp_path / "afile").write_text("x")
        folder = tmp_path / "afile" / "sub"
    res = _run_cli("convert", str(demo.spm), "-o", str(folder / "m.gguf"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"quantize: {folder}") and "not writable" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (folder / "m.gguf").exists()


def test_disk_filling_up_midway(demo: Demo, tmp_path: Path) -> None:
    """A write that fails half way (here: a 5 MB file-size limit, as a full disk would) gives a
    one-line error and leaves nothing behind, temporary files included."""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (5 << 20, 5 << 20))

    out = tmp_path / "out" / "m.gguf"
    res = subprocess.run([sys.executable, "-m", "quantize", "convert", str(demo.spm), "-o", str(out)],
                         capture_output=True, text=True, preexec_fn=limit)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith(f"quantize: {out}: the disk filled up") and len(res.stderr.strip().splitlines()) == 1
    assert not list(out.parent.iterdir())


def test_preflight_refuses_when_the_disk_is_too_small(tmp_path: Path) -> None:
    from quantize.errors import QuantizeError
    from quantize.resources import check_free_space

    with pytest.raises(QuantizeError, match="GiB of disk") as e:
        check_free_space(tmp_path, 1 << 60, "building X")
    assert str(tmp_path) in str(e.value)
    check_free_space(tmp_path, 1, "building X")
