"""Release recipes: a model's whole release described in TOML, validated into frozen dataclasses.

One schema: each key's type is its dataclass annotation and its range the field's metadata, checked
by one function, so unknown keys, wrong types, values out of range and missing required keys are
refused with the file, the section and the key named
(``recipes/x.toml: [ladder] unknown key 'ggfu'; valid: awq, gguf, imatrix, smooth``).
"""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from quantize.budget import parse_budget
from quantize.errors import QuantizeError
from quantize.models.hub import check_revision
from quantize.quant_types import quant_type
from quantize.thresholds import Threshold

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
    "llama3": PromptFormat(
        ("<|eot_id|>",),
        _turns(("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
               ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"))),
    # Mistral-Instruct's [INST] template (v0.1/v0.2) has no system role: the system text is an [INST] turn of its own.
    "mistral": PromptFormat(
        ("</s>", "[INST]"),
        _turns(("[INST] ", " [/INST]"), ("[INST] ", " [/INST]"), ("", "</s>"))),
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


TURN_KEYS = ("system_start", "system_end", "user_start", "user_end", "assistant_start", "assistant_end")
TURN_OPTIONAL = ("assistant_gen", "chat_start")


@dataclass(frozen=True)
class Card:
    prompt_format: str = "chatml"  # a PROMPT_FORMATS row, or "custom" with [card.turns]
    system: str = ""
    context: int = field(default=4096, metadata={"min": 1})  # tokens
    stop: tuple[str, ...] = ()
    sampler: Mapping[str, float] = field(default_factory=dict)
    license: str | None = None
    base_model: str | None = None
    description: str = ""
    credits: str = ""
    tags: tuple[str, ...] = ()
    turns: Mapping[str, str] = field(default_factory=dict)  # prompt_format = "custom": the text around each turn

    @property
    def format(self) -> PromptFormat:
        """The prompt format the card names, or its own turns under ``prompt_format = "custom"``."""
        if self.prompt_format == "custom":
            return PromptFormat(self.stop, self.turns)
        return PROMPT_FORMATS[self.prompt_format]


@dataclass(frozen=True)
class Ladder:
    gguf: tuple[str, ...] = ("F16", "Q6_K", "Q4_K_M")
    # searched mixes, written in gguf as tables: gguf = ["Q4_K_M", { budget = "Q4_K_M" }, { budget = "3.5GB" }]
    budgets: tuple[str, ...] = ()
    awq: bool = True
    imatrix: bool = True
    smooth: bool = True
    # GGUFs larger than this ship as llama.cpp split shards (0: never split)
    split_max_gb: float = field(default=48.0, metadata={"min": 0})
    # AutoAWQ's defaults: 128 calibration samples of 512 tokens
    awq_samples: int = field(default=128, metadata={"min": 1})
    awq_seq_len: int = field(default=512, metadata={"min": 2})
    # calibration chunks of imatrix_ctx tokens (llama-imatrix cuts the same way)
    imatrix_chunks: int = field(default=64, metadata={"min": 1})
    imatrix_ctx: int = field(default=512, metadata={"min": 1})
    # quality-gate windows of eval_ctx tokens (llama-perplexity's windows)
    eval_windows: int = field(default=32, metadata={"min": 1})
    eval_ctx: int = field(default=512, metadata={"min": 2})


@dataclass(frozen=True)
class Recipe:
    source: Path  # the TOML file
    name: str
    base: str  # a folder, "demo:<model>", "real:<model>", or a Hugging Face repo id (quantize.models.hub)
    quantized_by: str = "quantize"
    hub_repo: str | None = None  # "owner/name" on the Hugging Face Hub the release is published to
    lora: str | None = None
    lora_allow_pickle: bool = False  # adapter_model.bin is a pickle: only with an explicit opt-in
    calibration: str = "general:calib"  # the general text (quantize.models.general_text)
    evaluation: str = "general:eval"
    ladder: Ladder = field(default_factory=Ladder)
    thresholds: Mapping[str, Threshold] = field(default_factory=dict)
    card: Card = field(default_factory=Card)
    # Hub revisions (commit sha, branch or tag) pinning the repo ids of "base" and/or "lora"
    revision: Mapping[str, str] = field(default_factory=dict)


# --- the schema: every key's type comes from the dataclass annotations, its range from field metadata ---


def _number_ok(value: Any, meta: Mapping[str, Any]) -> bool:
    return value >= meta.get("min", float("-inf")) and value > meta.get("gt", float("-inf"))


def _check(path: Path, section: str, key: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` as ``hint`` wants it (a list becomes a tuple), or the one-line error naming section and key."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(h for h in typing.get_args(hint) if h is not type(None))  # TOML has no null
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad(want: str) -> QuantizeError:
        return QuantizeError(path, f"[{section}] {key} must be {want}, got {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if hint in (int, float):
        ok_type = isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
        want = ("an integer" if hint is int else "a number") + "".join(
            f" {op} {meta[k]}" for k, op in (("min", ">="), ("gt", ">")) if k in meta)
        if not ok_type or value != value or not _number_ok(value, meta):  # value != value: nan
            raise bad(want)
        return hint(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise bad(f"a list of {args[0].__name__}")
        return tuple(_check(path, section, f"{key}[{i}]", v, args[0], {}) for i, v in enumerate(value))
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise bad("a table")
        return {k: _check(path, f"{section}.{key}", k, v, args[1], meta) for k, v in value.items()}
    raise TypeError(f"recipe schema: no rule for {hint!r}")  # a new field type needs a rule here


def _section(path: Path, section: str, data: Any, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of one TOML table checked against ``cls``'s fields: unknown keys refused, each value typed
    and range-checked by its annotation and metadata; fields in ``skip`` are left to the caller."""
    if not isinstance(data, dict):
        raise QuantizeError(path, f"[{section}] must be a table")
    hints = typing.get_type_hints(cls)
    spec = {f.name: f for f in fields(cls) if f.name != "source"}
    out = {}
    for key, value in data.items():
        if key not in spec:
            raise QuantizeError(path, f"[{section}] unknown key {key!r}; valid: {', '.join(sorted(spec))}")
        if key not in skip:
            out[key] = _check(path, section, key, value, hints[key], spec[key].metadata)
    return out


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise QuantizeError(path, "recipe not found") from None
    except UnicodeDecodeError as exc:
        raise QuantizeError(path, f"not UTF-8 (byte {exc.start}); a recipe is a UTF-8 TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise QuantizeError(path, f"not valid TOML ({exc})") from None
    top = _section(path, "top level", data, Recipe, skip=("ladder", "card", "thresholds", "revision"))
    for key in ("name", "base"):
        if key not in data:
            raise QuantizeError(path, f"missing required key {key!r}")
    ladder_in = data.get("ladder", {})
    if isinstance(ladder_in, dict) and isinstance(ladder_in.get("gguf"), list):
        ladder_in = {**ladder_in, "gguf": [t for t in ladder_in["gguf"] if not isinstance(t, dict)],
                     "budgets": _budgets(path, [t for t in ladder_in["gguf"] if isinstance(t, dict)])}
    ladder_d = _section(path, "ladder", ladder_in, Ladder)
    for t in ladder_d.get("gguf", ()):
        try:
            quant_type(t)
        except QuantizeError as exc:
            raise QuantizeError(path, f"[ladder] gguf: {exc}") from None
    card_d = _section(path, "card", data.get("card", {}), Card)
    _check_format(path, card_d)
    for key in card_d.get("sampler", {}):
        if key not in SAMPLERS:
            raise QuantizeError(path, f"[card.sampler] unknown setting {key!r}; known: {', '.join(SAMPLERS)}")
    thresholds = {}
    for kind, th in _section_of_tables(path, "thresholds", data.get("thresholds", {})).items():
        checked = _section(path, f"thresholds.{kind}", th, Threshold)  # missing: that metric is not gated
        thresholds[kind.upper()] = Threshold(**{"ppl_ratio": 1e9, "mean_kld": 1e9, **checked})
    if "hub_repo" in top and not HUB_REPO.fullmatch(top["hub_repo"]):
        raise QuantizeError(path, f"hub_repo {top['hub_repo']!r} is not a Hugging Face repo id; write it as \"owner/name\"")
    return Recipe(source=path, ladder=Ladder(**ladder_d), thresholds=thresholds, card=Card(**card_d),
                  revision=_revisions(path, data), **top)


def _check_format(path: Path, card: Mapping[str, Any]) -> None:
    """``prompt_format`` names a row, or is "custom" with every turn and a stop string."""
    fmt, turns = card.get("prompt_format", "chatml"), card.get("turns", {})
    if fmt != "custom":
        if fmt not in PROMPT_FORMATS:
            raise QuantizeError(path, f"[card] prompt_format {fmt!r} unknown; known: {', '.join(PROMPT_FORMATS)}, custom")
        if turns:
            raise QuantizeError(path, f"[card.turns] is for prompt_format = \"custom\"; prompt_format {fmt!r} has its own")
        return
    missing = [k for k in TURN_KEYS if k not in turns]
    unknown = [k for k in turns if k not in (*TURN_KEYS, *TURN_OPTIONAL)]
    if missing or unknown:
        raise QuantizeError(path, f"[card.turns] {'lacks ' + ', '.join(missing) if missing else 'unknown key ' + ', '.join(unknown)}; "
                            f"keys: {', '.join((*TURN_KEYS, *TURN_OPTIONAL))}")
    if not card.get("stop"):
        raise QuantizeError(path, "[card] prompt_format = \"custom\" needs stop = [...] (the text that ends a reply)")


def _budgets(path: Path, entries: list[dict[str, Any]]) -> list[str]:
    """The ``{ budget = "..." }`` entries of ``[ladder] gguf``, each checked, in order, once each."""
    out: list[str] = []
    for e in entries:
        if set(e) != {"budget"} or not isinstance(e["budget"], str):
            raise QuantizeError(path, f"[ladder] gguf: a table entry is {{ budget = \"Q4_K_M\" }} (a size, bits per weight "
                                f"or a type name), got {e!r}")
        b = parse_budget(e["budget"], path).text
        if b in out:
            raise QuantizeError(path, f"[ladder] gguf: budget {b} is listed twice")
        out.append(b)
    return out


def _section_of_tables(path: Path, section: str, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise QuantizeError(path, f"[{section}] must hold one table per type, e.g. [{section}.Q4_K_M] ppl_ratio = 1.05")
    return data


def _revisions(path: Path, data: Mapping[str, Any]) -> dict[str, str]:
    """``[revision]``: ``base``/``lora`` -> a Hub revision, only for a part given as a repo id."""
    section = data.get("revision", {})
    if not isinstance(section, dict):
        raise QuantizeError(path, "[revision] must be a table: base = \"<commit sha, branch or tag>\", lora = ...")
    out = {}
    for part, rev in section.items():
        if part not in ("base", "lora"):
            raise QuantizeError(path, f"[revision] unknown key {part!r}; valid: base, lora")
        _check(path, "revision", part, rev, str, {})
        problem = check_revision(rev)
        if problem:
            raise QuantizeError(path, f"[revision] {part}: {problem}")
        spec = data.get(part)
        if not isinstance(spec, str) or ":" in spec or spec.startswith((".", "/")) or spec.count("/") != 1:
            raise QuantizeError(path, f"[revision] {part}: {part} {spec!r} is not a Hugging Face repo id, so it has no revision")
        out[part] = rev
    return out
