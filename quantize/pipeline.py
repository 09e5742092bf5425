"""The build: one table of stages, run in order, each step skipped when its inputs are unchanged.

A stage is a row of :data:`STAGES`: its name, whether the build's settings ask for it, and the
function that makes its outputs.  ``quantize build --until STAGE`` runs the rows up to that one.
A step's key is the hash of what it is made from (input fingerprints, parameters, tool version);
the key is recorded beside the output only once the output is complete (outputs themselves are
written atomically), so a killed step is simply redone on the next run.  Steps that stream a
model record the RAM their preflight computed (``.steps/<step>.preflight.json``).

    quantize build [recipes/demo.toml]   # the whole release: ladder, quality gate, release folder
    quantize build --until convert       # stop after a stage (what `nox -s convert` runs)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .atomic import atomic_dir, atomic_file, file_lock, link_or_copy
from .errors import QuantizeError
from .fingerprint import fingerprint
from .recipe import Ladder as RecipeLadder

if TYPE_CHECKING:
    from .awq import AwqSettings
    from .evaluate import EvalSettings
    from .imatrix import ImatrixSettings
    from .recipe import Recipe
    from .stream import StreamNeed
    from .thresholds import Threshold

log = logging.getLogger(__name__)


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
    imatrix: ImatrixSettings | None = None  # None: no importance matrix
    smooth: bool = True  # move activation outliers into the weights before quantizing (needs the imatrix)
    awq: AwqSettings | None = None  # None: no AWQ folder
    eval: EvalSettings | None = None  # None: the gate's defaults
    thresholds: Mapping[str, Threshold] = field(default_factory=dict)
    recipe: Recipe | None = None  # with a recipe, the last stage assembles its release folder
    release_dir: Path | None = None
    until: str = "release"


@dataclass
class BuildLog:
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


class Steps:
    """Run-or-reuse for build steps keyed by the hash of their inputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = BuildLog()

    def key(self, **parts: Any) -> str:
        return hashlib.sha256(json.dumps({"tool": __version__, **parts}, sort_keys=True, default=str).encode()).hexdigest()

    def run(self, name: str, out: Path | tuple[Path, ...], key: str, make: Callable[[], Any],
            need: Callable[[], StreamNeed] | None = None) -> str:
        """Reuse the step when every output exists and its recorded key is ``key``; else make it (``need``,
        the step's RAM preflight, is computed only then)."""
        stamp = self.root / ".steps" / f"{name}.key"
        took = stamp.with_suffix(".seconds")
        outs = out if isinstance(out, tuple) else (out,)
        if all(o.exists() for o in outs) and stamp.is_file() and stamp.read_text() == key:
            log.info("%s: up to date", name)
            self.log.reused.append(name)
            if took.is_file():  # how long it took when it was built
                self.log.seconds[name] = float(took.read_text())
            return key
        t0 = time.time()
        log.info("%s: building", name)
        if need is not None:
            figure = need()
            log.info("%s: RAM needed (preflight): %s", name, figure.describe())
            with atomic_file(stamp.with_name(f"{name}.preflight.json")) as tmp:
                tmp.write_text(json.dumps({"need_bytes": figure.total, "parts": figure.parts()}, indent=2))
        make()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        self.log.built.append(name)
        self.log.seconds[name] = round(time.time() - t0, 2)
        with atomic_file(took) as tmp:
            tmp.write_text(str(self.log.seconds[name]))
        with atomic_file(stamp) as tmp:
            tmp.write_text(key)
        return key


@dataclass
class Build:
    """A build in progress: its settings, its folder, and what each stage made (path and key)."""

    settings: BuildSettings
    out: Path
    steps: Steps
    model: Path = Path()  # the fp16 checkpoint the ladder is made from: the base, or base + LoRA
    src_key: str = ""
    f16: Path = Path()
    imatrix: Path | None = None
    smoothed: tuple[Path, Path] | None = None  # (F16, importance matrix) with outliers moved into the weights
    quants: dict[str, Path] = field(default_factory=dict)
    awq: Path | None = None
    keys: dict[str, str] = field(default_factory=dict)
    report: dict[str, Path] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    release: Path | None = None


def _merge(b: Build) -> None:
    from .lora import merge_lora

    s = b.settings
    assert s.lora is not None
    merged = b.out / "merged-fp16"
    b.steps.run("merge", merged, b.steps.key(stage="merge", base=fingerprint(s.base), lora=fingerprint(s.lora)),
                lambda: merge_lora(s.base, s.lora, merged, s.lora_allow_pickle), lambda: _tensor_need(s.base, 3))  # type: ignore[arg-type]
    b.model = merged


def _convert(b: Build) -> None:
    from .convert import convert

    b.src_key = fingerprint(b.model)
    b.f16 = b.out / f"{b.settings.name}.F16.gguf"
    b.keys["F16"] = b.steps.run("convert", b.f16, b.steps.key(stage="convert", src=b.src_key), lambda: convert(b.model, b.f16),
                                lambda: _tensor_need(b.model, 2))


def _imatrix(b: Build) -> None:
    from .imatrix import compute_imatrix

    s = b.settings
    assert s.imatrix is not None
    ims = s.imatrix
    b.imatrix = path = b.out / f"{s.name}.imatrix.gguf"
    need = partial(_stream_need, b.model, ims.ctx * (ims.chunks or 64), ims.batch_tokens, 0)
    b.keys["imatrix"] = b.steps.run("imatrix", path, b.steps.key(stage="imatrix", src=b.src_key, calib=fingerprint(s.calib), s=asdict(ims)),
                                    lambda: compute_imatrix(b.model, s.calib, ims, s.eval_text).save(path), need)


def _smooth(b: Build) -> None:
    from .smooth import smooth_gguf, smooth_need

    assert b.imatrix is not None
    name = b.settings.name
    b.smoothed = f16, im = b.out / f"{name}.F16.smoothed.gguf", b.out / f"{name}.imatrix.smoothed.gguf"

    def make() -> None:
        smooth_gguf(b.f16, b.imatrix, f16, im)  # type: ignore[arg-type]

    def need() -> StreamNeed:
        from .stream import StreamNeed

        return StreamNeed(0, 0, 0, smooth_need(b.f16))

    b.keys["smooth"] = b.steps.run("smooth", (f16, im), b.steps.key(stage="smooth", f16=b.keys["F16"], imatrix=b.keys["imatrix"]),
                                   make, need)


def _gguf(b: Build) -> None:
    from .gguf_quant import QuantizeSettings, artifact_name, quantize_gguf

    s = b.settings
    src, im = b.smoothed if b.smoothed else (b.f16, b.imatrix)
    for t in s.types:
        q = b.out / artifact_name(s.name, t)
        key = b.steps.key(stage="gguf", f16=b.keys["F16"], imatrix=b.keys.get("imatrix", ""), smooth=b.keys.get("smooth", ""), type=t)
        b.keys[t] = b.steps.run(f"gguf-{t}", q, key, lambda q=q, t=t: quantize_gguf(  # type: ignore[misc]
            src, q, QuantizeSettings(t, im), origin=b.f16, origin_imatrix=b.imatrix))
        b.quants[t] = q


def _awq(b: Build) -> None:
    from .awq import quantize_awq, ram_need_for

    s = b.settings
    assert s.awq is not None
    aws = s.awq
    b.awq = out = b.out / f"{s.name}-AWQ"
    b.keys["AWQ"] = b.steps.run("awq", out, b.steps.key(stage="awq", src=b.src_key, calib=fingerprint(s.calib), s=asdict(aws)),
                                lambda: quantize_awq(b.model, out, s.calib, aws), partial(ram_need_for, b.model, aws))


def _eval(b: Build) -> None:
    from .evaluate import EvalSettings, evaluate, write_report

    s = b.settings
    es = s.eval or EvalSettings()
    eval_dir = b.out / "eval"
    artifacts = [b.f16, *b.quants.values(), *([b.awq] if b.awq else [])]
    need = partial(_stream_need, b.model, es.ctx * (es.chunks or 32), es.batch_tokens, es.ctx // 2)

    from .architectures import ARCHITECTURES
    from .checkpoint import read_json_object

    # HF's own model in float32 is the reference; for a family without a row (llama.cpp's converter wrote
    # its F16, checked against HF's logits then) the streamed forward does not know its model-level
    # steps, so the F16 is.
    arch = (read_json_object(b.model / "config.json").get("architectures") or ["?"])[0]
    reference = b.model if arch in ARCHITECTURES else b.f16

    def run_eval() -> None:
        rep = evaluate(reference, s.eval_text, list(artifacts), es, b.out.parent / "eval-cache", dict(s.thresholds))
        write_report(rep, eval_dir)

    b.steps.run("eval", eval_dir / "eval.json",
                b.steps.key(stage="eval", artifacts={k: v for k, v in b.keys.items() if k not in ("imatrix", "smooth")},
                            text=fingerprint(s.eval_text), s=asdict(es), th={k: asdict(v) for k, v in s.thresholds.items()}),
                run_eval, need)
    b.report = {k: eval_dir / f"eval.{k}" for k in ("json", "md", "png")}
    data = json.loads(b.report["json"].read_text())
    b.failures = [f for r in data["results"] for f in r["failures"]]


def _release(b: Build) -> None:
    if b.failures:
        return  # a failed gate publishes nothing
    assert b.settings.recipe is not None and b.settings.release_dir is not None
    b.release = _assemble_release(b, b.settings.recipe, b.settings.release_dir)


def _stream_need(model: Path, tokens: int, batch_tokens: int, head_rows: int) -> StreamNeed:
    """A float32 streamed pass over ``tokens`` tokens of ``model`` (:func:`quantize.stream.stream_need`)."""
    from .stream import CheckpointSource, stream_need

    src = CheckpointSource.open(model)
    return stream_need(src, src.ckpt.config, "float32", tokens, batch_tokens, head_rows=head_rows)


def _tensor_need(model: Path, copies: int) -> StreamNeed:
    """A tensor-by-tensor step: the largest tensor, ``copies`` times in float32, plus the runtime."""
    import numpy as np

    from .stream import CheckpointSource, StreamNeed

    largest = max(int(np.prod(s, dtype=np.int64)) for s in CheckpointSource.open(model).shapes().values())
    return StreamNeed(0, 0, 0, largest * 4 * copies)


@dataclass(frozen=True)
class Stage:
    name: str
    wanted: Callable[[BuildSettings], bool]
    run: Callable[[Build], None]


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
    if settings.until not in STAGE_NAMES:
        raise QuantizeError(None, f"unknown stage {settings.until!r}; stages: {', '.join(STAGE_NAMES)}")
    if settings.smooth and settings.imatrix is None and settings.types:
        log.info("smoothing needs the importance matrix's statistics; building without it")
    _check_family_steps(settings)
    b = Build(settings, out, steps or Steps(out), model=settings.base)
    for stage in STAGES[: STAGE_NAMES.index(settings.until) + 1]:
        if stage.wanted(settings):
            stage.run(b)
    return Ladder(out, b.f16, b.imatrix, b.quants, b.report, b.failures, b.steps.log, b.awq, b.release)


def _check_family_steps(settings: BuildSettings) -> None:
    """Refuse, before any work, a stage the model's family cannot take (its row says why)."""
    from .architectures import STEPS, for_step
    from .checkpoint import read_json_object

    wanted = [st.name for st in STAGES[: STAGE_NAMES.index(settings.until) + 1] if st.name in STEPS and st.wanted(settings)]
    if wanted:
        where = settings.base / "config.json"
        arch = (read_json_object(where).get("architectures") or ["?"])[0]
        for step in wanted:
            for_step(arch, step, where)


# --- a whole release from a recipe ----------------------------------------------------------

DEFAULT_RECIPE = Path("recipes") / "demo.toml"


def _demo_part(part: str, recipe: Path, root: Path, what: str) -> Path:
    """A part of the demo, building (once) only what it needs: the LoRA adapter trains on the
    SentencePiece model, a text part needs no model."""
    from .demo import DemoRecipe, build_demo

    models = {m.name for m in DemoRecipe().models}
    texts = ("train", "calib", "eval")
    if part not in (*models, *texts, "lora"):
        raise QuantizeError(recipe, f"{what} 'demo:{part}': no such demo part; known: {', '.join([*models, *texts, 'lora'])}")
    demo = build_demo(root, models=["mistral-spm"] if part == "lora" else [part] if part in models else [])
    if part == "lora":
        from .lora import train_demo_lora

        return train_demo_lora(demo.spm, demo.text["train"], demo.root / "lora")
    return {**demo.models, **demo.text}[part]


def _corpus_text(part: str, recipe: Path, root: Path, what: str) -> Path:
    """The demo's Shakespeare split (``text:calib``, ``text:eval``) without training the demo models."""
    from .corpus import TextSplit, write_splits

    if part not in ("train", "calib", "eval"):
        raise QuantizeError(recipe, f"{what} 'text:{part}': no such text; known: train, calib, eval")
    return write_splits(TextSplit(), root / "corpus")[part]


def _real_model(part: str, recipe: Path, root: Path, what: str) -> Path:
    from .real import REAL_MODELS, fetch_real

    if part not in REAL_MODELS:
        raise QuantizeError(recipe, f"{what} 'real:{part}': no such model; known: {', '.join(REAL_MODELS)}")
    return fetch_real(model=REAL_MODELS[part])


# Recipe references with a scheme: what the project builds or fetches itself.
SCHEMES: dict[str, Callable[[str, Path, Path, str], Path]] = {
    "demo:": _demo_part,
    "text:": _corpus_text,
    "real:": _real_model,
}


def resolve(spec: str, recipe: Path, root: Path, what: str) -> Path:
    """A recipe's model/adapter/text reference: ``demo:<part>``, ``text:<part>``, ``real:<model>``,
    a path (relative to the recipe or the working folder), or a Hugging Face repo id (fetched, or
    found in the local HF cache offline: :func:`quantize.hub.fetch`, with the recipe's ``[revision]``).
    ``root`` holds what the schemes build (demo models, texts)."""
    for scheme, build in SCHEMES.items():
        if spec.startswith(scheme):
            return build(spec.removeprefix(scheme), recipe, root, what)
    for base in (recipe.parent, Path.cwd()):
        if (base / spec).exists():
            return base / spec
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        from .hub import fetch
        from .recipe import load_recipe

        pins = load_recipe(recipe) if recipe.is_file() else None
        return fetch(spec, what, recipe, pins.revision.get(what) if pins else None,
                     bool(pins and pins.lora_allow_pickle and what == "lora"))
    raise QuantizeError(recipe, f"{what} {spec!r} is neither a local path nor a model in the Hugging Face cache; "
                        "download it first or point the recipe at a folder")


@dataclass(frozen=True)
class Release:
    root: Path
    ladder: Ladder
    failures: list[str]


def recipe_settings(recipe: Recipe, demo_root: Path, until: str = "release", types: tuple[str, ...] | None = None,
                    release_dir: Path | None = None) -> BuildSettings:
    """A recipe's build: its references resolved to files, its ladder into each stage's settings."""
    from .awq import AwqSettings
    from .evaluate import EvalSettings
    from .imatrix import ImatrixSettings

    lad = recipe.ladder
    return BuildSettings(
        name=recipe.name,
        base=resolve(recipe.base, recipe.source, demo_root, "base"),
        calib=resolve(recipe.calibration, recipe.source, demo_root, "calibration"),
        eval_text=resolve(recipe.evaluation, recipe.source, demo_root, "evaluation"),
        lora=resolve(recipe.lora, recipe.source, demo_root, "lora") if recipe.lora else None,
        lora_allow_pickle=recipe.lora_allow_pickle,
        types=types or tuple(t for t in lad.gguf if t != "F16"),
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
    from .recipe import load_recipe

    recipe = load_recipe(recipe_path or DEFAULT_RECIPE)
    if recipe.ladder.awq and STAGE_NAMES.index(until) >= STAGE_NAMES.index("awq"):
        from .awq import require_autoawq

        require_autoawq()  # before any work
    build_dir = artifacts / "build" / recipe.name
    build_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(build_dir / ".lock", f"another build of {recipe.name} is running"):
        settings = recipe_settings(recipe, demo_root or artifacts / "demo", until, types, artifacts / "release" / recipe.name)
        _preflight(settings, build_dir)
        ladder = build_ladder(settings, build_dir)
        return Release(ladder.release or build_dir, ladder, ladder.failures)


def _assemble_release(b: Build, recipe: Recipe, out: Path) -> Path:
    """The release folder: every GGUF (split when large) with its koboldcpp preset, the importance matrix,
    the AWQ folder, the manifest, checksums and model card; keyed by everything it is made from."""
    from .hub import source_record
    from .release import Artifact, bits_per_weight, koboldcpp_presets, make_manifest, write_release_files
    from .split import GB, place_gguf

    source = {"source": b.src_key[:16]}
    quality = json.loads(b.report["json"].read_text())
    split_max = int(recipe.ladder.split_max_gb * GB) if recipe.ladder.split_max_gb else None
    ggufs = [("F16", b.f16), *b.quants.items()]
    rel_key = b.steps.key(stage="release", eval=fingerprint(b.report["json"]), recipe=fingerprint(recipe.source),
                          files={p.name: fingerprint(p) for _, p in ggufs}, split=split_max,
                          awq=b.keys.get("AWQ"), imatrix=b.keys.get("imatrix"))

    def assemble() -> None:
        _check_release_space(out, [p for _, p in ggufs], split_max)
        with atomic_dir(out) as tmp:
            arts = []
            for kind, path in ggufs:
                shards = place_gguf(path, tmp, split_max)
                presets = koboldcpp_presets(tmp, shards[0].name, recipe)
                files = (*(Path(s.name) for s in shards), *(Path(p.name) for p in presets))
                arts.append(Artifact(kind, files, bits_per_weight(path), source))
            if b.imatrix is not None:
                link_or_copy(b.imatrix, tmp / b.imatrix.name)
                (tmp / "imatrix.txt").write_text(_imatrix_description(b.imatrix, b.settings.calib))
                arts.append(Artifact("imatrix", (Path(b.imatrix.name), Path("imatrix.txt")), None, {}))
            if b.awq is not None:
                link_or_copy(b.awq, tmp / b.awq.name)
                files = tuple(sorted(p.relative_to(tmp) for p in (tmp / b.awq.name).rglob("*") if p.is_file()))
                arts.append(Artifact("AWQ", files, None, source))
            manifest = make_manifest(tmp, recipe, arts, quality)
            manifest["sources"] = {part: source_record(spec, path, recipe.revision.get(part))
                                   for part, spec, path in (("base", recipe.base, b.settings.base), ("lora", recipe.lora, b.settings.lora))
                                   if spec and path}
            write_release_files(tmp, recipe, manifest)

    b.steps.run("release", out, rel_key, assemble)
    return out


def _preflight(s: BuildSettings, build_dir: Path) -> None:
    """Refuse before building when the disk cannot hold the artifacts still to be made."""
    from .gguf_quant import artifact_name
    from .quant_types import quant_type
    from .resources import check_free_space

    f16 = sum(p.stat().st_size for p in s.base.glob("*.safetensors"))  # fp16 weights: the F16 GGUF's size
    todo = {build_dir / f"{s.name}.F16.gguf": f16}
    if s.lora is not None:
        todo[build_dir / "merged-fp16"] = f16
    if s.smooth and s.imatrix is not None and s.types:
        todo[build_dir / f"{s.name}.F16.smoothed.gguf"] = f16
    todo |= {build_dir / artifact_name(s.name, t): int(f16 * sum(quant_type(t).bpw) / 2 / 16) for t in s.types}
    if s.awq is not None:
        todo[build_dir / f"{s.name}-AWQ"] = int(f16 * 0.3)
    need = sum(size for path, size in todo.items() if not path.exists())
    check_free_space(build_dir, int(need * 1.1), f"building {s.name}")


def _check_release_space(out: Path, ggufs: list[Path], split_max: int | None) -> None:
    """GGUFs are hard-linked into the release; the ones to be split are copied, so need room."""
    from .resources import check_free_space

    need = sum(p.stat().st_size for p in ggufs if split_max is not None and p.stat().st_size > split_max)
    if need:
        check_free_space(out.parent, int(need * 1.05), f"splitting {out.name}'s large GGUFs")


def _imatrix_description(imatrix: Path, calib: Path) -> str:
    from .atomic import sha256_file
    from .imatrix import Imatrix

    im = Imatrix.load(imatrix)
    return (f"Importance matrix {imatrix.name}: {len(im.sums)} matrices, {im.chunk_count} chunks of {im.chunk_size} tokens\n"
            f"from calibration text {calib.name} (sha256 {sha256_file(calib)}, {calib.stat().st_size} bytes).\n"
            "The evaluation text was kept out of calibration.\n")
