"""``quantize init SOURCE``: a release recipe written from what a checkpoint (or a LoRA adapter) states.

Each value says where it was read (config.json, the chat template, generation_config.json, the model
card's front matter); what could not be read is a commented line saying what to fill in.  The recipe
is loaded back with :func:`quantize.recipe.load_recipe` before it is published, so ``quantize build``
accepts what ``init`` writes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from quantize.atomic import atomic_file
from quantize.chat_template import PROBE, read_chat_template, recognise
from quantize.errors import QuantizeError
from quantize.formats.checkpoint import read_json_object
from quantize.models.hub import fetch, snapshot_revision
from quantize.recipe import HUB_REPO, PROMPT_FORMATS, SAMPLERS, TURN_KEYS, TURN_OPTIONAL, Ladder, load_recipe
from quantize.sources import SCHEMES, resolve

# huggingface_hub's model-card reader is imported only to read a card's front matter (it imports yaml).

WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class Lines:
    """A recipe as TOML lines: each value with the file it was read from, each gap as a commented line."""

    out: list[str] = field(default_factory=list)

    def value(self, key: str, value: Any, origin: str) -> None:
        self.out.append(f"{key} = {_toml(value)}" + (f"  # {origin}" if origin else ""))

    def gap(self, key: str, example: Any, what: str) -> None:
        self.out.append(f"# {key} = {_toml(example)}  # {what}")

    def section(self, name: str, note: str = "") -> None:
        self.out.extend(["", f"[{name}]" + (f"  # {note}" if note else "")])


def _toml(value: Any) -> str:
    """A TOML value: strings as basic strings (JSON's escapes are TOML's), lists inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


@dataclass(frozen=True)
class Source:
    spec: str  # what the recipe writes for it
    folder: Path  # where its files are
    revision: str | None  # the Hub commit it resolved to


def _resolve(spec: str, recipe: Path, root: Path, what: str) -> Source:
    """``spec`` (a folder, a ``demo:``/``real:`` reference or a Hub repo id) as ``build`` resolves it."""
    local = Path(spec).expanduser()
    if local.exists():
        folder = local.resolve()
        return Source(_path_spec(folder, recipe), folder, None)
    if any(spec.startswith(s) for s in SCHEMES):
        return Source(spec, resolve(spec, recipe, root, what), None)
    if HUB_REPO.fullmatch(spec):
        folder = fetch(spec, what, recipe)
        return Source(spec, folder, snapshot_revision(folder))
    raise QuantizeError(Path(spec), "no such folder, and not a Hugging Face repo id (owner/name) or demo:/real: reference")


def _path_spec(folder: Path, recipe: Path) -> str:
    """A folder as the recipe names it: relative to the recipe's folder when inside it, else absolute."""
    rel = os.path.relpath(folder, recipe.resolve().parent)
    return folder.as_posix() if rel.startswith("..") else Path(rel).as_posix()


def _check_checkpoint(folder: Path) -> str:
    """``"base"`` or ``"lora"``: what ``folder`` is, or the one-line refusal."""
    if not folder.is_dir():
        raise QuantizeError(folder, "is not a folder; give a Hugging Face checkpoint folder, an adapter folder or a repo id")
    if (folder / "adapter_config.json").is_file():
        return "lora"
    if not (folder / "config.json").is_file():
        raise QuantizeError(folder, "is not a Hugging Face checkpoint (no config.json) nor a PEFT adapter (no adapter_config.json)")
    archs = read_json_object(folder / "config.json").get("architectures")
    if not isinstance(archs, list) or not archs:
        raise QuantizeError(folder / "config.json", "names no model class (\"architectures\"); is this a model's config.json?")
    if not any(any(folder.glob(w)) for w in WEIGHTS):
        raise QuantizeError(folder, "has a config.json but no weights (*.safetensors); the checkpoint is incomplete")
    return "base"


def _front_matter(folder: Path) -> dict[str, Any]:
    """The model card's YAML front matter (README.md), or {}."""
    card = folder / "README.md"
    if not card.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        data = metadata_load(card)
    except Exception as exc:  # yaml's errors
        raise QuantizeError(card, f"its front matter is not valid YAML ({str(exc).splitlines()[0]})") from None
    return data or {}


def _card_value(card: dict[str, Any], key: str) -> Any:
    """A front-matter value a recipe can take: a string (a one-item list's item), or for tags a list of strings;
    None where there is none (a local path as base_model, the Hub's own ``base_model:`` tags)."""
    v = card.get(key)
    if key == "tags":
        tags = [t for t in v or () if isinstance(t, str) and not t.startswith("base_model:")] if isinstance(v, list) else []
        return tags or None
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    return v if isinstance(v, str) and v and not (key == "base_model" and Path(v).is_absolute()) else None


def _name(spec: str, folder: Path) -> str:
    """A release name from a repo id's or folder's last part, as file names can carry it."""
    last = spec.rstrip("/").split("/")[-1].split(":")[-1] or folder.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.") or "model"


def write_recipe(spec: str, out: Path | None = None, name: str | None = None, root: Path = Path("artifacts/demo"),
                 force: bool = False) -> Path:
    """Write the recipe for ``spec`` to ``out`` (default ``<name>.toml``) and return its path."""
    probe = out or Path("recipe.toml")
    src = _resolve(spec, probe, root, "base")
    kind = _check_checkpoint(src.folder)
    lora = None
    if kind == "lora":
        adapter_cfg = read_json_object(src.folder / "adapter_config.json")
        base_spec = adapter_cfg.get("base_model_name_or_path")
        if not isinstance(base_spec, str) or not base_spec:
            raise QuantizeError(src.folder / "adapter_config.json", "names no base model (base_model_name_or_path)")
        lora, src = src, _resolve(base_spec, probe, root, "base")
        if _check_checkpoint(src.folder) != "base":
            raise QuantizeError(src.folder, "the adapter's base is itself an adapter")
    name = name or _name(lora.spec if lora else src.spec, (lora or src).folder)
    out = out or Path(f"{name}.toml")
    if out.exists() and not force:
        raise QuantizeError(out, "exists; pass --force to replace it or -o to write elsewhere")
    lines = _recipe_lines(name, src, lora, out)
    with atomic_file(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        load_recipe(tmp)  # what build will read: a value init wrote that the schema refuses is a bug here, not a recipe
    return out


def _recipe_lines(name: str, base: Source, lora: Source | None, out: Path) -> list[str]:
    first = lora or base  # the adapter's own files (template, card) come first
    r = Lines([f"# Release recipe written by `quantize init` from {first.spec}.",
               "# Each value says where it was read; a commented line is what could not be read: fill it in or leave it.",
               f"# Then: quantize build {out}"])
    r.value("name", name, "from the source's name")
    r.value("base", base.spec, "the fp16/bf16 checkpoint")
    if lora:
        r.value("lora", lora.spec, "a PEFT LoRA adapter, merged into the base in fp16 before export")
    r.gap("quantized_by", "your name", "shown on the model card (default: quantize)")
    r.gap("hub_repo", f"you/{name}-GGUF", "the Hub repo `quantize publish` uploads the release to")
    r.out.append("# calibration = \"calibration.txt\"  # default: the general text (prose, code, chat in this model's template, "
                 "numbers, markup, languages)")
    r.out.append("# evaluation = \"evaluation.txt\"    # default: the general evaluation text, disjoint from the calibration text")
    pins = {w: s.revision for w, s in (("base", base), ("lora", lora)) if s is not None and s.revision}
    if pins:
        r.section("revision", "the Hub commits resolved when this recipe was written")
        for what, rev in pins.items():
            r.value(what, rev, "")

    r.section("ladder", "the default ladder")
    defaults = Ladder()
    for f in fields(Ladder):
        if f.name in ("gguf", "awq", "imatrix", "smooth"):
            r.value(f.name, getattr(defaults, f.name), "")
    r.gap("gguf", [*defaults.gguf, {"budget": "Q4_K_M"}], "a searched per-tensor mix at Q4_K_M's size, gated against Q4_K_M")

    r.section("card")
    _card_lines(r, base, lora)
    return r.out


def _card_lines(r: Lines, base: Source, lora: Source | None) -> None:
    folders = [s.folder for s in (lora, base) if s is not None]
    template = next((t for f in folders if (t := read_chat_template(f)) is not None), None)
    stop: tuple[str, ...] = ()
    if template is None:
        r.gap("prompt_format", "chatml", f"the checkpoint has no chat template: name the format it was trained on "
              f"({', '.join(PROMPT_FORMATS)}), or \"custom\" with [card.turns]")
    elif (known := recognise(template)) is None:
        r.out.append(f"# {template.where.name}'s chat template matches no known format and cannot be read as turns; "
                     "it renders this conversation:")
        shown = template.renders(PROBE) or template.renders(PROBE[1:]) or "(it refuses a plain conversation)"
        r.out.extend("#   " + ln for ln in shown.splitlines())
        r.gap("prompt_format", "chatml", f"the format that renders it ({', '.join(PROMPT_FORMATS)}), or \"custom\" with [card.turns]")
    else:
        stop = known.fmt.stop
        r.value("prompt_format", known.name or "custom", f"{template.where.name}: {known.note}")
    cfg = read_json_object(base.folder / "config.json")
    text_cfg = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    ctx = text_cfg.get("max_position_embeddings")
    if isinstance(ctx, int) and ctx > 0:
        r.value("context", ctx, "config.json: max_position_embeddings")
    else:
        r.gap("context", 4096, "config.json states no max_position_embeddings: the context the model was trained at")
    if stop:
        r.value("stop", list(stop), "the chat template's end of turn")
    else:
        r.gap("stop", ["</s>"], "the text that ends a reply")
    r.gap("system", "You are a helpful assistant.", "the system prompt the presets start a chat with")
    cards = [(f"the {who} README.md front matter", _front_matter(s.folder))
             for who, s in (("adapter's", lora), ("base's" if lora else "model's", base)) if s is not None]
    for key, example in (("license", "apache-2.0"), ("base_model", "owner/base-model"), ("tags", ["roleplay"])):
        found = [(name, v) for name, card in cards if (v := _card_value(card, key)) is not None]
        if found:
            r.value(key, found[0][1], found[0][0])
        else:
            r.gap(key, example, f"no {key} in {' or '.join(name for name, _ in cards)}")
    r.gap("description", "One paragraph on what the model is for.", "the model card's opening")
    gen_path = base.folder / "generation_config.json"
    gen = read_json_object(gen_path) if gen_path.is_file() else {}
    sampler = {k: gen[k] for k in SAMPLERS if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)}
    if gen.get("do_sample") and sampler:
        r.section("card.sampler", "generation_config.json: the model's own sampling defaults")
        for k, v in sampler.items():
            r.value(k, v, "")
    else:
        r.out.append("# [card.sampler] temperature = 0.7 ...  # generation_config.json gives no sampling defaults")
    if template is not None and known is not None and known.name is None:
        r.section("card.turns", "read from the chat template (prompt_format = \"custom\")")
        for k in (*TURN_KEYS, *TURN_OPTIONAL):
            if k in known.fmt.turns:
                r.value(k, known.fmt.turns[k], "")
