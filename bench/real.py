"""``nox -s bench-real``: the whole ladder on a real pretrained model (Gemma 3 270M), one table.

Every artifact is scored on the same held-out windows (the demo's evaluation plays, never the
calibration text) against the fp16 HF model in float32: perplexity ratio, mean and 99th-percentile
KL divergence, top-1 agreement, size, and the time its step took.  The goal it prints: AWQ's
perplexity delta at most half of round-to-nearest's at the same 4-bit g128 grid.

Caveat (see the issue and README): the published weights were already quantized by llama.cpp, so
the K-quant rows are close to lossless here and some 640-wide rows fall back to Q5_0/Q8_0; the F16,
AWQ and round-to-nearest rows are fully meaningful.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.measure import run_record, write_results
from quantize.awq import AwqSettings, quantize_rtn
from quantize.errors import QuantizeError
from quantize.evaluate import EvalSettings, reference_logprobs, score_artifact
from quantize.gguf_quant import QuantizeSettings, quantize_gguf
from quantize.pipeline import build_release
from quantize.recipe import load_recipe
from quantize.sources import resolve
from quantize.thresholds import DEFAULT_THRESHOLDS

RECIPE = Path("recipes") / "gemma3-270m.toml"


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(artifacts: Path, recipe: Path = RECIPE) -> dict[str, Any]:
    """The recipe's whole release (F16, imatrix, Q6_K, Q4_K_M with the imatrix, AWQ, gate), then
    the two baselines it does not ship, plain Q4_K_M and round-to-nearest, scored on the gate's
    own windows against the same cached reference."""
    r = load_recipe(recipe)
    hf, fetch_s = _timed(lambda: resolve(r.base, r.source, artifacts / "demo", "base"))
    rel, release_s = _timed(lambda: build_release(recipe, artifacts))
    if rel.failures:
        raise QuantizeError(recipe, "the release failed its gate: " + "; ".join(rel.failures))
    lad, secs = rel.ladder, rel.ladder.log.seconds
    gate = {g["name"]: g for g in json.loads(lad.report["json"].read_text())["results"]}
    extras = lad.root.parent / f"{r.name}-baselines"
    extras.mkdir(parents=True, exist_ok=True)
    plain, plain_s = _timed(lambda: quantize_gguf(lad.f16, extras / f"{r.name}.Q4_K_M.plain.gguf", QuantizeSettings("Q4_K_M")))
    aws = AwqSettings(samples=r.ladder.awq_samples, seq_len=r.ladder.awq_seq_len)
    rtn, rtn_s = _timed(lambda: quantize_rtn(hf, extras / f"{r.name}-RTN", aws))
    es = EvalSettings(r.ladder.eval_ctx, r.ladder.eval_windows)
    text = resolve(r.evaluation, r.source, artifacts / "demo", "evaluation")
    ref = reference_logprobs(hf, text, es, lad.root.parent / "eval-cache")  # the gate's, cached
    for path in (plain, rtn):
        res, eval_s = _timed(lambda p=path: score_artifact(p, ref, es, DEFAULT_THRESHOLDS))  # type: ignore[misc]
        gate[path.name] = {**{k: getattr(res, k) for k in ("ppl_ratio", "mean_kld", "kld_p99", "top1_agreement", "size_bytes")},
                           "eval_s": eval_s, "name": path.name}
    imatrix_s = secs.get("imatrix", 0.0)
    q = lad.quants
    rows_spec = [
        ("F16", lad.f16.name, secs.get("convert", 0.0)),
        ("Q6_K" + (" + imatrix" if lad.imatrix else ""), q["Q6_K"].name, secs.get("gguf-Q6_K", 0.0) + imatrix_s),
        ("Q4_K_M plain", plain.name, plain_s),
        ("Q4_K_M + imatrix" + (" + smoothing" if r.ladder.smooth else ""), q["Q4_K_M"].name,
         secs.get("gguf-Q4_K_M", 0.0) + imatrix_s),
        ("AWQ int4 g128", lad.awq.name if lad.awq else "", secs.get("awq", 0.0)),
        ("round-to-nearest int4 g128", rtn.name, rtn_s),
    ]
    rows = []
    for label, name, build_s in rows_spec:
        g = gate[name]
        rows.append({"label": label, "file": name, "size_mb": g["size_bytes"] / 2**20, "ppl_ratio": g["ppl_ratio"],
                     "mean_kld": g["mean_kld"], "kld_p99": g["kld_p99"], "top1": g["top1_agreement"], "build_s": build_s})
    by = {row["label"]: row for row in rows}
    awq_d, rtn_d = by["AWQ int4 g128"]["ppl_ratio"] - 1, by["round-to-nearest int4 g128"]["ppl_ratio"] - 1
    return {"model": r.name, "fetch_s": fetch_s, "release_s": release_s, "gate_eval_s": secs.get("eval", 0.0),
            "imatrix_s": imatrix_s, "reference_ppl": ref.ppl, "scored_tokens": int(ref.nll.size),
            "windows": int(ref.windows.tokens.shape[0]), "ctx": es.ctx, "rows": rows,
            "eval_tok_s": {row["label"]: ref.nll.size / gate[row["file"]]["eval_s"] for row in rows if "eval_s" in gate[row["file"]]},
            "awq_vs_rtn_ppl_delta": awq_d / rtn_d if rtn_d > 0 else None}


def table(res: dict[str, Any]) -> str:
    """:func:`run`'s result in markdown: the scored text, a row per artifact, then the timings and AWQ's goal."""
    lines = [f"{res['model']}: {res['scored_tokens']} scored tokens ({res['windows']} windows of {res['ctx']}) of held-out "
             f"Shakespeare; fp16 reference perplexity {res['reference_ppl']:.3f} (the HF model in float32 torch).",
             "", "| artifact | size | PPL ratio | mean KLD | KLD p99 | same top token | build time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['label']} | {r['size_mb']:.0f} MiB | {r['ppl_ratio']:.4f} | {r['mean_kld']:.5f} | "
                     f"{r['kld_p99']:.4f} | {r['top1']:.2%} | {r['build_s']:.0f} s |")
    ratio = res["awq_vs_rtn_ppl_delta"]
    speeds = ", ".join(f"{k} {v:.0f} tok/s" for k, v in res["eval_tok_s"].items())
    lines += ["", f"fetch {res['fetch_s']:.0f} s; importance matrix {res['imatrix_s']:.0f} s (in the imatrix rows); "
              f"quality gate over the shipped ladder {res['gate_eval_s']:.0f} s; evaluation speed: {speeds}.",
              "AWQ perplexity delta / round-to-nearest's: "
              + (f"{ratio:.2f}x (goal <= 0.5x)" if ratio is not None else "n/a (round-to-nearest did not raise perplexity)")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.real", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--artifacts", default=Path("artifacts"), type=Path, help="where the recipe builds (default artifacts/)")
    ap.add_argument("--recipe", default=RECIPE, type=Path)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    record = run_record(ap.prog, argv)
    try:
        res = run(a.artifacts, a.recipe)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results(a.artifacts / "bench-real", "bench-real", record, res, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
