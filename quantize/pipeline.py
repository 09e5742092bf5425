"""The build: every stage in dependency order, each step skipped when its inputs are unchanged.

A step's key is the hash of what it is made from (input fingerprints, parameters, tool version);
the key is recorded beside the output only once the output is complete (outputs themselves are
written atomically), so a killed step is simply redone on the next run.

    quantize build [recipes/demo.toml]   # the whole release: ladder, quality gate, release folder
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
from .atomic import atomic_dir, atomic_file, file_lock
from .errors import QuantizeError

log = logging.getLogger(__name__)

STAGES = ("convert", "imatrix", "gguf", "awq", "eval")  # then "release": the folder people download


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


HASH_CACHE = Path.home() / ".cache" / "quantize" / "sha256.json"


def _cached_sha256(f: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime, inode) so unchanged weights are hashed once;
    a copied or downloaded file (new mtime) is hashed again, so keys stay content-based."""
    from .atomic import sha256_file

    st = f.stat()
    key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    try:
        cache = json.loads(HASH_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_file(f)
        HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(HASH_CACHE) as tmp:
            tmp.write_text(json.dumps(cache))
    return str(cache[key])


def fingerprint(path: Path) -> str:
    """Content identity of an input file or folder (names and sha256 of every file)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".partial-"))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}:{_cached_sha256(f)};".encode())
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
        took = stamp.with_suffix(".seconds")
        if out.exists() and stamp.is_file() and stamp.read_text() == key:
            log.info("%s: up to date", name)
            self.log.reused.append(name)
            if took.is_file():  # how long it took when it was built
                self.log.seconds[name] = float(took.read_text())
            return key
        t0 = time.time()
        log.info("%s: building", name)
        make()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        self.log.built.append(name)
        self.log.seconds[name] = round(time.time() - t0, 2)
        with atomic_file(took) as tmp:
            tmp.write_text(str(self.log.seconds[name]))
        with atomic_file(stamp) as tmp:
            tmp.write_text(key)
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
    awq: Path | None = None


def build_ladder(hf_dir: Path, name: str, calib: Path, eval_text: Path, out: Path,
                 settings: LadderSettings = LadderSettings(), awq: bool = False,
                 thresholds: dict[str, Any] | None = None, steps: Steps | None = None,
                 awq_calibration: tuple[int, int] = (128, 512)) -> Ladder:
    from .convert import convert
    from .evaluate import EvalSettings, evaluate, write_report
    from .gguf_quant import QuantizeSettings, artifact_name, quantize_gguf
    from .imatrix import ImatrixSettings, compute_imatrix

    if settings.until not in STAGES:
        raise QuantizeError(None, f"unknown stage {settings.until!r}; stages: {', '.join(STAGES)}")
    stop = STAGES.index(settings.until)
    steps = steps or Steps(out)
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
    awq_dir: Path | None = None
    if stop >= 3 and awq:
        from .awq import AwqSettings, quantize_awq

        awq_dir = out / f"{name}-AWQ"
        aws = AwqSettings(samples=awq_calibration[0], seq_len=awq_calibration[1])
        keys["AWQ"] = steps.run("awq", awq_dir, steps.key(stage="awq", src=src_key, calib=fingerprint(calib), s=asdict(aws)),
                                lambda: quantize_awq(hf_dir, awq_dir, calib, aws))  # type: ignore[arg-type]
    report: dict[str, Path] = {}
    failures: list[str] = []
    if stop >= 4:
        es = EvalSettings(settings.eval_ctx, settings.eval_chunks)
        eval_dir = out / "eval"
        artifacts = [f16, *quants.values(), *([awq_dir] if awq_dir else [])]

        def run_eval() -> None:
            rep = evaluate(hf_dir, eval_text, list(artifacts), es, out.parent / "eval-cache", thresholds)
            write_report(rep, eval_dir)

        steps.run("eval", eval_dir / "eval.json",
                  steps.key(stage="eval", artifacts=keys, text=fingerprint(eval_text), s=asdict(es),
                            th={k: asdict(v) for k, v in (thresholds or {}).items()}), run_eval)
        report = {k: eval_dir / f"eval.{k}" for k in ("json", "md", "png")}
        data = json.loads(report["json"].read_text())
        failures = [f for r in data["results"] for f in r["failures"]]
    return Ladder(out, f16, im_path, quants, report, failures, steps.log, awq_dir)


# --- a whole release from a recipe ----------------------------------------------------------

DEFAULT_RECIPE = Path("recipes") / "demo.toml"


def _demo_part(part: str, recipe: Path, root: Path, what: str) -> Path:
    from .demo import build_demo

    demo = build_demo(root)
    if part == "lora":
        from .lora import train_demo_lora

        return train_demo_lora(demo.spm, demo.text["train"], demo.root / "lora")
    found = {**demo.models, **demo.text}.get(part)
    if found is None:
        raise QuantizeError(recipe, f"{what} 'demo:{part}': no such demo part; known: {', '.join([*demo.models, *demo.text, 'lora'])}")
    return found


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
    a path (relative to the recipe or the working folder), or a Hugging Face repo id found in the
    local HF cache (never fetched).  ``root`` holds what the schemes build (demo models, texts)."""
    for scheme, build in SCHEMES.items():
        if spec.startswith(scheme):
            return build(spec.removeprefix(scheme), recipe, root, what)
    for base in (recipe.parent, Path.cwd()):
        if (base / spec).exists():
            return base / spec
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means: not in the local cache
            pass
    raise QuantizeError(recipe, f"{what} {spec!r} is neither a local path nor a model in the Hugging Face cache; "
                        "download it first or point the recipe at a folder")


@dataclass(frozen=True)
class Release:
    root: Path
    ladder: Ladder
    failures: list[str]


def _link_or_copy(src: Path, dst: Path) -> None:
    import os
    import shutil

    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_release(recipe_path: Path | None = None, artifacts: Path = Path("artifacts"),
                  until: str = "release", types: tuple[str, ...] | None = None, demo_root: Path | None = None) -> Release:
    """The whole ladder of a recipe, in dependency order, then the release folder (atomically)."""
    from .recipe import load_recipe
    from .release import Artifact, bits_per_weight, koboldcpp_presets, make_manifest, write_release_files
    from .split import GB, place_gguf

    recipe = load_recipe(recipe_path or DEFAULT_RECIPE)
    if recipe.ladder.awq and until in ("awq", "eval", "release"):
        from .awq import require_autoawq

        require_autoawq()  # before any work
    demo_root = demo_root or artifacts / "demo"
    build_dir = artifacts / "build" / recipe.name
    build_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(build_dir / ".lock", f"another build of {recipe.name} is running"):
        base = resolve(recipe.base, recipe.source, demo_root, "base")
        calib = resolve(recipe.calibration, recipe.source, demo_root, "calibration")
        eval_text = resolve(recipe.evaluation, recipe.source, demo_root, "evaluation")
        steps = Steps(build_dir)
        if recipe.lora:
            from .lora import merge_lora

            adapter = resolve(recipe.lora, recipe.source, demo_root, "lora")
            merged = build_dir / "merged-fp16"
            steps.run("merge", merged, steps.key(stage="merge", base=fingerprint(base), lora=fingerprint(adapter)),
                      lambda: merge_lora(base, adapter, merged, recipe.lora_allow_pickle))
            base = merged
        types = types or tuple(t for t in recipe.ladder.gguf if t != "F16")
        _preflight(base, build_dir, recipe.name, types, recipe.ladder.awq)
        ls = LadderSettings(types=types, use_imatrix=recipe.ladder.imatrix, smooth=recipe.ladder.smooth,
                            until="eval" if until == "release" else until)
        ladder = build_ladder(base, recipe.name, calib, eval_text, build_dir, ls, recipe.ladder.awq, dict(recipe.thresholds), steps,
                              (recipe.ladder.awq_samples, recipe.ladder.awq_seq_len))
        if until != "release" or ladder.failures:
            return Release(build_dir, ladder, ladder.failures)
        out = artifacts / "release" / recipe.name
        source = {"source": fingerprint(base)[:16]}
        quality = json.loads(ladder.report["json"].read_text())
        split_max = int(recipe.ladder.split_max_gb * GB) if recipe.ladder.split_max_gb else None
        rel_key = steps.key(stage="release", eval=fingerprint(ladder.report["json"]), recipe=fingerprint(recipe.source),
                            files={p.name: fingerprint(p) for p in [ladder.f16, *ladder.quants.values()]}, split=split_max)

        def assemble() -> None:
            _check_release_space(out, [ladder.f16, *ladder.quants.values()], split_max)
            with atomic_dir(out) as tmp:
                arts = []
                for kind, path in [("F16", ladder.f16), *ladder.quants.items()]:
                    shards = place_gguf(path, tmp, split_max)
                    presets = koboldcpp_presets(tmp, shards[0].name, recipe)
                    files = (*(Path(s.name) for s in shards), *(Path(p.name) for p in presets))
                    arts.append(Artifact(kind, files, bits_per_weight(path), source))
                if ladder.imatrix is not None:
                    _link_or_copy(ladder.imatrix, tmp / ladder.imatrix.name)
                    (tmp / "imatrix.txt").write_text(_imatrix_description(ladder.imatrix, calib))
                    arts.append(Artifact("imatrix", (Path(ladder.imatrix.name), Path("imatrix.txt")), None, {}))
                if ladder.awq is not None:
                    _link_or_copy(ladder.awq, tmp / ladder.awq.name)
                    files = tuple(sorted(p.relative_to(tmp) for p in (tmp / ladder.awq.name).rglob("*") if p.is_file()))
                    arts.append(Artifact("AWQ", files, None, source))
                write_release_files(tmp, recipe, make_manifest(tmp, recipe, arts, quality))

        steps.run("release", out, rel_key, assemble)
        return Release(out, ladder, [])


def _preflight(base: Path, build_dir: Path, name: str, types: tuple[str, ...], awq: bool) -> None:
    """Refuse before building when the disk cannot hold the artifacts still to be made."""
    from .gguf_quant import artifact_name
    from .quant_types import quant_type
    from .resources import check_free_space

    f16 = sum(p.stat().st_size for p in base.glob("*.safetensors"))  # fp16 weights: the F16 GGUF's size
    todo = {build_dir / f"{name}.F16.gguf": f16}
    todo |= {build_dir / artifact_name(name, t): int(f16 * sum(quant_type(t).bpw) / 2 / 16) for t in types}
    if awq:
        todo[build_dir / f"{name}-AWQ"] = int(f16 * 0.3)
    need = sum(size for path, size in todo.items() if not path.exists())
    check_free_space(build_dir, int(need * 1.1), f"building {name}")


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
