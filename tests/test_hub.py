"""Hugging Face repo ids in recipes (quantize.models.hub) and the Hub upload plan (quantize.publish).

The offline path runs the real huggingface_hub against a cache laid out as huggingface_hub lays it
out (``models--org--name/{blobs,snapshots/<sha>,refs/main}``, snapshot files symlinked to blobs),
built from the demo model in a private ``HF_HOME``, in a subprocess with ``HF_HUB_OFFLINE=1`` (the
library reads both variables when it is imported).  Downloading and uploading need the Hub, which is
not reachable here: the download's file filter and the upload's file list are checked up to the
library call, not the transfer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, MakeTemp

from quantize.errors import QuantizeError
from quantize.models.demo import Demo
from quantize.models.hub import PATTERNS, PICKLE_PATTERNS
from quantize.recipe import load_recipe

REV_MAIN = "1" * 40
REV_PINNED = "2" * 40


def _cache_repo(hf_home: Path, repo: str, snapshots: dict[str, Path], main: str) -> None:
    """A repo in the HF cache layout: content-addressed blobs, one folder of symlinks per commit."""
    store = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    for rev, src in snapshots.items():
        snap = store / "snapshots" / rev
        snap.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            if not f.is_file():
                continue
            data = f.read_bytes()
            blob = store / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (store / "refs").mkdir(parents=True, exist_ok=True)
    (store / "refs" / "main").write_text(main)


def _resolve(recipe: Path, hf_home: Path, spec: str, what: str = "base") -> subprocess.CompletedProcess[str]:
    code = ("import sys; from pathlib import Path; from quantize.sources import resolve; from quantize.errors import QuantizeError\n"
            "try: print(resolve(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]))\n"
            "except QuantizeError as e: print(f'quantize: {e}', file=sys.stderr); sys.exit(2)\n")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", code, spec, str(recipe), str(hf_home / "unused"), what],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def hf_home(demo: Demo, module_mktemp: MakeTemp) -> Path:
    home = module_mktemp("hf-home")
    _cache_repo(home, "demo-org/mistral-spm", {REV_MAIN: demo.spm, REV_PINNED: demo.bpe}, main=REV_MAIN)
    return home


def _recipe(tmp: Path, base: str, extra: str = "") -> Path:
    path = tmp / "r.toml"
    path.write_text(f'name = "R"\nbase = "{base}"\n{extra}')
    return path


def test_offline_repo_id_resolves_to_the_cached_snapshot_of_main(hf_home: Path, demo: Demo, tmp_path: Path) -> None:
    out = _resolve(_recipe(tmp_path, "demo-org/mistral-spm"), hf_home, "demo-org/mistral-spm")
    assert out.returncode == 0, out.stderr
    folder = Path(out.stdout.strip())
    assert folder == hf_home / "hub" / "models--demo-org--mistral-spm" / "snapshots" / REV_MAIN
    assert (folder / "model.safetensors").read_bytes() == (demo.spm / "model.safetensors").read_bytes()


def test_pinned_revision_is_honoured(hf_home: Path, demo: Demo, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "demo-org/mistral-spm", f'[revision]\nbase = "{REV_PINNED}"\n')
    assert load_recipe(recipe).revision == {"base": REV_PINNED}
    out = _resolve(recipe, hf_home, "demo-org/mistral-spm")
    assert out.returncode == 0, out.stderr
    folder = Path(out.stdout.strip())
    assert folder.name == REV_PINNED
    assert json.loads((folder / "config.json").read_text()) == json.loads((demo.bpe / "config.json").read_text())
    from quantize.models.hub import snapshot_revision, source_record

    assert snapshot_revision(folder) == REV_PINNED
    # what the release manifest records of it
    assert source_record("demo-org/mistral-spm", folder, REV_PINNED) == {"spec": "demo-org/mistral-spm", "pinned": REV_PINNED,
                                                                         "commit": REV_PINNED}


@pytest.mark.parametrize(("spec", "extra", "names"), [
    ("nobody/no-such-model", "", "base 'nobody/no-such-model'"),
    ("demo-org/mistral-spm", f'[revision]\nbase = "{"3" * 40}"\n', f"base 'demo-org/mistral-spm@{'3' * 40}'"),
])
def test_a_repo_neither_cached_nor_reachable_is_one_line_naming_it(hf_home: Path, tmp_path: Path, spec: str, extra: str,
                                                                   names: str) -> None:
    out = _resolve(_recipe(tmp_path, spec, extra), hf_home, spec)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("quantize: ") and names in lines[0], out.stderr
    assert "not in the Hugging Face cache" in lines[0]


@pytest.mark.parametrize(("base", "extra", "error"), [
    ("org/model", '[revision]\nbase = "main branch"\n', "is not a commit sha, branch or tag name"),
    ("demo:mistral-spm", '[revision]\nbase = "main"\n', "is not a Hugging Face repo id"),
    ("org/model", '[revision]\nbsae = "main"\n', "unknown key 'bsae'"),
    ("org/model", 'revision = "main"\n', "must be a table"),
])
def test_bad_revision_keys_are_refused(tmp_path: Path, base: str, extra: str, error: str) -> None:
    with pytest.raises(QuantizeError, match=error):
        load_recipe(_recipe(tmp_path, base, extra))


def test_download_filter_takes_what_a_release_needs(demo: Demo) -> None:
    """The files a demo checkpoint (as transformers saves it) and a LoRA adapter hold pass the filter;
    pickled weights only with the opt-in, and never for a base model."""
    def taken(what: str, names: list[str], pickle: bool = False) -> set[str]:
        pats = [*PATTERNS[what], *(PICKLE_PATTERNS[what] if pickle else ())]
        return {n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)}

    saved = sorted(p.name for p in demo.spm.iterdir() if p.is_file())
    assert taken("base", saved) == set(saved)
    repo = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "README.md", "LICENSE", "tokenizer.model", "original/consolidated.00.pth", ".gitattributes"]
    assert taken("base", repo) == {"config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                                   "README.md", "LICENSE", "tokenizer.model"}
    assert taken("base", ["pytorch_model.bin"], pickle=True) == set()
    adapter = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md"]
    assert taken("lora", adapter) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert "adapter_model.bin" in taken("lora", adapter, pickle=True)


# --- publish: everything up to the upload call ---------------------------------------------------

@pytest.fixture(scope="module")
def small_release(demo: Demo, module_mktemp: MakeTemp) -> Path:
    """A release folder of the demo model (F16 and Q4_K_M, no AWQ), built once."""
    from quantize.pipeline import build_release

    tmp = module_mktemp("pub")
    recipe = tmp / "pub.toml"
    recipe.write_text(f'name = "Pub"\nbase = "demo:mistral-spm"\nevaluation = "{demo.text["eval"]}"\n'
                      '[ladder]\ngguf = ["F16", "Q4_K_M"]\nawq = false\nimatrix = false\nsmooth = false\n'
                      '[thresholds]\nQ4_K_M = { ppl_ratio = 10.0, mean_kld = 10.0 }\n')
    rel = build_release(recipe, tmp / "artifacts", demo_root=ROOT / "artifacts" / "demo")
    assert not rel.failures
    return rel.root


def test_publish_plan_names_every_release_file_and_the_repo(small_release: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from quantize.publish import plan

    monkeypatch.setenv("HF_REPO_PREFIX", "my-org/")
    (small_release / "notes.tmp").write_text("not part of the release")  # a stray file is not uploaded...
    try:
        with pytest.raises(QuantizeError, match="does not match its manifest"):  # ...and fails verification
            plan(small_release)
    finally:
        (small_release / "notes.tmp").unlink()
    up = plan(small_release)
    assert up.repo_id == "my-org/Pub-GGUF"
    on_disk = sorted(str(p.relative_to(small_release)) for p in small_release.rglob("*") if p.is_file())
    assert sorted(up.allow_patterns) == on_disk
    assert {"manifest.json", "SHA256SUMS", "README.md", "Pub.F16.gguf", "Pub.Q4_K_M.gguf"} <= set(up.allow_patterns)


def test_publish_refuses_without_token_or_prefix(small_release: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_REPO_PREFIX")}
    out = subprocess.run([sys.executable, "-m", "quantize", "publish", str(small_release)], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and out.stderr.strip() == f"quantize: {small_release}: set HF_TOKEN to publish to the Hugging Face Hub"
    out = subprocess.run([sys.executable, "-m", "quantize", "publish", str(small_release)], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(ROOT), "HF_TOKEN": "x"})
    assert out.returncode == 2 and "HF_REPO_PREFIX" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_init_from_a_repo_id_resolves_it_as_build_does_and_pins_the_commit(hf_home: Path, tmp_path: Path) -> None:
    """`quantize init org/name` offline: the cached snapshot of main is read, the recipe names the repo id and pins the
    commit it resolved to, and the recipe resolves to the same folder."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-m", "quantize", "init", "demo-org/mistral-spm", "-o", str(tmp_path / "r.toml")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    r = load_recipe(tmp_path / "r.toml")
    assert (r.name, r.base, r.revision, r.card.prompt_format) == ("mistral-spm", "demo-org/mistral-spm", {"base": REV_MAIN}, "chatml")
    again = _resolve(tmp_path / "r.toml", hf_home, r.base)
    assert Path(again.stdout.strip()) == hf_home / "hub" / "models--demo-org--mistral-spm" / "snapshots" / REV_MAIN
