"""Hostile input across every command, run as a user runs them (``python -m quantize ...``).

Each case of :data:`CASES` is a command line, the exit status it must end with, the file its one
message must name, and the folder that must be byte-for-byte unchanged afterwards.  Then faults:
two writers of one output, and SIGKILL at a random point followed by a rerun (``kill.py``: the random
choices are seeded, the seed printed; rerun a failure with ``QUANTIZE_TEST_SEED=<seed>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MakeTemp, copy_checkpoint
from kill import cli, killed_then_rerun, partials

from quantize.engine.lora import train_demo_lora
from quantize.formats.gguf_read import read_header
from quantize.models.demo import Demo


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``folder`` (links not followed): kind or size, and content hash."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = (-1, os.readlink(p))
        elif p.is_file():
            out[rel] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = (0, "dir")
    return out


@dataclass
class Workspace:
    root: Path
    f16: Path
    imatrix: Path
    hf: Path
    calib: Path
    eval: Path
    latin1: Path
    short: Path  # header's tensor count one short
    release: Path
    adapter: Path
    demo: Demo


def _short_count(src: Path, out: Path) -> Path:
    shutil.copyfile(src, out)
    with open(out, "r+b") as f:
        f.seek(8)
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8)
        f.write(struct.pack("<Q", n - 1))
    return out


def _release(root: Path) -> Path:
    """A release folder as verify reads it: one listed file and its manifest."""
    root.mkdir()
    data = b"GGUF" + bytes(100)
    (root / "m.Q4_K_M.gguf").write_bytes(data)
    entry = {"name": "m.Q4_K_M.gguf", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (root / "manifest.json").write_text(json.dumps({"artifacts": [{"files": [entry]}]}))
    return root


@pytest.fixture(scope="module")
def ws(demo: Demo, ladder, module_mktemp: MakeTemp) -> Workspace:  # type: ignore[no-untyped-def]
    root = module_mktemp("hostile")
    f16 = root / "m.F16.gguf"
    shutil.copyfile(ladder.f16, f16)
    imatrix = root / "m.imatrix.gguf"
    shutil.copyfile(ladder.imatrix, imatrix)
    calib, ev = root / "calib.txt", root / "eval.txt"
    shutil.copyfile(demo.text["calib"], calib)
    shutil.copyfile(demo.text["eval"], ev)
    latin1 = root / "latin1.txt"
    latin1.write_bytes("Wherefore art thou, Roméo? ".encode("latin-1") * 400)
    return Workspace(root, f16, imatrix, copy_checkpoint(demo.spm, root / "hf"), calib, ev, latin1,
                     _short_count(f16, root / "short.gguf"), _release(root / "release"),
                     train_demo_lora(demo.spm, demo.text["train"], demo.root / "lora"), demo)


def _recipe(ws: Workspace, tmp: Path, **edits: str) -> Path:
    """The demo recipe with some lines replaced (``key=new line``)."""
    lines = (Path(__file__).parent.parent / "recipes" / "demo.toml").read_text().splitlines()
    for key, new in edits.items():
        lines = [new if ln.split("=")[0].strip() == key else ln for ln in lines]
    out = tmp / "recipe.toml"
    out.write_text("\n".join(lines) + "\n")
    return out


def _tampered_release(ws: Workspace, tmp: Path, how: str) -> Path:
    rel = tmp / "rel"
    shutil.copytree(ws.release, rel)
    if how == "symlink":  # an identical copy outside the folder, linked in
        outside = tmp / "outside.gguf"
        shutil.copyfile(rel / "m.Q4_K_M.gguf", outside)
        (rel / "m.Q4_K_M.gguf").unlink()
        (rel / "m.Q4_K_M.gguf").symlink_to(outside)
    elif how == "dotdot":
        m = json.loads((rel / "manifest.json").read_text())
        m["artifacts"][0]["files"][0]["name"] = "../outside.gguf"
        (rel / "manifest.json").write_text(json.dumps(m))
    elif how == "no-artifacts":
        (rel / "manifest.json").write_text(json.dumps({"name": "x"}))
    return rel


# A case: (command line, exit status, the path the message names, the folder that must not change).
Case = Callable[[Workspace, Path], tuple[list[str | Path], int, Path, Path]]

CASES: dict[str, Case] = {
    # data loss and wrong output
    "gguf: output is the input": lambda w, t: (["gguf", w.f16, "--type", "Q8_0", "-o", w.f16], 2, w.f16, w.root),
    "gguf: output is a hard link of the input": lambda w, t: (
        ["gguf", w.f16, "--type", "Q8_0", "-o", _hardlink(w.f16, t)], 2, t / "link.gguf", w.root),
    "gguf: output is the imatrix": lambda w, t: (
        ["gguf", w.f16, "--type", "Q4_K_M", "--imatrix", w.imatrix, "-o", w.imatrix], 2, w.imatrix, w.root),
    "gguf: header's tensor count one short": lambda w, t: (
        ["gguf", w.short, "--type", "Q8_0", "-o", t / "q.gguf"], 2, w.short, t),
    "inspect: header's tensor count one short": lambda w, t: (["inspect", w.short], 2, w.short, w.root),
    "awq: output is an existing file": lambda w, t: (
        ["awq", w.hf, "--method", "rtn", "-o", w.calib], 2, w.calib, w.root),
    "awq: output folder holds the input": lambda w, t: (["awq", w.hf, "--method", "rtn", "-o", w.root], 2, w.root, w.root),
    "merge: output is the base": lambda w, t: (["merge", w.hf, w.adapter, "-o", w.hf], 2, w.hf, w.root),
    "convert: output overwrites a file of the input": lambda w, t: (
        ["convert", w.hf, "-o", w.hf / "config.json"], 2, w.hf / "config.json", w.root),
    "smooth: rescaled imatrix over the input imatrix": lambda w, t: (
        ["smooth", w.f16, "--imatrix", w.imatrix, "-o", t / "s.gguf", "--imatrix-out", w.imatrix], 2, w.imatrix, w.root),
    "verify: a listed file is a symlink to an identical copy": lambda w, t: (
        ["verify", _tampered_release(w, t, "symlink")], 4, t / "rel", t / "rel"),
    "verify: a manifest name leaves the folder": lambda w, t: (
        ["verify", _tampered_release(w, t, "dotdot")], 4, t / "rel", t / "rel"),
    # tracebacks that must be one line
    "gguf: output is a folder": lambda w, t: (["gguf", w.f16, "--type", "Q8_0", "-o", t], 2, t, w.root),
    "imatrix: output is a folder": lambda w, t: (["imatrix", w.hf, "--text", w.calib, "-o", t], 2, t, w.root),
    "convert: output is a folder": lambda w, t: (["convert", w.hf, "-o", t], 2, t, w.root),
    "gguf: output's parent is a file": lambda w, t: (
        ["gguf", w.f16, "--type", "Q8_0", "-o", w.calib / "q.gguf"], 2, w.calib, w.root),
    "imatrix: --eval-text missing": lambda w, t: (
        ["imatrix", w.hf, "--text", w.calib, "--eval-text", t / "nope.txt", "-o", t / "i.gguf"], 2, t / "nope.txt", w.root),
    "imatrix: --eval-text not UTF-8": lambda w, t: (
        ["imatrix", w.hf, "--text", w.calib, "--eval-text", w.latin1, "-o", t / "i.gguf"], 2, w.latin1, w.root),
    "imatrix: --text not UTF-8": lambda w, t: (["imatrix", w.hf, "--text", w.latin1, "-o", t / "i.gguf"], 2, w.latin1, w.root),
    "imatrix: empty text": lambda w, t: (["imatrix", w.hf, "--text", _empty(t), "-o", t / "i.gguf"], 2, t / "empty.txt", w.root),
    "eval: --max with one number": lambda w, t: (
        ["eval", w.f16, "--reference", w.f16, "--text", w.eval, "--max", "Q4_K_M=1.06", "--out-dir", t / "e"], 2,
        Path("--max"), w.root),
    "eval: --json is a folder": lambda w, t: (
        ["eval", w.f16, "--reference", w.f16, "--text", w.eval, "--json", t, "--out-dir", t / "e"], 2, t, w.root),
    "eval: text not UTF-8": lambda w, t: (
        ["eval", w.f16, "--reference", w.f16, "--text", w.latin1, "--out-dir", t / "e", "--cache", t / "c"], 2, w.latin1, w.root),
    "build: threshold of the wrong type": lambda w, t: (
        ["build", _recipe(w, t, **{"[card.sampler]": '[thresholds.Q4_K_M]\nppl_ratio = "tight"\n[card.sampler]'}),
         "--artifacts", t / "a", "--demo-root", w.demo.root.parent], 2, t / "recipe.toml", w.root),
    "build: card context of the wrong type": lambda w, t: (
        ["build", _recipe(w, t, context='context = "4k"'), "--artifacts", t / "a", "--demo-root", w.demo.root.parent], 2,
        t / "recipe.toml", w.root),
    "build: --artifacts is a file": lambda w, t: (
        ["build", "--artifacts", w.calib, "--demo-root", w.demo.root.parent], 2, w.calib, w.root),
    "verify: manifest without artifacts": lambda w, t: (
        ["verify", _tampered_release(w, t, "no-artifacts")], 2, t / "rel" / "manifest.json", t / "rel"),
}


def _hardlink(src: Path, tmp: Path) -> Path:
    os.link(src, tmp / "link.gguf")
    return tmp / "link.gguf"


def _empty(tmp: Path) -> Path:
    (tmp / "empty.txt").write_text("")
    return tmp / "empty.txt"


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input(case: str, ws: Workspace, tmp_path: Path) -> None:
    args, status, named, unchanged = CASES[case](ws, tmp_path)
    before, before_ws = _snapshot(unchanged), _snapshot(ws.root)
    res = cli(*args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == status, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines and all(ln.startswith("quantize: ") for ln in lines), res.stderr[-3000:]
    if status == 2:
        assert len(lines) == 1, res.stderr[-3000:]
    assert str(named) in lines[0], res.stderr
    assert _snapshot(unchanged) == before
    assert _snapshot(ws.root) == before_ws
    assert not partials(tmp_path) and not partials(ws.root)


def test_verify_names_the_unsafe_entries(ws: Workspace, tmp_path: Path) -> None:
    """The symlink and the ``../`` name are reported as unsafe (not as missing), and nothing outside is read."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = cli("verify", _tampered_release(ws, tmp_path / "a", "symlink"))
    assert "unsafe: m.Q4_K_M.gguf (a symbolic link" in link.stderr and "missing" not in link.stderr, link.stderr
    dotdot = cli("verify", _tampered_release(ws, tmp_path / "b", "dotdot"))
    assert "unsafe: ../outside.gguf (leaves the release folder)" in dotdot.stderr, dotdot.stderr
    assert "extra: m.Q4_K_M.gguf" in dotdot.stderr  # the file the manifest no longer lists


def test_two_writers_of_one_output(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "q.gguf"
    procs = [subprocess.Popen([sys.executable, "-m", "quantize", "gguf", str(ws.f16), "--type", "Q8_0", "-o", str(out)],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
    for rc, err in results:
        assert rc == 0 or (rc == 2 and len(err.strip().splitlines()) == 1), err
    assert any(rc == 0 for rc, _ in results)
    assert read_header(out).tensors.keys() == read_header(ws.f16).tensors.keys()
    assert not partials(tmp_path)


def _gguf_of_type(qtype: str) -> Callable[[Path], bool]:
    return lambda p: read_header(p).kv.get("quantize.gguf.type") == qtype


def test_sigkill_gguf_then_rerun(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "q.gguf"
    killed_then_rerun(["gguf", ws.f16, "--type", "Q4_K_M", "--imatrix", ws.imatrix, "--smooth", "-o", out], out, tmp_path,
                      1.5, _gguf_of_type("Q4_K_M"))


def test_sigkill_imatrix_then_rerun(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "i.gguf"
    killed_then_rerun(["imatrix", ws.hf, "--text", ws.calib, "--chunks", "16", "-o", out], out, tmp_path, 6.0,
                      lambda p: read_header(p).kv.get("general.type") == "imatrix", mid_write=False)


def _awq_loads_like_fp16(hf: Path, text: Path) -> Callable[[Path], bool]:
    """Whether an AWQ folder is whole, as a downloader loads it: its index maps exactly the tensors its
    shards hold to those shards (every shard whole), it loads back as the source's model with every
    tensor (``load_awq_as_float``, as test_awq), and its logits on one held-out window are those of the
    fp16 model within test_awq's bounds (relative error < 0.05, top-1 agreement > 0.95)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantize.awq import load_awq_as_float
    from quantize.errors import QuantizeError
    from quantize.formats.checkpoint import read_shard_header

    tok = AutoTokenizer.from_pretrained(hf)
    x = torch.tensor([[tok.bos_token_id, *tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:255]]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(input_ids=x).logits[0]

    def valid(folder: Path) -> bool:
        try:
            index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
            held = {t.name: s.name for s in sorted(folder.glob("*.safetensors")) for t in read_shard_header(s).tensors}
            if index != held:
                print(f"{folder}: the index and the shards differ: {sorted(set(index.items()) ^ set(held.items()))[:5]}")
                return False
            model = load_awq_as_float(folder)
            with torch.no_grad():
                logits = model(input_ids=x).logits[0]
        except (OSError, KeyError, ValueError, RuntimeError, QuantizeError) as e:
            print(f"{folder}: does not load: {e}")
            return False
        rel = float((logits - ref).norm() / ref.norm())
        agree = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        print(f"{folder.name}: logits vs fp16: relative error {rel:.4f}, top-1 agreement {agree:.3f}")
        return rel < 0.05 and agree > 0.95

    return valid


def test_sigkill_awq_then_rerun(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "awq"
    valid = _awq_loads_like_fp16(ws.hf, ws.eval)
    killed_then_rerun(["awq", ws.hf, "--calib", ws.calib, "--samples", "4", "--seq-len", "128", "-o", out], out, tmp_path,
                      8.0, valid)
    # The check has teeth: a shard one byte short, or a tensor the index does not list, is not a valid folder.
    short, unlisted = tmp_path / "short", tmp_path / "unlisted"
    for bad in (short, unlisted):
        shutil.copytree(out, bad)
    shard = min(short.glob("*.safetensors"))
    os.truncate(shard, shard.stat().st_size - 1)
    index = json.loads((unlisted / "model.safetensors.index.json").read_text())
    del index["weight_map"][min(index["weight_map"])]
    (unlisted / "model.safetensors.index.json").write_text(json.dumps(index))
    assert not valid(short) and not valid(unlisted)


def test_sigkill_build_then_rerun(ws: Workspace, tmp_path: Path) -> None:
    recipe = _recipe(ws, tmp_path, imatrix="imatrix = true\nimatrix_chunks = 8")
    art = tmp_path / "art"
    final = art / "build" / "Demo-Mistral-ChatML" / "Demo-Mistral-ChatML.Q4_K_M.gguf"
    killed_then_rerun(["build", recipe, "--artifacts", art, "--until", "gguf", "--types", "Q4_K_M", "--demo-root", ws.demo.root.parent],
                      final, art, 6.0, _gguf_of_type("Q4_K_M"))


def test_a_gguf_next_to_its_checkpoint_can_be_rewritten(ws: Workspace, tmp_path: Path) -> None:
    """llama.cpp's converter writes into the model folder by default; a rerun of that must work."""
    hf = copy_checkpoint(ws.hf, tmp_path / "hf")
    for _ in range(2):
        res = cli("convert", hf, "-o", hf / "m.F16.gguf")
        assert res.returncode == 0, res.stderr
    assert read_header(hf / "m.F16.gguf").tensors.keys() == read_header(ws.f16).tensors.keys()
