"""The build: one table of stages, run in order, each step skipped when its inputs are unchanged.

A stage is a row of :data:`STAGES`: its name, whether the build's settings ask for it, and the
function that makes its outputs.  Each stage takes what the stages before it made (:class:`Made`)
and returns it with its own outputs added.  ``quantize build --until STAGE`` runs the rows up to
that one; steps are run or reused by :mod:`quantize.steps`, recipe references resolved by
:mod:`quantize.sources`, and the release folder assembled by :mod:`quantize.release`.

    quantize build [recipes/demo.toml]   # the whole release: ladder, quality gate, release folder
    quantize build --until convert       # stop after a stage (what `nox -s convert` runs)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from quantize.architectures import ARCHITECTURES, STEPS, for_step
from quantize.atomic import file_lock
from quantize.awq import AwqSettings, quantize_awq, ram_need_for, require_autoawq
from quantize.budget import parse_budget
from quantize.convert import convert
from quantize.engine.lora import merge_lora
from quantize.engine.stream import CheckpointSource, StreamNeed, stream_need
from quantize.errors import QuantizeError
from quantize.evaluate import EvalSettings, evaluate, write_report
from quantize.fingerprint import fingerprint
from quantize.formats.checkpoint import architecture_of, read_config
from quantize.gguf_mix import (
    PROBE_EVAL,
    MixReport,
    choose,
    fit_predictor,
    load_predictor,
    mix_name,
    quantize_to_budget,
    report_path,
    save_predictor,
)
from quantize.gguf_quant import QuantizeSettings, artifact_name, quantize_gguf
from quantize.imatrix import ImatrixSettings, compute_imatrix
from quantize.mix import Sensitivity, measure_sensitivity
from quantize.quant_types import quant_type
from quantize.recipe import Ladder as RecipeLadder
from quantize.recipe import Recipe, load_recipe
from quantize.release import ReleaseInputs, assemble_release
from quantize.resources import check_free_space
from quantize.smooth import smooth_gguf, smooth_need
from quantize.sources import resolve
from quantize.steps import BuildLog, Steps, step_key
from quantize.thresholds import Threshold

log = logging.getLogger(__name__)

DEFAULT_RECIPE = Path("recipes") / "demo.toml"
# The build's disk preflight, from the fp16 weights' size: an AWQ folder holds 4-bit weights plus
# float16 scales and zeros per group of 128 and the float16 embeddings, under 0.3 of fp16 for the
# supported families; a GGUF type's size is its mean bits per weight over F16's 16; the total gets
# a tenth more for headers, vocabularies and the filesystem.
AWQ_OF_FP16 = 0.3
DISK_MARGIN = 1.1


@dataclass(frozen=True)
class BuildSettings:
    """What to build: the model, its texts and every stage's settings (``None`` leaves a stage out)."""

    name: str
    base: Path  # the fp16 Hugging Face checkpoint folder
    calib: Path
    eval_text: Path
    lora: Path | None = None
    lora_allow_pickle: bool = False
    types: tuple[str, ...] = tuple(t for t in RecipeLadder.gguf if t != "F16")  # the recipe ladder's quantizations
    budgets: tuple[str, ...] = ()  # searched mixes (quantize.gguf_mix), each measured against the stock type at its budget
    imatrix: ImatrixSettings | None = None  # None: no importance matrix
    smooth: bool = True  # move activation outliers into the weights before quantizing (needs the imatrix)
    awq: AwqSettings | None = None  # None: no AWQ folder
    eval: EvalSettings | None = None  # None: the gate's defaults
    thresholds: Mapping[str, Threshold] = field(default_factory=dict)
    recipe: Recipe | None = None  # with a recipe, the last stage assembles its release folder
    release_dir: Path | None = None
    until: str = "release"


@dataclass(frozen=True)
class Build:
    """A build's fixed context: its settings, its folder and its step cache."""

    settings: BuildSettings
    out: Path
    steps: Steps


@dataclass(frozen=True)
class Made:
    """What the stages have made so far (paths and step keys); each stage returns a copy with its outputs."""

    model: Path  # the fp16 checkpoint the ladder is made from: the base, or base + LoRA
    src_key: str = ""
    f16: Path = Path()
    imatrix: Path | None = None
    smoothed: tuple[Path, Path] | None = None  # (F16, importance matrix) with outliers moved into the weights
    quants: Mapping[str, Path] = field(default_factory=dict)
    mixes: Mapping[str, Path] = field(default_factory=dict)  # budget -> searched GGUF
    stocks: Mapping[str, Path] = field(default_factory=dict)  # a budget's stock type, where the ladder lacks it
    awq: Path | None = None
    keys: Mapping[str, str] = field(default_factory=dict)
    report: Mapping[str, Path] = field(default_factory=dict)
    failures: tuple[str, ...] = ()
    release: Path | None = None


def _merge(b: Build, m: Made) -> Made:
    s = b.settings
    lora = s.lora
    assert lora is not None
    merged = b.out / "merged-fp16"
    b.steps.run("merge", merged, step_key(stage="merge", base=fingerprint(s.base), lora=fingerprint(lora)),
                lambda: merge_lora(s.base, lora, merged, s.lora_allow_pickle), lambda: _tensor_need(s.base, 3))
    return replace(m, model=merged)


def _convert(b: Build, m: Made) -> Made:
    src_key = fingerprint(m.model)
    f16 = b.out / f"{b.settings.name}.F16.gguf"
    key = b.steps.run("convert", f16, step_key(stage="convert", src=src_key), lambda: convert(m.model, f16),
                      lambda: _tensor_need(m.model, 2))
    return replace(m, src_key=src_key, f16=f16, keys={**m.keys, "F16": key})


def _imatrix(b: Build, m: Made) -> Made:
    s = b.settings
    ims = s.imatrix
    assert ims is not None
    path = b.out / f"{s.name}.imatrix.gguf"
    need = partial(_stream_need, m.model, ims.ctx * (ims.chunks or 64), ims.batch_tokens, 0)
    key = b.steps.run("imatrix", path, step_key(stage="imatrix", src=m.src_key, calib=fingerprint(s.calib), s=asdict(ims)),
                      lambda: compute_imatrix(m.model, s.calib, ims, s.eval_text).save(path), need)
    return replace(m, imatrix=path, keys={**m.keys, "imatrix": key})


def _smooth(b: Build, m: Made) -> Made:
    imatrix = m.imatrix
    assert imatrix is not None
    name = b.settings.name
    f16, im = b.out / f"{name}.F16.smoothed.gguf", b.out / f"{name}.imatrix.smoothed.gguf"
    key = b.steps.run("smooth", (f16, im), step_key(stage="smooth", f16=m.keys["F16"], imatrix=m.keys["imatrix"]),
                      lambda: smooth_gguf(m.f16, imatrix, f16, im), lambda: StreamNeed(0, 0, 0, smooth_need(m.f16)))
    return replace(m, smoothed=(f16, im), keys={**m.keys, "smooth": key})


def _gguf(b: Build, m: Made) -> Made:
    s = b.settings
    src, im = m.smoothed if m.smoothed else (m.f16, m.imatrix)
    keys, quants = dict(m.keys), dict(m.quants)
    for t in s.types:
        q = b.out / artifact_name(s.name, t)
        key = step_key(stage="gguf", f16=m.keys["F16"], imatrix=m.keys.get("imatrix", ""), smooth=m.keys.get("smooth", ""), type=t)
        keys[t] = b.steps.run(f"gguf-{t}", q, key, partial(quantize_gguf, src, q, QuantizeSettings(t, im),
                                                               origin=m.f16, origin_imatrix=m.imatrix))
        quants[t] = q
    return replace(m, quants=quants, keys=keys)


def _mix(b: Build, m: Made) -> Made:
    """Sensitivity and the fitted predictor once (steps), then one searched GGUF per budget, and the stock
    type at each budget where the ladder does not have it (the gate compares the two)."""
    s = b.settings
    src, im = m.smoothed if m.smoothed else (m.f16, m.imatrix)
    work = b.out / "mix"
    sens_path, fit_path = work / "sensitivity.json", work / "predictor.json"
    base = dict(f16=m.keys["F16"], imatrix=m.keys.get("imatrix", ""), smooth=m.keys.get("smooth", ""))
    sens_key = b.steps.run("mix-sensitivity", sens_path, step_key(stage="mix-sensitivity", **base),
                           lambda: measure_sensitivity(src, im).save(sens_path))
    fit_key = b.steps.run("mix-predictor", fit_path,
                          step_key(stage="mix-predictor", sens=sens_key, text=fingerprint(s.calib), s=asdict(PROBE_EVAL)),
                          lambda: save_predictor(fit_path, *fit_predictor(src, im, Sensitivity.load(sens_path), s.calib, work)))
    sens, fitted = Sensitivity.load(sens_path), load_predictor(fit_path)
    keys, mixes, stocks = dict(m.keys), dict(m.mixes), dict(m.stocks)
    for text in s.budgets:
        budget = parse_budget(text)
        out = b.out / mix_name(s.name, budget)
        keys[out.name] = b.steps.run(
            f"gguf-{budget.mix_kind}", out, step_key(stage="mix", predictor=fit_key, budget=budget.text),
            partial(quantize_to_budget, src, out, text, im, sens=sens, fitted=fitted, origin=m.f16, origin_imatrix=m.imatrix))
        mixes[budget.text] = out
        stock = MixReport.load(report_path(out)).stock
        if stock not in m.quants and stock not in stocks:
            q = b.out / artifact_name(s.name, stock)
            keys[stock] = b.steps.run(f"gguf-{stock}", q, step_key(stage="gguf", **base, type=stock),
                                      partial(quantize_gguf, src, q, QuantizeSettings(stock, im), origin=m.f16, origin_imatrix=m.imatrix))
            stocks[stock] = q
    return replace(m, mixes=mixes, stocks=stocks, keys=keys)


def _awq(b: Build, m: Made) -> Made:
    s = b.settings
    aws = s.awq
    assert aws is not None
    out = b.out / f"{s.name}-AWQ"
    key = b.steps.run("awq", out, step_key(stage="awq", src=m.src_key, calib=fingerprint(s.calib), s=asdict(aws)),
                      lambda: quantize_awq(m.model, out, s.calib, aws), partial(ram_need_for, m.model, aws))
    return replace(m, awq=out, keys={**m.keys, "AWQ": key})


def _eval(b: Build, m: Made) -> Made:
    s = b.settings
    es = s.eval or EvalSettings()
    eval_dir = b.out / "eval"
    artifacts = [m.f16, *m.quants.values(), *m.stocks.values(), *m.mixes.values(), *([m.awq] if m.awq else [])]
    need = partial(_stream_need, m.model, es.ctx * (es.chunks or 32), es.batch_tokens, es.ctx // 2)
    # HF's own model in float32 is the reference; for a family without a row (llama.cpp's converter wrote
    # its F16, checked against HF's logits then) the streamed forward does not know its model-level
    # steps, so the F16 is.
    reference = m.model if architecture_of(read_config(m.model), m.model) in ARCHITECTURES else m.f16

    def run_eval() -> None:
        write_report(evaluate(reference, s.eval_text, list(artifacts), es, b.out.parent / "eval-cache", dict(s.thresholds)), eval_dir)

    b.steps.run("eval", eval_dir / "eval.json",
                step_key(stage="eval", artifacts={k: v for k, v in m.keys.items() if k not in ("imatrix", "smooth")},
                         text=fingerprint(s.eval_text), s=asdict(es), th={k: asdict(v) for k, v in s.thresholds.items()}),
                run_eval, need)
    report = {k: eval_dir / f"eval.{k}" for k in ("json", "md", "png")}
    data = json.loads(report["json"].read_text())
    # a budget's files (its mix, a stock type the ladder lacks) are candidates: the release stage fails on
    # the one it would ship, not on the other
    candidates = {p.name for p in (*m.mixes.values(), *m.stocks.values())}
    return replace(m, report=report, failures=tuple(f for r in data["results"] if r["name"] not in candidates for f in r["failures"]))


def _release(b: Build, m: Made) -> Made:
    if m.failures:
        return m  # a failed gate publishes nothing
    s = b.settings
    assert s.recipe is not None and s.release_dir is not None
    results = {r["name"]: r for r in json.loads(m.report["json"].read_text())["results"]}
    shipped = [choose(budget, mix, {**m.quants, **m.stocks}, results) for budget, mix in m.mixes.items()]
    ggufs = {"F16": m.f16, **m.quants}
    ggufs |= {c.kind: c.path for c in shipped if c.kind not in ggufs}
    if failed := tuple(f for c in shipped for f in results[c.path.name]["failures"]):
        return replace(m, failures=failed)  # a failed gate publishes nothing
    inputs = ReleaseInputs(ggufs=tuple(ggufs.items()), imatrix=m.imatrix, awq=m.awq, report=m.report["json"],
                           calib=s.calib, src_key=m.src_key, keys=dict(m.keys),
                           sources={"base": s.base, **({"lora": s.lora} if s.lora else {})}, mixes=tuple(c.record for c in shipped))
    return replace(m, release=assemble_release(s.recipe, s.release_dir, inputs, b.steps))


def _stream_need(model: Path, tokens: int, batch_tokens: int, head_rows: int) -> StreamNeed:
    """A float32 streamed pass over ``tokens`` tokens of ``model`` (:func:`quantize.engine.stream.stream_need`)."""
    src = CheckpointSource.open(model)
    return stream_need(src, src.ckpt.config, "float32", tokens, batch_tokens, head_rows=head_rows)


def _tensor_need(model: Path, copies: int) -> StreamNeed:
    """A tensor-by-tensor step: the largest tensor, ``copies`` times in float32, plus the runtime."""
    largest = max(int(np.prod(s, dtype=np.int64)) for s in CheckpointSource.open(model).shapes().values())
    return StreamNeed(0, 0, 0, largest * 4 * copies)


@dataclass(frozen=True)
class Stage:
    name: str
    wanted: Callable[[BuildSettings], bool]
    run: Callable[[Build, Made], Made]


def _always(_s: BuildSettings) -> bool:
    return True


# The build, in dependency order; `--until NAME` stops after that row.
STAGES: tuple[Stage, ...] = (
    Stage("merge", lambda s: s.lora is not None, _merge),
    Stage("convert", _always, _convert),
    Stage("imatrix", lambda s: s.imatrix is not None, _imatrix),
    Stage("smooth", lambda s: s.smooth and s.imatrix is not None and bool(s.types), _smooth),
    Stage("gguf", lambda s: bool(s.types), _gguf),
    Stage("awq", lambda s: s.awq is not None, _awq),
    Stage("mix", lambda s: bool(s.budgets), _mix),
    Stage("eval", _always, _eval),
    Stage("release", lambda s: s.recipe is not None, _release),
)
STAGE_NAMES = tuple(st.name for st in STAGES)


@dataclass(frozen=True)
class Ladder:
    root: Path
    f16: Path
    imatrix: Path | None
    quants: dict[str, Path]
    report: dict[str, Path]
    failures: list[str]
    log: BuildLog
    awq: Path | None = None
    release: Path | None = None


def build_ladder(settings: BuildSettings, out: Path, steps: Steps | None = None) -> Ladder:
    """Run the stages of :data:`STAGES` the settings ask for, in order, up to ``settings.until``."""
    _check_stage(settings.until)
    if settings.smooth and settings.imatrix is None and settings.types:
        log.info("smoothing needs the importance matrix's statistics; building without it")
    _check_family_steps(settings)
    b = Build(settings, out, steps or Steps(out))
    made = Made(model=settings.base)
    for stage in STAGES[: STAGE_NAMES.index(settings.until) + 1]:
        if stage.wanted(settings):
            made = stage.run(b, made)
    return Ladder(out, made.f16, made.imatrix, dict(made.quants), dict(made.report), list(made.failures), b.steps.log,
                  made.awq, made.release)


def _check_stage(until: str) -> None:
    if until not in STAGE_NAMES:
        raise QuantizeError(None, f"unknown stage {until!r}; stages: {', '.join(STAGE_NAMES)}")


def _check_family_steps(settings: BuildSettings) -> None:
    """Refuse, before any work, a stage the model's family cannot take (its row says why)."""
    wanted = [st.name for st in STAGES[: STAGE_NAMES.index(settings.until) + 1] if st.name in STEPS and st.wanted(settings)]
    if wanted:
        arch = architecture_of(read_config(settings.base), settings.base)
        for step in wanted:
            for_step(arch, step, settings.base / "config.json")


@dataclass(frozen=True)
class Release:
    root: Path
    ladder: Ladder
    failures: list[str]


def recipe_settings(recipe: Recipe, demo_root: Path, until: str = "release", types: tuple[str, ...] | None = None,
                    release_dir: Path | None = None) -> BuildSettings:
    """A recipe's build: its references resolved to files, its ladder into each stage's settings."""
    lad = recipe.ladder
    return BuildSettings(
        name=recipe.name,
        base=resolve(recipe.base, recipe.source, demo_root, "base"),
        calib=resolve(recipe.calibration, recipe.source, demo_root, "calibration"),
        eval_text=resolve(recipe.evaluation, recipe.source, demo_root, "evaluation"),
        lora=resolve(recipe.lora, recipe.source, demo_root, "lora") if recipe.lora else None,
        lora_allow_pickle=recipe.lora_allow_pickle,
        types=types or tuple(t for t in lad.gguf if t != "F16"),
        budgets=() if types else lad.budgets,
        imatrix=ImatrixSettings(lad.imatrix_ctx, lad.imatrix_chunks) if lad.imatrix else None,
        smooth=lad.smooth,
        awq=AwqSettings(samples=lad.awq_samples, seq_len=lad.awq_seq_len) if lad.awq else None,
        eval=EvalSettings(lad.eval_ctx, lad.eval_windows),
        thresholds=dict(recipe.thresholds),
        recipe=recipe,
        release_dir=release_dir,
        until=until,
    )


def build_release(recipe_path: Path | None = None, artifacts: Path = Path("artifacts"),
                  until: str = "release", types: tuple[str, ...] | None = None, demo_root: Path | None = None) -> Release:
    """The stages of a recipe, in dependency order, up to ``until``: by default the release folder (atomically)."""
    recipe = load_recipe(recipe_path or DEFAULT_RECIPE)
    _check_stage(until)
    if recipe.ladder.awq and STAGE_NAMES.index(until) >= STAGE_NAMES.index("awq"):
        require_autoawq()  # before any work
    build_dir = artifacts / "build" / recipe.name
    build_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(build_dir / ".lock", f"another build of {recipe.name} is running"):
        settings = recipe_settings(recipe, demo_root or artifacts / "demo", until, types, artifacts / "release" / recipe.name)
        _check_build_space(settings, build_dir)
        ladder = build_ladder(settings, build_dir)
        return Release(ladder.release or build_dir, ladder, ladder.failures)


def _type_size(f16: int, qtype: str) -> int:
    """A GGUF type's size from the F16's: the middle of its bits-per-weight band over 16."""
    low, high = quant_type(qtype).bpw
    return int(f16 * (low + high) / 2 / 16)


def _check_build_space(s: BuildSettings, build_dir: Path) -> None:
    """Refuse before building when the disk cannot hold the artifacts still to be made."""
    f16 = sum(p.stat().st_size for p in s.base.glob("*.safetensors"))  # fp16 weights: the F16 GGUF's size
    todo = {build_dir / f"{s.name}.F16.gguf": f16}
    if s.lora is not None:
        todo[build_dir / "merged-fp16"] = f16
    if s.smooth and s.imatrix is not None and s.types:
        todo[build_dir / f"{s.name}.F16.smoothed.gguf"] = f16
    for t in s.types:
        todo[build_dir / artifact_name(s.name, t)] = _type_size(f16, t)
    for text in s.budgets:  # the mix, and the stock type it is measured against where the ladder lacks it
        b = parse_budget(text)
        size = _type_size(f16, str(b.value)) if b.kind == "type" else int(b.value) if b.kind == "bytes" else int(f16 * float(b.value) / 16)
        todo[build_dir / mix_name(s.name, b)] = size
        # a size's stock type is chosen by dry runs later: counted under a name of its own
        stock = artifact_name(s.name, str(b.value)) if b.kind == "type" else f"{mix_name(s.name, b)}.stock"
        todo.setdefault(build_dir / stock, size)
    if s.awq is not None:
        todo[build_dir / f"{s.name}-AWQ"] = int(f16 * AWQ_OF_FP16)
    need = sum(size for path, size in todo.items() if not path.exists())
    check_free_space(build_dir, int(need * DISK_MARGIN), f"building {s.name}")
