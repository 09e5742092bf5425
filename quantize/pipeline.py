"""The build: every stage in dependency order, each step skipped when its inputs are unchanged.

A step's key is the hash of what it is made from (input fingerprints, parameters, tool version);
the key is recorded beside the output only once the output is complete (outputs themselves are
written atomically), so a killed step is simply redone on the next run.

    quantize build                       # the demo ladder: F16, imatrix, Q6_K, Q4_K_M, quality gate
    quantize build --until convert       # stop after a stage (what `nox -s convert` runs)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import atomic_file
from .errors import QuantizeError

log = logging.getLogger(__name__)

STAGES = ("convert", "imatrix", "gguf", "eval")


@dataclass(frozen=True)
class LadderSettings:
    types: tuple[str, ...] = ("Q6_K", "Q4_K_M")
    use_imatrix: bool = True
    smooth: bool = True  # move activation outliers into the weights before quantizing (quantize.smooth)
    calib_ctx: int = 512
    calib_chunks: int | None = 64
    eval_ctx: int = 512
    eval_chunks: int | None = 32
    until: str = "eval"


@dataclass
class BuildLog:
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def fingerprint(path: Path) -> str:
    """Content identity of an input file or folder: sha256 of small files, size+mtime of weights."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f.name.encode())
        if st.st_size < (8 << 20):
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class Steps:
    """Run-or-reuse for build steps keyed by the hash of their inputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = BuildLog()

    def key(self, **parts: Any) -> str:
        return hashlib.sha256(json.dumps({"tool": __version__, **parts}, sort_keys=True, default=str).encode()).hexdigest()

    def run(self, name: str, out: Path, key: str, make: Callable[[], Any]) -> str:
        stamp = self.root / ".steps" / f"{name}.key"
        if out.exists() and stamp.is_file() and stamp.read_text() == key:
            log.info("%s: up to date", name)
            self.log.reused.append(name)
            return key
        t0 = time.time()
        log.info("%s: building", name)
        make()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(stamp) as tmp:
            tmp.write_text(key)
        self.log.built.append(name)
        self.log.seconds[name] = round(time.time() - t0, 2)
        return key


@dataclass(frozen=True)
class Ladder:
    root: Path
    f16: Path
    imatrix: Path | None
    quants: dict[str, Path]
    report: dict[str, Path]
    failures: list[str]
    log: BuildLog


def build_ladder(hf_dir: Path, name: str, calib: Path, eval_text: Path, out: Path,
                 settings: LadderSettings = LadderSettings()) -> Ladder:
    from .convert import convert
    from .evaluate import EvalSettings, evaluate, write_report
    from .gguf_quant import QuantizeSettings, artifact_name, quantize_gguf
    from .imatrix import ImatrixSettings, compute_imatrix

    if settings.until not in STAGES:
        raise QuantizeError(None, f"unknown stage {settings.until!r}; stages: {', '.join(STAGES)}")
    stop = STAGES.index(settings.until)
    steps = Steps(out)
    src_key = fingerprint(hf_dir)
    f16 = out / f"{name}.F16.gguf"
    k_f16 = steps.run("convert", f16, steps.key(stage="convert", src=src_key), lambda: convert(hf_dir, f16))
    im_path: Path | None = None
    k_im = ""
    if stop >= 1 and settings.use_imatrix:
        im_path = out / f"{name}.imatrix.gguf"
        ims = ImatrixSettings(settings.calib_ctx, settings.calib_chunks)
        k_im = steps.run("imatrix", im_path, steps.key(stage="imatrix", src=src_key, calib=fingerprint(calib), s=asdict(ims)),
                         lambda: compute_imatrix(hf_dir, calib, ims, eval_text).save(im_path))  # type: ignore[arg-type]
    quants: dict[str, Path] = {}
    keys = {"F16": k_f16}
    if stop >= 2:
        for t in settings.types:
            q = out / artifact_name(name, t)
            qs = QuantizeSettings(t, im_path, 0, settings.smooth and im_path is not None)
            keys[t] = steps.run(f"gguf-{t}", q, steps.key(stage="gguf", f16=k_f16, imatrix=k_im, type=t, smooth=qs.smooth),
                                lambda q=q, qs=qs: quantize_gguf(f16, q, qs))  # type: ignore[misc]
            quants[t] = q
    report: dict[str, Path] = {}
    failures: list[str] = []
    if stop >= 3:
        es = EvalSettings(settings.eval_ctx, settings.eval_chunks)
        eval_dir = out / "eval"
        artifacts = [f16, *quants.values()]

        def run_eval() -> None:
            rep = evaluate(hf_dir, eval_text, list(artifacts), es, out.parent / "eval-cache")
            write_report(rep, eval_dir)

        steps.run("eval", eval_dir / "eval.json",
                  steps.key(stage="eval", artifacts=keys, text=fingerprint(eval_text), s=asdict(es)), run_eval)
        report = {k: eval_dir / f"eval.{k}" for k in ("json", "md", "png")}
        data = json.loads(report["json"].read_text())
        failures = [f for r in data["results"] for f in r["failures"]]
    return Ladder(out, f16, im_path, quants, report, failures, steps.log)


def build_demo_ladder(artifacts: Path = Path("artifacts"), settings: LadderSettings = LadderSettings()) -> Ladder:
    """The main job on the embedded demo model (the ChatML Mistral with the real Mistral tokenizer)."""
    from .demo import build_demo

    demo = build_demo(artifacts / "demo")
    return build_ladder(demo.spm, "Demo-Mistral-ChatML", demo.text["calib"], demo.text["eval"],
                        artifacts / "build" / "Demo-Mistral-ChatML", settings)
