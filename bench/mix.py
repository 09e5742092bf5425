"""``nox -s bench-mix``: searched per-tensor types against llama.cpp's stock types at the same bytes.

For each model of :data:`MODELS` and each budget of :data:`BUDGETS` (the sizes of Q3_K_M, Q4_K_M and
Q5_K_M): the stock type with the importance matrix (smoothed where the row says so), the searched mix
within its tensor bytes, and the "Q8_0 embeddings and output" variant popular uploads ship
(llama-quantize's ``--token-embedding-type q8_0 --output-tensor-type q8_0``, here the same two
overrides) at its own size, all scored on the held-out Shakespeare windows against the fp16 HF model
in float32.  It prints the mean KL divergence of each, the predicted KL divergence of each searched
file and stock plan beside the measured one (and whether the prediction ranks them as the gate does),
and the time of the importance matrix, the sensitivity step, the probes, one stock quantization and
the search.  Target: searched mix KLD <= 0.8x the stock type's at every budget, on the demo and on
Gemma 3 270M (whose published weights were Q4_K_M already: read its Q4_K_M and Q5_K_M rows with
care; Q3_K_M is the telling budget there).  The random-weight model is reported without a target.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.measure import Shape, random_checkpoint, run_record, write_results
from quantize.convert import convert
from quantize.errors import QuantizeError
from quantize.evaluate import EvalSettings, reference_logprobs, score_artifact
from quantize.formats.gguf_read import read_header
from quantize.gguf_mix import fit_predictor, quantize_to_budget
from quantize.gguf_quant import QuantizeSettings, quantize_gguf
from quantize.imatrix import ImatrixSettings, compute_imatrix
from quantize.mix import Sensitivity, dry_run, measure_sensitivity
from quantize.models.corpus import TextSplit, write_splits
from quantize.models.demo import build_demo
from quantize.smooth import smooth_gguf

BUDGETS = ("Q3_K_M", "Q4_K_M", "Q5_K_M")
TARGET = 0.8  # searched mix KLD / stock KLD, at most, on the rows with a target
Q8_EDGES = ("token_embd.weight", "output.weight")
EVAL = EvalSettings(512, 32)  # the gate's windows (the recipes' eval_ctx and eval_windows)
RANDOM = Shape(256, 512, 4, 2, 32002, layers=12, eos_token_id=32001)  # the test suite's twelve-block model


@dataclass(frozen=True)
class BenchModel:
    name: str
    checkpoint: Callable[[Path], Path]  # artifacts folder -> the fp16 HF checkpoint
    smooth: bool  # as its recipe builds it
    target: bool
    note: str = ""


def _demo(artifacts: Path) -> Path:
    return build_demo(artifacts / "demo").spm


def _gemma(artifacts: Path) -> Path:
    from quantize.models.real import fetch_real

    return fetch_real()


def _random(artifacts: Path) -> Path:
    out = artifacts / "bench-mix" / "random-12-blocks-hf"
    if not (out / "config.json").is_file():
        random_checkpoint(out, RANDOM, build_demo(artifacts / "demo").spm)
    return out


MODELS = (
    BenchModel("demo (Mistral layout, 4 blocks)", _demo, smooth=True, target=True),
    BenchModel("Gemma 3 270M", _gemma, smooth=False, target=True,
               note="published weights were Q4_K_M already: read its Q4_K_M and Q5_K_M rows with care"),
    BenchModel("random weights, 12 blocks", _random, smooth=False, target=False, note="no target: random weights"),
)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _stock_plan(src: Path, qtype: str, sens: Sensitivity) -> dict[str, str] | None:
    """The stock type's tensor types, where every one is a candidate the predictor knows."""
    types = {n: d.type for n, d in dry_run(src, qtype).items() if d.quantized}
    ok = all(types.get(t.name) in t.error for t in sens.tensors)
    return types if ok else None


def run_model(m: BenchModel, artifacts: Path, texts: dict[str, Path]) -> dict[str, Any]:
    work = artifacts / "bench-mix" / re.sub(r"[^A-Za-z0-9.]+", "-", m.name.split(" (")[0])
    work.mkdir(parents=True, exist_ok=True)
    hf = m.checkpoint(artifacts)
    f16 = work / "F16.gguf"
    if not f16.is_file():
        convert(hf, f16)
    im_path = work / "imatrix.gguf"
    _, imatrix_s = _timed(lambda: compute_imatrix(hf, texts["calib"], ImatrixSettings(512, 64)).save(im_path))
    src, im = f16, im_path
    if m.smooth:
        src, im = work / "F16.smoothed.gguf", work / "imatrix.smoothed.gguf"
        for p in (src, im):
            p.unlink(missing_ok=True)
        smooth_gguf(f16, im_path, src, im)
    sens, sens_s = _timed(lambda: measure_sensitivity(src, im))
    probes_dir = work / "probes"
    probes_dir.mkdir(exist_ok=True)
    (predictor, probes), fit_s = _timed(lambda: fit_predictor(src, im, sens, texts["calib"], probes_dir))
    assert predictor is not None
    files: dict[str, dict[str, Any]] = {}
    for b in BUDGETS:
        stock = work / f"{b}.gguf"
        q8 = work / f"{b}.q8-embed-output.gguf"
        mix = work / f"{b}-mix.gguf"
        for p in (stock, q8, mix):
            p.unlink(missing_ok=True)
        _, stock_s = _timed(partial(quantize_gguf, src, stock, QuantizeSettings(b, im), origin=f16))
        edges = tuple((n, "Q8_0") for n in Q8_EDGES if n in read_header(src).tensors)
        quantize_gguf(src, q8, QuantizeSettings(b, im, tensor_types=edges), origin=f16)
        rep, search_s = _timed(partial(quantize_to_budget, src, mix, b, im, sens=sens, fitted=(predictor, probes)))
        plan = _stock_plan(src, b, sens)
        files[b] = {"stock": stock, "q8": q8, "mix": mix, "stock_s": stock_s, "search_s": search_s,
                    "predicted_mix": rep.predicted_kld, "predicted_stock": predictor.predict(sens, plan) if plan else None,
                    "raised": rep.raised, "lowered": rep.lowered}
    ref = reference_logprobs(hf, texts["eval"], EVAL, work / "eval-cache")
    rows = []
    for b, f in files.items():
        scored = {k: score_artifact(f[k], ref, EVAL, {}) for k in ("stock", "q8", "mix")}
        rows.append({"budget": b, **{f"{k}_kld": s.mean_kld for k, s in scored.items()},
                     **{f"{k}_tensor_bytes": read_header(f[k]).data_bytes for k in ("stock", "q8", "mix")},
                     **{k: f[k] for k in ("stock_s", "search_s", "predicted_mix", "predicted_stock", "raised", "lowered")}})
    return {"model": m.name, "note": m.note, "target": m.target, "imatrix_s": imatrix_s, "sensitivity_s": sens_s,
            "probes_s": fit_s, "probes": len(probes), "tensors": len(sens.tensors), "rows": rows,
            "ranked_as_gate": ranked_as_gate(rows)}


def ranked_as_gate(rows: list[dict[str, Any]], tie: float = 1e-9) -> dict[str, int]:
    """Of the pairs of files with a prediction (each searched file, each stock plan made of candidate
    types), how many the predicted KL divergence orders as the gate measured them, how many it orders the
    other way, and how many are tied in either (the same plan at two budgets, errors of zero)."""
    pts = [(r["predicted_mix"], r["mix_kld"]) for r in rows]
    pts += [(r["predicted_stock"], r["stock_kld"]) for r in rows if r["predicted_stock"] is not None]
    out = {"pairs": 0, "in_order": 0, "reversed": 0, "tied": 0}
    for i, a in enumerate(pts):
        for b in pts[i + 1 :]:
            out["pairs"] += 1
            dp, dm = a[0] - b[0], a[1] - b[1]
            out["tied" if abs(dp) <= tie or abs(dm) <= tie else "in_order" if dp * dm > 0 else "reversed"] += 1
    return out


def table(res: dict[str, Any]) -> str:
    lines = [f"Held-out Shakespeare, {EVAL.chunks} windows of {EVAL.ctx} tokens, against each fp16 HF model in float32. "
             "KLD: mean KL divergence; sizes are tensor bytes (the budget's measure).", "",
             "| model | budget | stock KLD | searched mix KLD | mix / stock | predicted mix KLD | predicted stock KLD | "
             "stock MiB | mix MiB | Q8_0 embed+output KLD (MiB) | tensors raised / lowered |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in res["models"]:
        for r in m["rows"]:
            pred_stock = f"{r['predicted_stock']:.5f}" if r["predicted_stock"] is not None else "–"
            lines.append(f"| {m['model']} | {r['budget']} | {r['stock_kld']:.5f} | {r['mix_kld']:.5f} | "
                         f"{r['mix_kld'] / r['stock_kld']:.2f}x | {r['predicted_mix']:.5f} | {pred_stock} | "
                         f"{r['stock_tensor_bytes'] / 2**20:.2f} | {r['mix_tensor_bytes'] / 2**20:.2f} | "
                         f"{r['q8_kld']:.5f} ({r['q8_tensor_bytes'] / 2**20:.2f}) | {r['raised']} / {r['lowered']} |")
    lines += ["", "| model | importance matrix | sensitivity step | probes (files) | one stock quantization | search + write "
              "| prediction in the gate's order |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in res["models"]:
        stock_s = sum(r["stock_s"] for r in m["rows"]) / len(m["rows"])
        search_s = sum(r["search_s"] for r in m["rows"]) / len(m["rows"])
        rk = ranked_as_gate(m["rows"])
        lines.append(f"| {m['model']} | {m['imatrix_s']:.0f} s | {m['sensitivity_s']:.0f} s ({m['tensors']} tensors) | "
                     f"{m['probes_s']:.0f} s ({m['probes']}) | {stock_s:.1f} s | {search_s:.1f} s | "
                     f"{rk['in_order']} of {rk['pairs']} pairs in order, {rk['reversed']} reversed, {rk['tied']} tied |")
    notes = [f"- {m['model']}: {m['note']}." for m in res["models"] if m["note"]]
    verdicts = []
    for m in (m for m in res["models"] if m["target"]):
        worst = max(r["mix_kld"] / r["stock_kld"] for r in m["rows"])
        verdicts.append(f"{m['model']}: worst {worst:.2f}x ({'met' if worst <= TARGET else 'not met'})")
    lines += ["", *notes, "", f"Target: searched mix KLD <= {TARGET}x the stock type's at every budget. " + "; ".join(verdicts) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.mix", description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--artifacts", default=Path("artifacts"), type=Path)
    ap.add_argument("--only", choices=[m.name.split(" ")[0] for m in MODELS], help="one model (its first word)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    record = run_record(ap.prog, argv)
    texts = write_splits(TextSplit(), a.artifacts / "bench-mix" / "corpus")
    try:
        models = [run_model(m, a.artifacts, texts) for m in MODELS if a.only in (None, m.name.split(" ")[0])]
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results(a.artifacts / "bench-mix", "bench-mix", record, {"models": models}, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
