"""Tokenizer files -> the ``tokenizer.*`` part of a GGUF.

Two families, chosen by what the checkpoint ships:

* SentencePiece (``tokenizer.model``): pieces, scores and types straight from SentencePiece, as
  llama.cpp's converter does, plus the tokens added on top of it.  llama.cpp's converter reads
  added tokens only from ``added_tokens.json`` and ``tokenizer_config.json``'s
  ``added_tokens_decoder``; transformers 5 writes them to ``tokenizer.json`` alone, so there they
  are silently lost (e.g. ChatML's ``<|im_start|>``/``<|im_end|>`` become ``[PAD32000]``).  We
  read all three places.
* Byte-level BPE (``tokenizer.json`` with a BPE model): tokens, merges, and the
  ``tokenizer.ggml.pre`` name of the pre-tokenizer the file *declares*, looked up in
  :data:`PRE_TOKENIZERS`, instead of llama.cpp's hash of known tokenizers' output (which refuses
  any freshly trained tokenizer).

Special ids, add-BOS/EOS flags, merges and the chat template come from gguf-py's ``SpecialVocab``,
the same code llama.cpp's converter uses, so both agree where both apply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gguf
from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

from quantize.errors import QuantizeError

log = logging.getLogger(__name__)

TT = gguf.TokenType

# The Split regex a tokenizer.json declares -> llama.cpp's name for that pre-tokenizer
# (llama.cpp src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2/2.5/3 (tokenizer.json as Qwen publishes it): Llama 3's, but digits one at a time.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Tekken (Mistral-Nemo, Mistral-Small 3, Pixtral): mistral-common's tekken.json pattern, as HF's tokenizer.json carries it.
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, str] = {
    LLAMA3_REGEX: "llama-bpe",
    QWEN2_REGEX: "qwen2",
    TEKKEN_REGEX: "tekken",
    "<gpt2 byte-level>": "gpt2",  # ByteLevel(use_regex=True): GPT-2's built-in regex
}

# Turn-closing tokens of common chat formats: if the template uses one, it is the EOT token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass(frozen=True)
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    scores: list[float] | None
    types: list[int]
    source: Path
    special: gguf.SpecialVocab
    add_space_prefix: bool | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(w, quiet=True)
        eot = self.end_of_turn_id()
        if eot is not None and self.special.special_token_ids.get("eot") is None:
            w.add_eot_token_id(eot)

    def end_of_turn_id(self) -> int | None:
        template = self.special.chat_template
        if not isinstance(template, str):
            return None
        for text in END_OF_TURN_TOKENS:
            if text in template:
                try:
                    return self.tokens.index(text.encode())
                except ValueError:
                    continue
        return None


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizeError(path, f"not valid JSON ({exc})") from exc


class Added(NamedTuple):
    text: str
    special: bool
    # Listed in added_tokens.json or tokenizer_config.json's added_tokens_decoder, the files
    # llama.cpp's converter reads (and transformers 4 wrote), rather than in tokenizer.json alone.
    declared: bool


def added_tokens(root: Path, tokenizer_json: dict[str, Any] | None = None) -> dict[int, Added]:
    """id -> added token, from every place HF tokenizers record added tokens (``tokenizer_json``: the
    folder's ``tokenizer.json`` if the caller has parsed it already)."""
    out: dict[int, Added] = {}
    if (p := root / "added_tokens.json").is_file():
        for text, tid in _json(p).items():
            out[int(tid)] = Added(text, False, True)
    if tokenizer_json is None and (p := root / "tokenizer.json").is_file():
        tokenizer_json = _json(p)
    if tokenizer_json is not None:
        for tok in tokenizer_json.get("added_tokens", []):
            out[int(tok["id"])] = Added(tok["content"], bool(tok.get("special")), False)
    if (p := root / "tokenizer_config.json").is_file():
        for tid, tok in (_json(p).get("added_tokens_decoder") or {}).items():
            out[int(tid)] = Added(tok["content"], bool(tok.get("special")), True)
    return out


# Tokens llama.cpp's converter treats as control tokens even when a release leaves them unflagged
# (convert_hf_to_gguf.py does_token_look_special: Gemma and Gemma 2 mark <mask>, <unusedN>... so).
LOOKS_SPECIAL = frozenset({"<pad>", "<mask>", "<2mass>", "[@BOS@]"})


def _looks_special(text: str) -> bool:
    return (text in LOOKS_SPECIAL or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _drop_unembedded(extra: dict[int, Added], n_vocab: int, unembedded: Collection[str], path: Path) -> None:
    """Drop added tokens the architecture knows a release lists beyond its embedding rows."""
    for i in [i for i, a in extra.items() if i >= n_vocab and a.text in unembedded]:
        log.info("%s: added token %r (id %d) has no embedding row; left out, as llama.cpp's converter does",
                 path.name, extra[i].text, i)
        del extra[i]


def _too_large(path: Path, n_tok: int, n_vocab: int) -> QuantizeError:
    return QuantizeError(
        path,
        f"tokenizer has {n_tok} tokens but the model has only {n_vocab} embedding rows (config vocab_size); "
        "resize the embeddings or fix the tokenizer",
    )


def _sentencepiece(root: Path, n_vocab: int, unembedded: Collection[str]) -> Vocab:
    path = root / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise QuantizeError(path, f"not a SentencePiece model ({exc})") from exc
    proto: Any = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    proto.ParseFromString(sp.serialized_model_proto())
    extra = added_tokens(root)
    _drop_unembedded(extra, n_vocab, unembedded, path)
    n_tok = max([sp.vocab_size() - 1, *extra]) + 1
    if n_tok > n_vocab:
        raise _too_large(path, n_tok, n_vocab)
    # Rows with no token are padding, as llama.cpp's converter writes them.
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(TT.UNUSED)] * n_vocab
    for i, piece in enumerate(proto.pieces):  # SentencePiece's piece types are numbered as GGUF's
        # llama.cpp matches user-defined tokens in the raw text, before spaces become U+2581
        text = piece.piece.replace("\u2581", " ") if piece.type == TT.USER_DEFINED else piece.piece
        tokens[i], scores[i], types[i] = text.encode(), piece.score, int(piece.type)
    for i, (text, special, declared) in sorted(extra.items()):
        if i < sp.vocab_size() and proto.pieces[i].piece == text and not declared:
            # transformers 5 re-lists SentencePiece's own pieces in tokenizer.json: they keep their
            # SentencePiece score and type, except that a piece flagged special is a control token.
            if special and types[i] in (TT.NORMAL, TT.USER_DEFINED):
                tokens[i], types[i] = text.encode(), int(TT.CONTROL)
            continue
        # A declared added token replaces the piece, as in llama.cpp's converter.
        control = special or _looks_special(text)
        tokens[i] = (text if control else text.replace("\u2581", " ")).encode()
        scores[i] = -1000.0
        types[i] = int(TT.CONTROL if control else TT.USER_DEFINED)
    cfg = _json(root / "tokenizer_config.json") if (root / "tokenizer_config.json").is_file() else {}
    prefix = cfg.get("add_prefix_space")
    if prefix is None and not proto.normalizer_spec.add_dummy_prefix:
        prefix = False  # llama.cpp assumes SentencePiece's dummy prefix unless told (Gemma has none)
    sv = gguf.SpecialVocab(root, load_merges=False, n_vocab=n_vocab)
    return Vocab("llama", "default", tokens, scores, types, path, sv, prefix)


def _pre_tokenizer_name(path: Path, pre: dict[str, Any] | None) -> str:
    if not pre:
        raise QuantizeError(path, "BPE tokenizer declares no pre_tokenizer; cannot choose tokenizer.ggml.pre")
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for p in parts:
        if p.get("type") == "Split":
            regex = p.get("pattern", {}).get("Regex")
            if regex in PRE_TOKENIZERS:
                return PRE_TOKENIZERS[regex]
            raise QuantizeError(path, f"pre-tokenizer regex {regex!r} is not one llama.cpp implements; known: "
                                + ", ".join(sorted(set(PRE_TOKENIZERS.values()))))
        if p.get("type") == "ByteLevel" and p.get("use_regex", True):
            return PRE_TOKENIZERS["<gpt2 byte-level>"]
    raise QuantizeError(path, f"unrecognised pre_tokenizer {json.dumps(pre)[:120]}")


def _bpe(root: Path, n_vocab: int, unembedded: Collection[str]) -> Vocab:
    path = root / "tokenizer.json"
    tj = _json(path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise QuantizeError(path, f"tokenizer model {model.get('type')!r} is not supported; supported: SentencePiece (tokenizer.model), BPE")
    pre = _pre_tokenizer_name(path, tj.get("pre_tokenizer"))
    vocab: dict[str, int] = model["vocab"]
    extra = added_tokens(root, tj)
    _drop_unembedded(extra, n_vocab, unembedded, path)
    n_tok = max([*vocab.values(), *extra]) + 1
    if n_tok > n_vocab:
        raise _too_large(path, n_tok, n_vocab)
    tokens = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    types = [int(TT.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text.encode(), int(TT.NORMAL)
    for i, (text, special, _) in extra.items():
        tokens[i] = text.encode()
        types[i] = int(TT.CONTROL if special or _looks_special(text) else TT.USER_DEFINED)
    sv = gguf.SpecialVocab(root, load_merges=True, n_vocab=n_vocab)
    if not sv.merges:
        raise QuantizeError(path, "BPE tokenizer has no merges")
    return Vocab("gpt2", pre, tokens, None, types, path, sv)


def read_vocab(root: Path, n_vocab: int, unembedded: Collection[str] = ()) -> Vocab:
    """The tokenizer of checkpoint folder ``root``, checked against ``n_vocab`` embedding rows
    (added tokens named in ``unembedded`` may lie beyond them and are left out)."""
    if (root / "tokenizer.model").is_file():
        return _sentencepiece(root, n_vocab, unembedded)
    if (root / "tokenizer.json").is_file():
        return _bpe(root, n_vocab, unembedded)
    raise QuantizeError(root, "no tokenizer found (tokenizer.model or tokenizer.json); copy the tokenizer files next to config.json")
