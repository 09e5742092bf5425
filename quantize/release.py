"""Stage 5: the release folder people download: checksummed files, a manifest, a model card and
koboldcpp launcher presets, plus ``quantize verify`` for a downloaded copy.

:func:`assemble_release` puts every GGUF (split when larger than the recipe's cap) with its
koboldcpp presets, the importance matrix and the AWQ folder into the folder, atomically, as a
build step keyed by everything it is made from.

``manifest.json`` lists every artifact (files, sizes, sha256, type, bits per weight, the inputs'
hashes, tool versions, quality figures and verdict); ``SHA256SUMS`` is the same in the format
``sha256sum -c`` reads.  ``verify`` re-hashes a folder against its manifest and reports missing,
extra, wrong-size and wrong-hash files.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from quantize.architectures import rows_of
from quantize.atomic import atomic_dir, atomic_file, link_or_copy, sha256_file
from quantize.budget import MIX_SUFFIX, parse_budget
from quantize.errors import QuantizeError
from quantize.fingerprint import fingerprint
from quantize.formats.gguf_read import read_header
from quantize.formats.gguf_split import GB, place_gguf
from quantize.imatrix import Imatrix
from quantize.models.corpus import TextSplit
from quantize.models.general_text import SOURCES_FILE
from quantize.models.hub import source_record
from quantize.recipe import SAMPLERS, Recipe, render_chat
from quantize.resources import check_free_space
from quantize.run_memory import shape_of
from quantize.sillytavern import SUFFIX as TAVERN_SUFFIX
from quantize.sillytavern import write_sillytavern
from quantize.steps import Steps, step_key
from quantize.versions import tool_versions

MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
# Files verify ignores: the manifest and checksum list describe the others.
SELF = {MANIFEST, SUMS}

USE_CASES = {
    "F16": "reference quality; for further quantization or GPUs with memory to spare",
    "Q8_0": "near-lossless, large",
    "Q6_K": "near-lossless; recommended when it fits",
    "Q5_K_M": "very small loss",
    "Q4_K_M": "recommended balance of size and quality",
    "AWQ": "4-bit for GPU servers (vLLM, TGI, SGLang, transformers)",
}


SILLYTAVERN = "SillyTavern"  # the manifest kind of <Model>.SillyTavern.json
SUPPORT_FILES = {"imatrix", SILLYTAVERN}  # listed and checksummed, not rows of the card's table of versions

MANIFEST_PACKAGES = ("llama-cpp-python", "gguf", "transformers", "torch", "autoawq")



def min_llama_cpp(arch: str | None) -> str:
    """The oldest llama.cpp that loads a GGUF architecture, from its family row; for one written by
    llama.cpp's own converter (no row), that converter's llama.cpp."""
    rows = rows_of(arch or "llama")
    return rows[0].min_llama_cpp if rows else "as new as the llama.cpp converter that wrote them"


@dataclass(frozen=True)
class Artifact:
    kind: str  # F16, Q6_K, Q4_K_M, AWQ
    files: tuple[Path, ...]  # relative to the release folder
    bits_per_weight: float | None
    inputs: dict[str, str]  # name -> sha256 of what it was built from
    ram_bytes: int | None = None  # running it at the card's context (quantize.run_memory)


def bits_per_weight(path: Path) -> float | None:
    if path.suffix != ".gguf":
        return None

    return round(read_header(path).bits_per_weight, 3)


def evaluated_name(a: Artifact) -> str:
    """The name the quality report gives an artifact: the GGUF as evaluated (before any split into
    shards), or the AWQ folder."""
    gguf = next((f for f in a.files if f.suffix == ".gguf"), None)
    if gguf is not None:
        return _unsplit_stem(gguf.name) + ".gguf"
    return a.files[0].parts[0]


def make_manifest(root: Path, recipe: Recipe, artifacts: list[Artifact], quality: dict[str, Any]) -> dict[str, Any]:
    """Hash every artifact file (once) and describe it, with its quality figures and verdict."""
    results = {r["name"]: r for r in quality.get("results", [])}
    entries = []
    for a in artifacts:
        files: list[dict[str, Any]] = []
        for rel in a.files:
            files.append({"name": str(rel), "size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)})
        q = results.get(evaluated_name(a)) or {}
        entries.append({
            "kind": a.kind, "files": files, "size": sum(f["size"] for f in files), "bits_per_weight": a.bits_per_weight,
            "ram_bytes": a.ram_bytes, "inputs": a.inputs,
            "quality": {k: q.get(k) for k in ("ppl", "ppl_ratio", "mean_kld", "kld_p99", "top1_agreement")} if q else None,
            "verdict": ("pass" if not q.get("failures") else "fail") if q else "not measured",
        })
    first_gguf = next((root / f for a in artifacts for f in a.files if f.suffix == ".gguf"), None)
    arch = None
    if first_gguf is not None:
        arch = read_header(first_gguf).kv.get("general.architecture")
    return {
        "name": recipe.name, "recipe": recipe.source.name, "quantized_by": recipe.quantized_by, "architecture": arch,
        "tools": tool_versions(MANIFEST_PACKAGES),
        "reference_ppl": quality.get("reference_ppl"), "evaluation_text_sha256": quality.get("text_sha256"),
        "artifacts": entries,
    }


def write_release_files(root: Path, recipe: Recipe, manifest: dict[str, Any]) -> Path:
    """The model card (README.md), then manifest.json and SHA256SUMS covering every file, the card too."""
    card = root / "README.md"
    with atomic_file(card) as tmp:
        tmp.write_text(model_card(recipe, manifest))
    manifest["card"] = {"name": card.name, "size": card.stat().st_size, "sha256": sha256_file(card)}
    files = [f for a in manifest["artifacts"] for f in a["files"]] + [manifest["card"]]
    sums = [f"{f['sha256']}  {f['name']}" for f in files]
    with atomic_file(root / SUMS) as tmp:
        tmp.write_text("\n".join(sums) + "\n")
    with atomic_file(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2))
    return root / MANIFEST


@dataclass(frozen=True)
class VerifyReport:
    missing: list[str]
    extra: list[str]
    wrong_size: list[str]
    wrong_hash: list[str]
    unsafe: list[str] = field(default_factory=list)  # "<name> (<why>)": never read

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.wrong_size or self.wrong_hash or self.unsafe)

    def lines(self) -> list[str]:
        return ([f"unsafe: {f}" for f in self.unsafe] + [f"missing: {f}" for f in self.missing]
                + [f"extra: {f}" for f in self.extra] + [f"wrong size: {f}" for f in self.wrong_size]
                + [f"wrong sha256: {f}" for f in self.wrong_hash])


def _manifest_entries(mpath: Path, manifest: Any) -> dict[str, dict[str, Any]]:
    """name -> {size, sha256} for every file a manifest lists, or a one-line error saying what is malformed."""
    def bad(what: str) -> QuantizeError:
        return QuantizeError(mpath, f"malformed manifest: {what}; re-download it or rebuild the release")

    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), list):
        raise bad("no \"artifacts\" list")
    entries = []
    for a in manifest["artifacts"]:
        if not isinstance(a, dict) or not isinstance(a.get("files"), list):
            raise bad("an artifact without a \"files\" list")
        entries += a["files"]
    if "card" in manifest:
        entries.append(manifest["card"])
    out = {}
    for f in entries:
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("size"), int)
                and isinstance(f.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", f["sha256"])):
            raise bad(f"a file entry is not {{name, size, sha256}}: {json.dumps(f)[:120]}")
        out[f["name"]] = f
    return out


def _unsafe_name(name: str) -> str | None:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name or str(p) != name:
        return "leaves the release folder" if (p.is_absolute() or ".." in p.parts) else "not a plain relative path"
    return None


def _walk(root: Path) -> tuple[set[str], dict[str, str]]:
    """Regular files under ``root`` (relative names; symbolic links not followed) and what is not one."""
    files: set[str] = set()
    unsafe: dict[str, str] = {}
    for here, dirs, names in os.walk(root, followlinks=False):
        for n in sorted(dirs + names):
            path = Path(here) / n
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                unsafe[rel] = "a symbolic link; a release holds the bytes it vouches for"
            elif stat.S_ISREG(st.st_mode):
                if path.parent != root or n not in SELF:
                    files.add(rel)
            elif not stat.S_ISDIR(st.st_mode):
                unsafe[rel] = "not a regular file"
    return files, unsafe


def verify(root: str | Path) -> VerifyReport:
    """Check a release folder against its manifest without reading anything outside it: every listed
    file present as a regular file with its size and sha256, nothing unlisted, no symbolic link."""
    root = Path(root)
    if not root.is_dir():
        raise QuantizeError(root, "not a folder; pass the release folder")
    mpath = root / MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        raise QuantizeError(root, f"no {MANIFEST} (as a regular file); not a release folder made by quantize")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantizeError(mpath, f"not valid JSON ({exc})") from None
    listed = _manifest_entries(mpath, manifest)
    present, unsafe = _walk(root)
    unsafe |= {name: why for name in sorted(listed) if (why := _unsafe_name(name))}
    listed = {k: v for k, v in listed.items() if k not in unsafe}
    missing = sorted(set(listed) - present)
    extra = sorted(present - set(listed))
    wrong_size, wrong_hash = [], []
    for name in sorted(set(listed) & present):
        f = listed[name]
        if (root / name).lstat().st_size != f["size"]:
            wrong_size.append(name)
        elif sha256_file(root / name) != f["sha256"]:
            wrong_hash.append(name)
    return VerifyReport(missing, extra, wrong_size, wrong_hash, [f"{name} ({why})" for name, why in unsafe.items()])


# --- the model card and koboldcpp presets ---------------------------------------------------


# What koboldcpp's ``--exporttemplate`` (``convert_args_to_template``) resets so that a .kcppt carries
# no device-specific settings: koboldcpp picks the backend and offload for the machine that loads it.
TEMPLATE_RESETS: dict[str, Any] = {
    "istemplate": True, "gpulayers": -1, "threads": -1, "hordekey": "", "hordeworkername": "", "sdthreads": 0,
    "maingpu": -1, "sdmaingpu": -1, "password": None, "adminpassword": None, "usemmap": False, "usemlock": False,
    "debugmode": 0, "ssl": None, "usecuda": None, "usevulkan": None, "useclblast": None, "usecpu": None,
    "tensor_split": None, "draftgpusplit": None, "ttsthreads": 0, "nommq": False, "splitmode": "layer",
}
# The oldest koboldcpp that applies a preset's gendefaults to text generation (1.102 has no such option
# for text; older versions keep the key and ignore it).
MIN_KOBOLDCPP = "1.107"


def hub_url(repo: str, name: str) -> str:
    """The Hub's download URL of a file in a model repo (what koboldcpp fetches when given a URL)."""
    return f"https://huggingface.co/{repo}/resolve/main/{name}"


def koboldcpp_presets(root: Path, gguf_name: str, recipe: Recipe) -> tuple[Path, Path]:
    """koboldcpp launch files next to a GGUF (the first shard of a split one), both with the recipe's
    context size, its prompt format as a chat-completions adapter, and its suggested sampler settings
    and stop strings as default generation parameters (``gendefaults``):

    * ``<Model>.<TYPE>.kcpps``, a settings file naming the GGUF by file name (koboldcpp resolves it
      against the current folder), with every layer offloaded to a GPU when there is one;
    * ``<Model>.<TYPE>.kcppt``, a launch template as ``--exporttemplate`` writes it (device settings
      reset), naming the GGUF by its Hub download URL when the recipe has a ``hub_repo``.

    The stop strings are given twice: ``stop_sequence`` for koboldcpp's own API, and ``stop`` for the
    OpenAI-compatible endpoints, which replace ``stop_sequence`` with the request's ``stop``."""
    c = recipe.card
    fmt = c.format
    gen: dict[str, Any] = {SAMPLERS[k]: v for k, v in c.sampler.items()}
    stops = list(c.stop or fmt.stop)
    gen["stop_sequence"] = stops
    gen["stop"] = stops
    common = {"contextsize": c.context, "chatcompletionsadapter": dict(fmt.turns), "gendefaults": json.dumps(gen)}
    settings = {"model_param": gguf_name, **common, "gpulayers": -1, "usemmap": True, "quiet": False}
    template = {"model_param": hub_url(recipe.hub_repo, gguf_name) if recipe.hub_repo else gguf_name, **common,
                **TEMPLATE_RESETS}
    stem = _unsplit_stem(gguf_name)
    out = []
    for suffix, preset in ((".kcpps", settings), (".kcppt", template)):
        path = root / (stem + suffix)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(preset, indent=2))
        out.append(path)
    return out[0], out[1]


def _unsplit_stem(name: str) -> str:
    """``X.Q6_K-00001-of-00002.gguf`` -> ``X.Q6_K``: one preset per model, however many shards."""
    return re.sub(r"-\d{5}-of-\d{5}$", "", Path(name).stem)


def _ram_needed(artifact: dict[str, Any]) -> str:
    return f"{artifact['ram_bytes'] / 2**30:.1f} GiB" if artifact.get("ram_bytes") else "–"


def quality_summary(manifest: dict[str, Any]) -> str:
    """The card's sentence on the quality gate, from the manifest's verdicts."""
    gated = [a for a in manifest["artifacts"] if a["kind"] in USE_CASES or a["kind"].endswith(MIX_SUFFIX)]
    if gated and all(a["verdict"] == "pass" for a in gated):
        return f"Every file passed its threshold ({len(gated)} of {len(gated)})."
    said = {"pass": "passed its threshold", "fail": "failed its threshold", "not measured": "was not measured"}
    return " ".join(f"{a['kind']} {said[a['verdict']]}." for a in gated)


def model_card(recipe: Recipe, manifest: dict[str, Any]) -> str:
    c = recipe.card
    fmt = c.format
    convo = ([{"role": "system", "content": c.system}] if c.system else []) + [
        {"role": "user", "content": "{prompt}"}, {"role": "assistant", "content": "{reply}"}, {"role": "user", "content": "{prompt}"}]
    prompt = render_chat(fmt.turns, convo)
    tags = ["gguf", "awq", "quantized", *c.tags]
    front = ["---", f"base_model: {c.base_model or recipe.base}", f"quantized_by: {recipe.quantized_by}",
             f"license: {c.license or 'other'}", "tags:", *[f"- {t}" for t in tags], "---", ""]
    mixes = {parse_budget(m["budget"]).mix_kind: m for m in manifest.get("mixes", []) if m["shipped"] == "mix"}
    rows = ["| file | quant method | bits | size | RAM needed | PPL ratio | mean KLD | use case |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for a in manifest["artifacts"]:
        if a["kind"] in SUPPORT_FILES:
            continue
        q = a.get("quality") or {}
        name = a["files"][0]["name"] if a["kind"] != "AWQ" else str(Path(a["files"][0]["name"]).parent) + "/"
        if (parts := sum(f["name"].endswith(".gguf") for f in a["files"])) > 1:
            name += f" (+{parts - 1} more parts)"
        method = "llama.cpp " + a["kind"] if a["kind"] != "AWQ" else "AutoAWQ 4-bit g128 GEMM"
        use = USE_CASES.get(a["kind"], "")
        if (mix := mixes.get(a["kind"])) is not None:
            method = f"llama.cpp, types searched per tensor ({mix['raised']} tensors raised, {mix['lowered']} lowered vs {mix['stock']})"
            use = f"lower KL divergence than {mix['stock']} at no more bytes"
        bits = f"{a['bits_per_weight']:.2f}" if a.get("bits_per_weight") else ("4" if a["kind"] == "AWQ" else "")
        ratio = f"{q['ppl_ratio']:.4f}" if q.get("ppl_ratio") is not None else "–"
        kld = f"{q['mean_kld']:.5f}" if q.get("mean_kld") is not None else "–"
        rows.append(f"| {name} | {method} | {bits} | {a['size'] / 2**30:.2f} GiB | {_ram_needed(a)} | "
                    f"{ratio} | {kld} | {use} |")
    sampler = "\n".join(f"- {k} = {v}" for k, v in c.sampler.items()) or "- the model's defaults"
    first_gguf = next((a["files"][0]["name"] for a in manifest["artifacts"] if a["kind"] == "Q4_K_M"), "MODEL.gguf")
    body = [
        f"# {recipe.name} — GGUF and AWQ", "", c.description, "",
        "## Available versions", "", *rows, "",
        f"Quality is measured against the fp16 model on held-out text (reference perplexity {manifest.get('reference_ppl') or 0:.3f}): "
        f"perplexity ratio and mean KL divergence, llama-perplexity's method. {quality_summary(manifest)}", "",
        f"Calibration text (importance matrix, smoothing, AWQ): {text_description(recipe.calibration)}. "
        f"Evaluation text (the quality gate): {text_description(recipe.evaluation)}.", "",
        *_mix_lines(manifest),
        f"RAM needed: the file, an f16 KV cache for a {c.context}-token context and llama.cpp's compute buffer (an "
        "estimate from the model's shape); full GPU offload needs about as much VRAM.", "",
        "## Prompt format", "", "```", prompt, "```", "",
        f"Stop strings: {', '.join(repr(s) for s in (c.stop or fmt.stop))}", "",
        "## Suggested settings", "", sampler, f"- context: {c.context}", "",
        "## Use with koboldcpp", "", *_koboldcpp_section(recipe, _unsplit_stem(first_gguf)), "",
        "## Use with SillyTavern", "",
        f"`{recipe.name}{TAVERN_SUFFIX}` holds the prompt format as SillyTavern instruct and context templates and the "
        "system prompt: import it once under Advanced Formatting (Master Import), then connect to koboldcpp or llama.cpp's "
        "server as a text-completion API.", "",
        "## Use with llama.cpp", "", "```", f"llama-cli -m {first_gguf} -c {c.context} -cnv", "```", "",
        f"The GGUFs need llama.cpp {min_llama_cpp(manifest.get('architecture'))} "
        "or newer, or a koboldcpp built on it.", "",
        "## Verify a download", "", "```", "sha256sum -c SHA256SUMS   # or: quantize verify .", "```", "",
    ]
    if c.credits:
        body += ["## Credits", "", c.credits, ""]
    return "\n".join(front + body)


def _mix_lines(manifest: dict[str, Any]) -> list[str]:
    """The card's account of each searched mix: shipped, or the stock type instead and why."""
    lines = []
    for m in manifest.get("mixes", []):
        if m["shipped"] == "mix":
            lines.append(f"- `{m['mix_file']}` (budget {m['budget']}): each tensor's type chosen for the least predicted KL "
                         f"divergence within {m['stock']}'s size; mean KLD {m['mix_kld']:.5f} against {m['stock']}'s "
                         f"{m['stock_kld']:.5f}.")
        else:
            lines.append(f"- Budget {m['budget']}: {m['stock']} ships, because {m['why']}.")
    return [*lines, ""] if lines else []


def _koboldcpp_section(recipe: Recipe, stem: str) -> list[str]:
    where = (f"names the GGUF by its download URL, so it works from any folder: "
             f"`koboldcpp --config {hub_url(recipe.hub_repo, stem + '.kcppt')}` downloads the model (every part of a "
             "split one) and starts it" if recipe.hub_repo else
             "names the GGUF by file name, so run it as the `.kcpps` below")
    return [
        f"Needs koboldcpp {MIN_KOBOLDCPP} or newer: older versions load the presets but silently ignore their "
        "suggested settings and stop strings (`gendefaults`).", "",
        f"- `{stem}.kcppt` is a launch template: no device settings, koboldcpp picks the backend and GPU offload "
        f"for your machine. It {where}.",
        f"- `{stem}.kcpps` is a settings file that names the GGUF by file name, which koboldcpp looks up in the "
        "current folder: run it from the folder holding the files, from anywhere with "
        f"`cd /path/to/the/files && koboldcpp --config {stem}.kcpps`.",
        "",
        "Both carry the context size, the prompt format as a chat-completions adapter, and the suggested settings "
        "and stop strings as generation defaults (a request that sets its own values keeps them); the chat template "
        "is embedded in the GGUF too, and BOS is added once by the backend. A file listed with more parts is split in "
        "llama.cpp's `gguf-split` layout: download every part into one folder and open the first.",
    ]


# --- assembly ------------------------------------------------------------------------------

SPLIT_COPY_MARGIN = 1.05  # split shards are copies: their bytes plus a twentieth for headers and the filesystem


@dataclass(frozen=True)
class ReleaseInputs:
    """What the build made that goes into the release, and the keys it was made with."""

    ggufs: tuple[tuple[str, Path], ...]  # (type, file): F16 first, then the quantizations
    imatrix: Path | None
    awq: Path | None
    report: Path  # the quality gate's eval.json
    calib: Path
    src_key: str
    keys: dict[str, str]
    sources: dict[str, Path]  # recipe part ("base", "lora") -> the folder it resolved to
    mixes: tuple[dict[str, Any], ...] = ()  # per budget: the searched mix or the stock type shipped, and why


def assemble_release(recipe: Recipe, out: Path, made: ReleaseInputs, steps: Steps) -> Path:
    """The release folder ``out``: every GGUF (split when large) with its koboldcpp preset, the importance
    matrix, the AWQ folder, the manifest, checksums and model card; a step keyed by everything it is made from."""
    source = {"source": made.src_key[:16]}
    quality = json.loads(made.report.read_text())
    split_max = int(recipe.ladder.split_max_gb * GB) if recipe.ladder.split_max_gb else None
    key = step_key(stage="release", eval=fingerprint(made.report), recipe=fingerprint(recipe.source),
                   files={p.name: fingerprint(p) for _, p in made.ggufs}, split=split_max, mixes=made.mixes,
                   awq=made.keys.get("AWQ"), imatrix=made.keys.get("imatrix"))

    def assemble() -> None:
        _check_split_space(out, [p for _, p in made.ggufs], split_max)
        with atomic_dir(out) as tmp:
            arts = []
            for kind, path in made.ggufs:
                shards = place_gguf(path, tmp, split_max)
                presets = koboldcpp_presets(tmp, shards[0].name, recipe)
                files = (*(Path(s.name) for s in shards), *(Path(p.name) for p in presets))
                arts.append(Artifact(kind, files, bits_per_weight(path), source, _ram(path, recipe)))
            if made.imatrix is not None:
                link_or_copy(made.imatrix, tmp / made.imatrix.name)
                (tmp / "imatrix.txt").write_text(_imatrix_description(made.imatrix, made.calib, recipe))
                arts.append(Artifact("imatrix", (Path(made.imatrix.name), Path("imatrix.txt")), None, {}))
            tavern = write_sillytavern(tmp, recipe.name, recipe)
            arts.append(Artifact(SILLYTAVERN, (Path(tavern.name),), None, {}))
            if made.awq is not None:
                link_or_copy(made.awq, tmp / made.awq.name)
                files = tuple(sorted(p.relative_to(tmp) for p in (tmp / made.awq.name).rglob("*") if p.is_file()))
                arts.append(Artifact("AWQ", files, None, source, _ram(made.awq, recipe)))
            manifest = make_manifest(tmp, recipe, arts, quality)
            specs = {"base": recipe.base, "lora": recipe.lora}
            manifest["sources"] = {part: source_record(spec, path, recipe.revision.get(part))
                                   for part, path in made.sources.items() if (spec := specs[part])}
            if made.mixes:
                manifest["mixes"] = list(made.mixes)
            write_release_files(tmp, recipe, manifest)

    steps.run("release", out, key, assemble)
    return out


def _ram(artifact: Path, recipe: Recipe) -> int:
    """Memory to run ``artifact`` at the card's context: its size, KV cache and compute buffer."""
    size = artifact.stat().st_size if artifact.is_file() else sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    return shape_of(artifact).ram_bytes(size, recipe.card.context)


def _check_split_space(out: Path, ggufs: list[Path], split_max: int | None) -> None:
    """GGUFs are hard-linked into the release; the ones to be split are copied, so need room."""
    need = sum(p.stat().st_size for p in ggufs if split_max is not None and p.stat().st_size > split_max)
    if need:
        check_free_space(out.parent, int(need * SPLIT_COPY_MARGIN), f"splitting {out.name}'s large GGUFs")


def _imatrix_description(imatrix: Path, calib: Path, recipe: Recipe) -> str:
    im = Imatrix.load(imatrix)
    sources = calib.with_name(SOURCES_FILE)
    listed = f"\n{sources.read_text(encoding='utf-8')}" if recipe.calibration.startswith("general:") and sources.is_file() else ""
    return (f"Importance matrix {imatrix.name}: {len(im.sums)} matrices, {im.chunk_count} chunks of {im.chunk_size} tokens\n"
            f"from calibration text {calib.name} (sha256 {sha256_file(calib)}, {calib.stat().st_size} bytes): "
            f"{text_description(recipe.calibration)}.\n"
            "The evaluation text was kept out of calibration.\n" + listed)


def text_description(spec: str) -> str:
    """What a recipe's calibration or evaluation reference is, in words."""
    split = TextSplit()
    plays = {"calib": split.calib_plays, "eval": split.eval_plays}
    scheme, _, part = spec.partition(":")
    if scheme in ("demo", "text") and part in plays:
        return "Shakespeare, " + " and ".join(p.replace("-", " ").title() for p in plays[part]) + " (public domain)"
    if scheme == "general":
        return (f"the general {'calibration' if part == 'calib' else 'evaluation'} text: prose, code, conversations in the "
                "model's own chat template, numbers, markup and other languages, from what Python and the installed "
                "packages ship (sources and licenses in imatrix.txt)")
    return f"{Path(spec).name}, given by the recipe"
