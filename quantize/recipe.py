"""Release recipes: a model's whole release described in TOML, validated into frozen dataclasses.

Unknown keys, wrong types and missing required keys are refused with the file and the key named
(``recipes/x.toml: [ladder] unknown key 'ggfu'; valid: awq, gguf, imatrix, smooth``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import QuantizeError
from .quant_types import quant_type
from .thresholds import Threshold

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class PromptFormat:
    stop: tuple[str, ...]
    # koboldcpp's chat-completions adapter (its kcpp_adapters/*.json keys): the text around each
    # role's turn, and optionally ``assistant_gen``, the text that opens the reply being generated
    # when it differs from a past reply's ``assistant_start``.
    turns: Mapping[str, str]


def _turns(system: tuple[str, str], user: tuple[str, str], assistant: tuple[str, str], gen: str | None = None) -> dict[str, str]:
    out = {"system_start": system[0], "system_end": system[1], "user_start": user[0], "user_end": user[1],
           "assistant_start": assistant[0], "assistant_end": assistant[1]}
    if gen is not None:
        out["assistant_gen"] = gen
    return out


# Prompt formats a card can document and a koboldcpp preset can carry, as data.
PROMPT_FORMATS: dict[str, PromptFormat] = {
    "chatml": PromptFormat(
        ("<|im_end|>",),
        _turns(("<|im_start|>system\n", "<|im_end|>\n"), ("<|im_start|>user\n", "<|im_end|>\n"),
               ("<|im_start|>assistant\n", "<|im_end|>\n"))),
    # LimaRP's extended Alpaca: past replies read "Character: {utterance}"; only the reply being
    # generated carries the length modifier, and its prompt ends at "Character:" (the model writes the space).
    "alpaca-extended": PromptFormat(
        ("\n### Input", "\nUser:"),
        _turns(("### Instruction:\n", "\n\n"), ("### Input:\nUser: ", "\n\n"),
               ("### Response:\nCharacter: ", "\n\n"), gen="### Response: (length = medium)\nCharacter:")),
    "alpaca": PromptFormat(
        ("\n### Instruction",),
        _turns(("", "\n\n"), ("### Instruction:\n", "\n\n"), ("### Response:\n", "\n\n"))),
    # Gemma has no system role.  As koboldcpp's own Gemma adapters do, the system text is a user turn of
    # its own, closed before the first user message (Gemma's template would merge it into that message).
    "gemma": PromptFormat(
        ("<end_of_turn>",),
        _turns(("<start_of_turn>user\n", "<end_of_turn>\n"), ("<start_of_turn>user\n", "<end_of_turn>\n"),
               ("<start_of_turn>model\n", "<end_of_turn>\n"))),
}


def render_chat(turns: Mapping[str, str], messages: list[dict[str, str]]) -> str:
    """The prompt koboldcpp builds from an adapter for ``/v1/chat/completions`` (``transform_genparams``,
    its non-jinja chat branch): ``chat_start``, each message wrapped in its role's start and end, then
    ``assistant_gen`` (default ``assistant_start``) to open the reply; when the last message is the
    assistant's, the reply is continued instead (koboldcpp's default ``continue_assistant_turn``)."""
    out = turns.get("chat_start", "")
    for m in messages:
        out += turns[f"{m['role']}_start"] + m["content"] + turns[f"{m['role']}_end"]
    gen = turns.get("assistant_gen", turns["assistant_start"])
    if messages and messages[-1]["role"] == "assistant":
        return out[: len(out) - len(turns["assistant_end"])] if turns["assistant_end"] else out
    return out + gen


# A Hub repo id as the Hub accepts it: owner and name of letters, digits, '-', '_', '.', not starting with '-' or '.'.
HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")

# Suggested-settings keys a recipe may use (the names of transformers' GenerationConfig and
# SillyTavern) -> the generation parameter koboldcpp's API and its --gendefaults take.
SAMPLERS: dict[str, str] = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "top_a": "top_a",
    "typical_p": "typical",
    "tfs": "tfs",
    "repetition_penalty": "rep_pen",
    "repetition_penalty_range": "rep_pen_range",
    "presence_penalty": "presence_penalty",
}


@dataclass(frozen=True)
class Card:
    prompt_format: str = "chatml"
    system: str = ""
    context: int = 4096
    stop: tuple[str, ...] = ()
    sampler: Mapping[str, float] = field(default_factory=dict)
    license: str | None = None
    base_model: str | None = None
    description: str = ""
    credits: str = ""
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ladder:
    gguf: tuple[str, ...] = ("F16", "Q6_K", "Q4_K_M")
    awq: bool = True
    imatrix: bool = True
    smooth: bool = True
    split_max_gb: float = 48.0  # GGUFs larger than this ship as llama.cpp split shards (0: never split)
    awq_samples: int = 128  # AutoAWQ's defaults: 128 calibration samples of 512 tokens
    awq_seq_len: int = 512
    imatrix_chunks: int = 64  # calibration chunks of imatrix_ctx tokens (llama-imatrix cuts the same way)
    imatrix_ctx: int = 512
    eval_windows: int = 32  # quality-gate windows of eval_ctx tokens (llama-perplexity's windows)
    eval_ctx: int = 512


@dataclass(frozen=True)
class Recipe:
    source: Path  # the TOML file
    name: str
    base: str  # a folder, "demo:<model>", "real:<model>", or a Hugging Face repo id (quantize.hub)
    quantized_by: str = "quantize"
    hub_repo: str | None = None  # "owner/name" on the Hugging Face Hub the release is published to
    lora: str | None = None
    lora_allow_pickle: bool = False  # adapter_model.bin is a pickle: only with an explicit opt-in
    calibration: str = "demo:calib"
    evaluation: str = "demo:eval"
    ladder: Ladder = field(default_factory=Ladder)
    thresholds: Mapping[str, Threshold] = field(default_factory=dict)
    card: Card = field(default_factory=Card)
    # Hub revisions (commit sha, branch or tag) pinning the repo ids of "base" and/or "lora"
    revision: Mapping[str, str] = field(default_factory=dict)


def _check_keys(path: Path, section: str, data: Mapping[str, Any], cls: type) -> None:
    valid = {f.name for f in fields(cls)} - {"source"}
    for key in data:
        if key not in valid:
            raise QuantizeError(path, f"[{section}] unknown key {key!r}; valid: {', '.join(sorted(valid))}")


def _typed(path: Path, section: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise QuantizeError(path, f"[{section}] {key} must be {names}, got {value!r}")
    return value


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantizeError(path, "recipe not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise QuantizeError(path, f"not valid TOML ({exc})") from None
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    _check_keys(path, "top level", {**top, **{k: v for k, v in data.items() if isinstance(v, dict)}}, Recipe)
    for key in ("name", "base"):
        if key not in data:
            raise QuantizeError(path, f"missing required key {key!r}")
        _typed(path, "top level", key, data[key], str)
    ladder_d = data.get("ladder", {})
    _check_keys(path, "ladder", ladder_d, Ladder)
    gguf = tuple(_typed(path, "ladder", "gguf", ladder_d.get("gguf", list(Ladder.gguf)), list))
    for t in gguf:
        try:
            quant_type(t)
        except QuantizeError as exc:
            raise QuantizeError(path, f"[ladder] gguf: {exc}") from None
    flags = {k: _typed(path, "ladder", k, v, bool) for k, v in ladder_d.items() if k in ("awq", "imatrix", "smooth")}
    for key in ("awq_samples", "awq_seq_len", "imatrix_chunks", "imatrix_ctx", "eval_windows", "eval_ctx"):
        if key in ladder_d:
            flags[key] = _typed(path, "ladder", key, ladder_d[key], int)
            if flags[key] < 1:
                raise QuantizeError(path, f"[ladder] {key} must be a positive integer, got {flags[key]}")
    if "split_max_gb" in ladder_d:
        flags["split_max_gb"] = float(_typed(path, "ladder", "split_max_gb", ladder_d["split_max_gb"], (int, float)))
    ladder = Ladder(gguf=gguf, **flags)
    card_d = dict(data.get("card", {}))
    _check_keys(path, "card", card_d, Card)
    if card_d.get("prompt_format", "chatml") not in PROMPT_FORMATS:
        raise QuantizeError(path, f"[card] prompt_format {card_d['prompt_format']!r} unknown; known: {', '.join(PROMPT_FORMATS)}")
    for key, value in card_d.get("sampler", {}).items():
        if key not in SAMPLERS:
            raise QuantizeError(path, f"[card.sampler] unknown setting {key!r}; known: {', '.join(SAMPLERS)}")
        _typed(path, "card.sampler", key, value, (int, float))
    for key in ("stop", "tags"):
        if key in card_d:
            card_d[key] = tuple(_typed(path, "card", key, card_d[key], list))
    thresholds = {}
    for kind, th in data.get("thresholds", {}).items():
        if not isinstance(th, dict) or set(th) - {"ppl_ratio", "mean_kld"}:
            raise QuantizeError(path, f"[thresholds] {kind} must be {{ ppl_ratio = …, mean_kld = … }}")
        thresholds[kind.upper()] = Threshold(float(th.get("ppl_ratio", 1e9)), float(th.get("mean_kld", 1e9)))
    revision = _revisions(path, data)
    rest = {k: data[k] for k in ("quantized_by", "hub_repo", "lora", "lora_allow_pickle", "calibration", "evaluation") if k in data}
    for k, v in rest.items():
        _typed(path, "top level", k, v, bool if k == "lora_allow_pickle" else str)
    if "hub_repo" in rest and not HUB_REPO.fullmatch(rest["hub_repo"]):
        raise QuantizeError(path, f"hub_repo {rest['hub_repo']!r} is not a Hugging Face repo id; write it as \"owner/name\"")
    return Recipe(source=path, name=data["name"], base=data["base"], ladder=ladder, thresholds=thresholds, card=Card(**card_d),
                  revision=revision, **rest)


def _revisions(path: Path, data: Mapping[str, Any]) -> dict[str, str]:
    """``[revision]``: ``base``/``lora`` -> a Hub revision, only for a part given as a repo id."""
    from .hub import check_revision

    section = data.get("revision", {})
    if not isinstance(section, dict):
        raise QuantizeError(path, "[revision] must be a table: base = \"<commit sha, branch or tag>\", lora = ...")
    out = {}
    for part, rev in section.items():
        if part not in ("base", "lora"):
            raise QuantizeError(path, f"[revision] unknown key {part!r}; valid: base, lora")
        _typed(path, "revision", part, rev, str)
        problem = check_revision(rev)
        if problem:
            raise QuantizeError(path, f"[revision] {part}: {problem}")
        spec = data.get(part)
        if not isinstance(spec, str) or ":" in spec or spec.startswith((".", "/")) or spec.count("/") != 1:
            raise QuantizeError(path, f"[revision] {part}: {part} {spec!r} is not a Hugging Face repo id, so it has no revision")
        out[part] = rev
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m quantize.recipe RECIPE``: the recipe's GGUF quantizations (its ladder's types but
    F16) as a JSON list on one line; the standard library is all it needs, so a CI job can plan its
    matrix before installing anything."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m quantize.recipe", description=main.__doc__)
    ap.add_argument("recipe", type=Path)
    a = ap.parse_args(argv)
    try:
        recipe = load_recipe(a.recipe)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([t for t in recipe.ladder.gguf if t != "F16"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
