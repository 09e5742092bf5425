"""Calibration and evaluation text: reading it, keeping the two apart, cutting it into token windows.

One implementation for every stage that feeds text to a model: the importance matrix (chunks as
``llama-imatrix`` cuts them), the quality gate (windows as ``llama-perplexity`` cuts them) and the
streamed forward both take the ``(n, ctx)`` array :func:`token_windows` returns.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as Fast

from quantize.errors import QuantizeError
from quantize.formats.checkpoint import read_json_object

# transformers is imported only for a tokenizer the tokenizers library cannot load on its own (seconds to import).

log = logging.getLogger(__name__)

OVERLAP_WARN = 0.10  # fraction of calibration lines also found in the evaluation text


def read_text(path: Path, what: str = "text", hint: str = "") -> str:
    """A UTF-8 text file, or a one-line error naming it (``hint`` says how to pass another)."""
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise QuantizeError(path, f"{what} not found{hint}") from None
    except UnicodeDecodeError as exc:
        raise QuantizeError(path, f"{what} is not UTF-8 (byte {exc.start}); re-encode it") from None


def check_calibration_text(calib: Path, eval_text: Path | None) -> str:
    """Read the calibration text (UTF-8) and refuse calibrating on the evaluation text; warn when the two
    overlap a lot.  Returns the calibration text."""
    text = read_text(calib, "calibration text")
    if eval_text is None:
        return text
    other = read_text(eval_text, "evaluation text", " (--eval-text)")
    if calib.resolve() == eval_text.resolve() or text == other:
        raise QuantizeError(calib, f"is the evaluation text ({eval_text}); calibrate on different text")
    cal = {ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20}
    ev = {ln.strip() for ln in other.splitlines() if len(ln.strip()) > 20}
    if cal and len(cal & ev) / len(cal) > OVERLAP_WARN:
        msg = f"{calib}: {len(cal & ev) / len(cal):.0%} of its lines also appear in {eval_text}; evaluation will flatter the quants"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    return text


@dataclass(frozen=True)
class Tokenizer:
    """A checkpoint's tokenizer for running text: ``encode`` adds no special tokens; ``bos`` is its BOS id or None."""

    encode: Callable[[str], list[int]]
    bos: int | None


def _special(value: Any) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json record it (a string or an AddedToken dict)."""
    return value.get("content") if isinstance(value, dict) else value


def hf_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer of checkpoint ``folder``: its ``tokenizer.json`` in the tokenizers library (what
    transformers' fast tokenizer runs, without transformers' ~0.4 s of loading), BOS named by
    tokenizer_config.json or special_tokens_map.json; transformers' AutoTokenizer when there is no
    tokenizer.json (a SentencePiece model alone)."""
    if not (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return Tokenizer(lambda text: tok(text, add_special_tokens=False, verbose=False)["input_ids"], tok.bos_token_id)

    try:
        fast = Fast.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise QuantizeError(folder / "tokenizer.json", f"not a tokenizer the tokenizers library reads ({exc})") from exc
    bos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file() and (token := _special(read_json_object(folder / name).get("bos_token"))):
            bos = fast.token_to_id(token)
            break
    return Tokenizer(lambda text: fast.encode(text, add_special_tokens=False).ids, bos)


def with_bos(ids: list[int], bos: int | None) -> list[int]:
    """A text's token ids as llama.cpp's tools tokenize a file: the model's BOS first when it has one."""
    return ids if bos is None else [bos, *ids]


def token_windows(ids: list[int], ctx: int, limit: int | None, bos: int | None, text_file: Path, what: str) -> np.ndarray:
    """Consecutive non-overlapping windows of ``ctx`` tokens (at most ``limit``), each starting with BOS
    when the model has one (its first text token is replaced, as llama.cpp's tools do): ``(n, ctx)`` int64."""
    n = len(ids) // ctx
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise QuantizeError(text_file, f"has {len(ids)} tokens, fewer than one {what} of {ctx}; give a longer text")
    tokens = np.array(ids[: n * ctx], dtype=np.int64).reshape(n, ctx)
    if bos is not None:
        tokens[:, 0] = bos
    return tokens
