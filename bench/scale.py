"""``nox -s bench-scale``: time and peak memory of every build stage at Mistral-7B's width, measured
at two depths, and what the seed shapes would need on this machine, extrapolated from them.

Inputs (built once, cached under ``OUT/models`` by shape): random fp16 checkpoints of Mistral-7B's
width (hidden 4096, intermediate 14336, 32/8 heads, the real Mistral-7B v0.1 tokenizer, 32000
rows) with a few decoder blocks, a random LoRA adapter for each, and a recipe per depth with small
calibration and evaluation sizes.  Every stage runs in its own process
(``quantize build RECIPE --until STAGE``; the earlier steps are reused, being keyed by their
inputs); its wall time and peak RSS come from ``wait4``.  Beside each peak: the RAM bound the
build's preflight computed for that step (``.steps/<step>.preflight.json``), when it wrote one.

Random weights make quality meaningless: the recipes' thresholds are wide open, the numbers that
matter here are time and memory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import PY, Shape, measure, random_checkpoint, run_record, write_json
from quantize.atomic import atomic_dir
from quantize.formats.safetensors import write_safetensors
from quantize.models.demo import mistral_tokenizer_model

MISTRAL_7B = Shape(4096, 14336, 32, 8, 32000, layers=32, max_positions=32768)
LLAMA2_70B = Shape(8192, 28672, 64, 8, 32000, layers=80)
GEN_FORMAT = 1  # bump when the generator's output changes
GB = 10**9
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_MODULE = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
TARGET_RSS_RATIO = 1.15


@dataclass(frozen=True)
class Sizes:
    """Calibration and evaluation sizes written into the bench's recipes (keys of the recipe's [ladder])."""

    imatrix_chunks: int = 16
    imatrix_ctx: int = 512
    awq_samples: int = 8  # AutoAWQ's 20-point scale grid runs every calibration token through each group, 20 times
    awq_seq_len: int = 128
    eval_windows: int = 8
    eval_ctx: int = 512


@dataclass(frozen=True)
class Stage:
    label: str
    until: str  # `quantize build --until`
    step: str  # the build step whose preflight bound is printed
    types: str | None = None  # `--types`


STAGES = (
    Stage("merge", "merge", "merge"),
    Stage("convert", "convert", "convert"),
    Stage("imatrix", "imatrix", "imatrix"),
    Stage("smooth", "smooth", "smooth"),
    Stage("gguf Q4_K_M", "gguf", "gguf-Q4_K_M", "Q4_K_M"),
    Stage("gguf Q6_K", "gguf", "gguf-Q6_K", "Q6_K"),
    Stage("awq", "awq", "awq"),
    Stage("eval", "eval", "eval"),
    Stage("release", "release", "release"),
)

# How each stage's work grows with a decoder block (for the extrapolation's note).
SCALES_WITH = {
    "merge": "bytes read and written (block parameters)",
    "convert": "bytes read and written (block parameters)",
    "imatrix": "block parameters x calibration tokens",
    "smooth": "bytes read and written (block parameters)",
    "gguf Q4_K_M": "block parameters (quantization work)",
    "gguf Q6_K": "block parameters (quantization work)",
    "awq": "block parameters x calibration tokens x search grid",
    "eval": "block parameters x evaluation tokens, once per artifact",
    "release": "bytes linked or copied (block parameters)",
}


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps({"format": GEN_FORMAT, **obj}, sort_keys=True).encode()).hexdigest()[:12]


def model_paths(root: Path, shape: Shape) -> tuple[Path, Path]:
    """Where the checkpoint and its adapter of ``shape`` are cached."""
    base = root / "models" / f"mistral-w{shape.hidden}-{shape.layers}blocks-{_key(asdict(shape))}"
    return base, base.with_name(base.name + "-lora")


def mistral_tokenizer(out: Path) -> Path:
    """The real Mistral-7B v0.1 SentencePiece tokenizer (shipped by mistral-common), saved with every
    file transformers writes; 32000 tokens, no added ones."""
    from transformers import LlamaTokenizer

    if (out / "tokenizer_config.json").is_file():
        return out
    with atomic_dir(out) as tmp:
        shutil.copyfile(mistral_tokenizer_model(), tmp / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(str(tmp), add_bos_token=True, add_eos_token=False, legacy=True)
        if len(tok) != MISTRAL_7B.vocab:
            raise RuntimeError(f"the Mistral tokenizer has {len(tok)} tokens, expected {MISTRAL_7B.vocab}")
        tok.save_pretrained(str(tmp))
    return out


def random_adapter(out: Path, shape: Shape, base: Path, r: int = 16, alpha: int = 32, seed: int = 1) -> Path:
    """A PEFT LoRA adapter for a ``shape`` checkpoint: every attention and MLP matrix, random A and
    nonzero random B, small enough (merged delta ~10 % of a weight's spread) to keep the model sane."""
    if (out / "adapter_config.json").is_file():
        return out
    dims = {n.rsplit(".", 2)[-2]: sh for n, sh in shape.block_tensors(0) if len(sh) == 2}  # proj -> (out, in)
    layout: list[tuple[str, np.dtype[Any], tuple[int, ...]]] = []
    for i in range(shape.layers):
        for t in LORA_TARGETS:
            rows, cols = dims[t]
            p = f"base_model.model.model.layers.{i}.{LORA_MODULE[t]}.{t}"
            layout += [(f"{p}.lora_A.weight", np.dtype(np.float32), (r, cols)), (f"{p}.lora_B.weight", np.dtype(np.float32), (rows, r))]
    rng = np.random.default_rng(seed)
    # alpha/r * B @ A has std alpha/r * sqrt(r) * 0.01 * 0.025 = 0.002 against the weights' 0.02.
    arrays = (rng.standard_normal(sh, dtype=np.float32) * (0.01 if n.endswith("lora_A.weight") else 0.025) for n, _, sh in layout)
    with atomic_dir(out) as tmp:
        write_safetensors(tmp / "adapter_model.safetensors", layout, arrays, {"format": "pt"})
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base.resolve()), "r": r,
               "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS), "bias": "none",
               "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None}
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def make_inputs(root: Path, shape: Shape) -> tuple[Path, Path]:
    """The cached checkpoint (about 2 GB shards) and LoRA adapter of ``shape``, built if missing."""
    base, lora = model_paths(root, shape)
    tok = mistral_tokenizer(root / "models" / "tokenizer-mistral-7b-v0.1")
    random_checkpoint(base, shape, tok, shard_bytes=2 * GB)
    random_adapter(lora, shape, base)
    return base, lora


def write_recipe(path: Path, name: str, base: Path, lora: Path, sizes: Sizes, stages: tuple[Stage, ...] = STAGES) -> None:
    """The bench's recipe for one depth: the ladder ``stages`` ask for (a stage left out is turned off,
    not built in the next stage's process), with ``sizes`` and wide-open thresholds."""
    labels = {s.label for s in stages}
    gguf = ["F16", *(s.types for s in STAGES if s.types and s.label in labels)]
    lines = [
        "# Written by `nox -s bench-scale`: random weights at Mistral-7B's width; measures time and memory only.",
        f'name = "{name}"', f'base = "{base.resolve()}"', f'lora = "{lora.resolve()}"',
        'calibration = "text:calib"', 'evaluation = "text:eval"', "", "[ladder]", f"gguf = {json.dumps(gguf)}",
        *(f"{k} = {str(k in labels).lower()}" for k in ("awq", "imatrix", "smooth")), *(f"{k} = {v}" for k, v in asdict(sizes).items()), "",
        "# Random weights have no meaningful quality: these limits are wide open so that the gate never stops",
        "# the bench, which measures time and peak memory, not quality.", "[thresholds]",
        *(f"{t} = {{ ppl_ratio = 1000.0, mean_kld = 1000.0 }}" for t in ("F16", "Q6_K", "Q4_K_M", "AWQ")), "",
        "[card]", 'prompt_format = "alpaca-extended"', 'stop = ["\\n### Input", "\\nUser:"]', 'license = "apache-2.0"',
        'description = "Random weights at Mistral-7B\'s width: a benchmark input, not a model."', "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def available_stages() -> tuple[str, ...]:
    """The stages this build's ``quantize build --until`` accepts."""
    help_text = subprocess.run([PY, "-m", "quantize", "build", "--help"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"--until \{([^}]*)\}", help_text)
    return tuple(m.group(1).split(",")) if m else ()


def _preflight(build_dir: Path, step: str) -> dict[str, Any] | None:
    p = build_dir / ".steps" / f"{step}.preflight.json"
    return json.loads(p.read_text()) if p.is_file() else None


def run_depth(root: Path, blocks: int, sizes: Sizes, stages: tuple[Stage, ...], keep: bool,
              saved: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every stage of one depth's build, each in its own process, from a clean build folder; the
    results so far are handed to ``saved`` after every stage."""
    shape = replace(MISTRAL_7B, layers=blocks)
    gen_log = root / "logs" / f"{blocks}blocks-inputs.log"
    gen_log.parent.mkdir(parents=True, exist_ok=True)
    cached = (model_paths(root, shape)[1] / "adapter_config.json").is_file()
    gen = measure([PY, "-m", "bench.scale", "--make-inputs", str(blocks), "--out", str(root)], warm=False, repeat=1,
                  log=gen_log)
    base, lora = model_paths(root, shape)
    name = f"BenchScale-Mistral-7B-width-{blocks}blocks"
    recipe = root / "recipes" / f"{name}.toml"
    write_recipe(recipe, name, base, lora, sizes, stages)
    build_dir, release_dir = root / "build" / name, root / "release" / name
    for d in (build_dir, release_dir, root / "build" / "eval-cache"):
        shutil.rmtree(d, ignore_errors=True)  # measure every step, not reuse a previous run's
    accepted = available_stages()
    res: dict[str, Any] = {"blocks": blocks, "checkpoint_bytes": shape.fp16_bytes, "block_params": shape.block_params,
                           "inputs": {"seconds": gen.seconds, "peak_rss_mb": gen.peak_rss_mb, "cached": cached}, "stages": {}}
    log = root / "logs" / f"{blocks}blocks-build.log"
    log.unlink(missing_ok=True)
    for st in stages:
        if st.until not in accepted:
            res["stages"][st.label] = {"missing": f"`--until {st.until}` is not a stage of this build; its work runs in the next stage"}
            continue
        cmd = [PY, "-m", "quantize", "-v", "build", str(recipe), "--artifacts", str(root), "--until", st.until]
        cmd += ["--types", st.types] if st.types else []
        try:
            run = measure(cmd, warm=False, repeat=1, log=log, anon=True)
        except RuntimeError as exc:
            res["stages"][st.label] = {"failed": str(exc)[-600:]}
            break
        res["stages"][st.label] = {"seconds": run.seconds, "cpu_seconds": run.cpu_seconds, "load_avg": os.getloadavg()[1],
                                   "peak_rss_mb": run.peak_rss_mb, "peak_anon_mb": run.peak_anon_mb,
                                   "preflight": _preflight(build_dir, st.step)}
        saved(res)
        print(f"{blocks} blocks, {st.label}: {run.seconds:.1f}s, peak RSS {run.peak_rss_mb:.0f} MB, heap {run.peak_anon_mb:.0f} MB",
              flush=True)
    if not keep:
        for d in (build_dir, release_dir, root / "build" / "eval-cache"):
            shutil.rmtree(d, ignore_errors=True)
    return res


def baseline_rss_mb() -> float:
    """Peak RSS of a process that only imports what the stages import: the floor under every stage."""
    return measure([PY, "-c", "import torch, transformers, quantize.pipeline, quantize.cli"], warm=False, repeat=1).peak_rss_mb


# --- the report -------------------------------------------------------------------------------


def _fmt_mb(mb: float | None) -> str:
    return "n/a" if mb is None else f"{mb / 1024:.2f} GiB" if mb >= 1024 else f"{mb:.0f} MB"


def _fmt_s(s: float | None) -> str:
    return "n/a" if s is None else f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def _fmt_time(stage: dict[str, Any]) -> str:
    if "seconds" not in stage:
        return "n/a"
    cpu, load = stage.get("cpu_seconds"), stage.get("load_avg")
    return _fmt_s(stage["seconds"]) + (f" ({_fmt_s(cpu)}; {load:.1f})" if cpu is not None and load is not None else "")


def extrapolate(lo: dict[str, Any], hi: dict[str, Any], floor_mb: float, target: Shape) -> dict[str, dict[str, float]]:
    """Per stage, time and peak RAM of a ``target``-shaped model from two measured depths at
    Mistral-7B's width: time = fixed + per-block x blocks, peak = measured peak at the deeper run +
    growth per block x extra blocks; for a wider block, the per-block terms (and the peak above the
    import floor) scale by the ratio of block parameter counts."""
    ratio = target.block_params / MISTRAL_7B.block_params
    n_lo, n_hi = lo["blocks"], hi["blocks"]
    out: dict[str, dict[str, float]] = {}
    for label, b in hi["stages"].items():
        a = lo["stages"].get(label, {})
        if "seconds" not in a or "seconds" not in b:
            continue
        per_block_s = max(0.0, (b["seconds"] - a["seconds"]) / (n_hi - n_lo))
        fixed_s = max(0.0, b["seconds"] - per_block_s * n_hi)
        out[label] = {"seconds": fixed_s + per_block_s * ratio * target.layers, "per_block_s": per_block_s * ratio, "fixed_s": fixed_s}
        for key in ("peak_rss_mb", "peak_anon_mb"):
            if a.get(key) and b.get(key):
                growth_mb = max(0.0, (b[key] - a[key]) / (n_hi - n_lo))
                above_floor = max(0.0, b[key] - floor_mb)
                out[label][key] = floor_mb + above_floor * ratio + growth_mb * ratio * (target.layers - n_hi)
    return out


def render(results: list[dict[str, Any]], sizes: Sizes, floor_mb: float, cores: int | None = None) -> str:
    """The report in markdown: the measured table per stage and depth, then (from two depths or more) the
    extrapolation to Mistral-7B and Llama-2-70B; ``cores``: the measuring machine's CPU count (default: this one's)."""
    cores = cores or os.cpu_count()
    runs = sorted(results, key=lambda r: r["blocks"])
    lo, hi = runs[0], runs[-1]
    depths = [r["blocks"] for r in runs]
    lines = ["# bench-scale: every stage at Mistral-7B's width (random weights), each in its own process", "",
             "## Measured on this machine (" + ", ".join(f"{r['blocks']} blocks: {r['checkpoint_bytes'] / 2**30:.2f} GiB fp16" for r in runs)
             + "; LoRA r=16 merged first)", ""]
    head = ["stage", *(f"time @{n} (CPU; load)" for n in depths), *(f"peak RSS @{n}" for n in depths),
            *(f"heap @{n}" for n in depths)]
    if len(runs) > 1:
        head += [f"RSS {hi['blocks']}/{lo['blocks']} (target <= {TARGET_RSS_RATIO})", f"heap {hi['blocks']}/{lo['blocks']}"]
    head += [f"bound @{hi['blocks']} (preflight)", "peak under bound"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for st in [s.label for s in STAGES if any(s.label in r["stages"] for r in runs)]:
        cells = [st]
        per = [r["stages"].get(st, {}) for r in runs]
        if any("missing" in p for p in per):
            lines.append(f"| {st} | " + " | ".join(["not measured: " + next(p["missing"] for p in per if "missing" in p)]
                                                    + [""] * (len(head) - 2)) + " |")
            continue
        if any("failed" in p for p in per):
            fail = next(p["failed"] for p in per if "failed" in p).strip().splitlines()[-1][:200].replace("|", "/")
            lines.append(f"| {st} | failed: {fail} |" + " |" * (len(head) - 2))
            continue
        cells += [_fmt_time(p) for p in per] + [_fmt_mb(p.get("peak_rss_mb")) for p in per] + [_fmt_mb(p.get("peak_anon_mb")) for p in per]
        if len(runs) > 1:
            a, b = per[0].get("peak_rss_mb"), per[-1].get("peak_rss_mb")
            cells.append(f"{b / a:.2f}" + ("" if b / a <= TARGET_RSS_RATIO else " (over)") if a and b else "n/a")
            a, b = per[0].get("peak_anon_mb"), per[-1].get("peak_anon_mb")
            cells.append(f"{b / a:.2f}" if a and b else "n/a")
        pre = per[-1].get("preflight")
        bound_mb = pre["need_bytes"] / 2**20 if pre else None
        cells.append(_fmt_mb(bound_mb))
        cells.append("n/a" if bound_mb is None else "yes" if per[-1]["peak_rss_mb"] <= bound_mb else "no")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Sizes used: imatrix {sizes.imatrix_chunks} chunks x {sizes.imatrix_ctx} tokens, AWQ {sizes.awq_samples} "
              f"samples x {sizes.awq_seq_len} tokens, gate {sizes.eval_windows} windows x {sizes.eval_ctx} tokens."]
    lines += [*(f"Inputs at {r['blocks']} blocks: {'cached' if r['inputs'].get('cached') else 'generated'} in "
                f"{_fmt_s(r['inputs']['seconds'])}, generator peak RSS {_fmt_mb(r['inputs']['peak_rss_mb'])}." for r in runs),
              f"Import floor (a process importing torch, transformers and quantize): {_fmt_mb(floor_mb)}.",
              "Time is the wall time of one cold run per stage (page cache as the previous stage left it), then the stage "
              f"process's CPU time (user + system) and the machine's 5-minute load average ({cores} cores): wall time depends on "
              "what else shares the cores, CPU time much less. Peak RSS is the kernel's high-water mark from wait4; it "
              "counts the pages of files the stage maps (llama.cpp maps the GGUF it evaluates or quantizes: those pages "
              "are the page cache's, dropped under pressure). Heap is the highest anonymous RSS (RssAnon, without mapped "
              "files), sampled every 50 ms.", ""]
    if len(runs) > 1:
        lines += [f"## Extrapolated (not measured) for the seed shapes on this machine's CPU, from the {lo['blocks']}- and "
                  f"{hi['blocks']}-block runs", "",
                  "time = fixed + per-block x blocks, per-block = the difference between the two runs / blocks added; "
                  "peak RAM = peak at the deeper run + growth per block x extra blocks. For Llama-2-70B "
                  f"(hidden 8192, intermediate 28672, 64/8 heads: {LLAMA2_70B.block_params / MISTRAL_7B.block_params:.2f}x the "
                  "parameters per block) the per-block time, the growth and the peak above the import floor are scaled by "
                  "that ratio (the embeddings and output matrix, 2x wider, are inside that term, so conservatively). "
                  "The extrapolation is for the CPU only. Same small calibration/evaluation sizes as above. Built on wall times: "
                  f"when the load average above exceeds the {cores} cores, other jobs' work is in them and the per-block figures "
                  "are noisy; re-run on an idle machine before planning by them.", "",
                  "| stage | scales with | Mistral-7B (32 blocks) time | peak RSS | heap | Llama-2-70B (80 blocks) time | peak RSS | heap |",
                  "|---|---|---|---|---|---|---|---|"]
        m7, m70 = extrapolate(lo, hi, floor_mb, MISTRAL_7B), extrapolate(lo, hi, floor_mb, LLAMA2_70B)
        for st in m7:
            lines.append(f"| {st} | {SCALES_WITH.get(st, '')} | {_fmt_s(m7[st]['seconds'])} | {_fmt_mb(m7[st].get('peak_rss_mb'))} | "
                         f"{_fmt_mb(m7[st].get('peak_anon_mb'))} | {_fmt_s(m70[st]['seconds'])} | {_fmt_mb(m70[st].get('peak_rss_mb'))} | "
                         f"{_fmt_mb(m70[st].get('peak_anon_mb'))} |")
        t7, t70 = sum(v["seconds"] for v in m7.values()), sum(v["seconds"] for v in m70.values())
        lines += [f"| total | | {_fmt_s(t7)} | | | {_fmt_s(t70)} | | |", ""]
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    """:func:`render` of the results file's content (its runs, sizes, import floor and the machine's CPU count)."""
    cores = data.get("run", {}).get("machine", {}).get("cpus")
    return render(data["runs"], Sizes(**data.get("sizes", {})), data["floor_mb"], cores)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.scale")
    ap.add_argument("--out", default=Path("artifacts/bench-scale"), type=Path)
    ap.add_argument("--blocks", default="2,4", help="decoder blocks per run, comma-separated (32: the full Mistral-7B depth)")
    ap.add_argument("--stages", help="only these stages (comma-separated labels); the recipe turns the others off")
    ap.add_argument("--size", action="append", default=[], metavar="KEY=N",
                    help=f"a calibration or evaluation size other than the default ({', '.join(f'{k}={v}' for k, v in asdict(Sizes()).items())})")
    ap.add_argument("--keep", action="store_true", help="keep each depth's build and release folders")
    ap.add_argument("--report-only", action="store_true", help="re-render the report from OUT/results.json")
    ap.add_argument("--make-inputs", type=int, metavar="BLOCKS", help=argparse.SUPPRESS)  # the generator's own process
    a = ap.parse_args(argv)
    if a.make_inputs is not None:
        make_inputs(a.out, replace(MISTRAL_7B, layers=a.make_inputs))
        return 0
    try:
        sizes = replace(Sizes(), **{k: int(v) for k, v in (kv.split("=", 1) for kv in a.size)})
    except (TypeError, ValueError) as exc:
        ap.error(f"--size: {exc}")
    results_file = a.out / "results.json"
    if a.report_only:
        data = json.loads(results_file.read_text())
    else:
        wanted = set(a.stages.split(",")) if a.stages else {s.label for s in STAGES}
        stages = tuple(s for s in STAGES if s.label in wanted)
        a.out.mkdir(parents=True, exist_ok=True)
        data = {"run": run_record(ap.prog, argv), "floor_mb": baseline_rss_mb(), "sizes": asdict(sizes), "runs": []}
        done: list[dict[str, Any]] = []
        for n in sorted(int(b) for b in a.blocks.split(",")):
            def saved(res: dict[str, Any]) -> None:
                data["runs"] = [*done, res]
                write_json(results_file, data)

            done.append(run_depth(a.out, n, sizes, stages, a.keep, saved))
    report = markdown(data)
    (a.out / "bench-scale.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
