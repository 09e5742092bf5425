"""Stage 2, searched: the GGUF with the lowest predicted KL divergence whose tensor bytes fit a budget.

    quantize gguf model.F16.gguf --budget Q4_K_M --imatrix model.imatrix.gguf --probe-text calib.txt -o out.gguf

:func:`quantize_to_budget` measures each tensor's sensitivity (:mod:`quantize.mix`), fits the KL
predictor on probe files when a probe text is given (:mod:`quantize.mix_fit`), allocates the types and
has llama.cpp's quantizer write them.  The report (:class:`MixReport`) is written beside the file as
``<file>.mix.json``: the budget, the stock type it is measured against, the plan (tensor -> type) and
the predicted KL divergence.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantize.atomic import atomic_file, check_output, partial_prefix
from quantize.budget import Budget, parse_budget
from quantize.errors import QuantizeError
from quantize.evaluate import EvalSettings
from quantize.formats.gguf_read import read_header
from quantize.gguf_quant import QuantizeSettings, quantize_gguf
from quantize.mix import (
    STOCK,
    Predictor,
    Sensitivity,
    allocate,
    budget_limit,
    compare_with_stock,
    measure_sensitivity,
    plan_bytes,
    tensor_bytes,
)
from quantize.mix_fit import Probe, measure_probes
from quantize.smooth import smooth_gguf

log = logging.getLogger(__name__)

PROBE_EVAL = EvalSettings(ctx=512, chunks=8)  # the probes' windows of the probe text


@dataclass(frozen=True)
class MixReport:
    budget: str
    limit: int  # tensor bytes the budget allows
    stock: str  # the stock type at the same budget
    stock_bytes: int
    bytes: int  # tensor bytes of the written file
    predicted_kld: float | None  # None: no probe text, so no fitted predictor
    raised: int  # tensors given more bytes than the stock type gives them
    lowered: int
    plan: dict[str, str]
    predictor: dict[str, Any] = field(default_factory=dict)
    probes: list[dict[str, Any]] = field(default_factory=list)

    def card_line(self) -> str:
        return f"{self.raised} tensors raised, {self.lowered} lowered vs {self.stock}"

    def save(self, path: Path) -> None:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> MixReport:
        return cls(**json.loads(path.read_text()))


def report_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".mix.json")


def mix_name(model: str, budget: Budget) -> str:
    """``<Model>.Q4_K_M-mix.gguf``, ``<Model>.3.5GB-mix.gguf``: the budget, then ``-mix``."""
    return f"{model}.{budget.mix_kind}.gguf"


def save_predictor(path: Path, predictor: Predictor | None, probes: list[Probe]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"predictor": asdict(predictor) if predictor else None, "probes": [asdict(p) for p in probes]},
                                  indent=1))


def load_predictor(path: Path) -> tuple[Predictor | None, list[Probe]]:
    d = json.loads(path.read_text())
    probes = [Probe(p["name"], tuple(p["lowered"]), p["kld"]) for p in d["probes"]]
    return (Predictor(**d["predictor"]) if d["predictor"] else None), probes


def fit_predictor(src: Path, imatrix: Path | None, sens: Sensitivity, text: Path | None, work: Path,
                  settings: EvalSettings = PROBE_EVAL) -> tuple[Predictor | None, list[Probe]]:
    """The predictor fitted on probes scored on ``text``; ``(None, [])`` without a text."""
    if text is None:
        return None, []
    return measure_probes(src, imatrix, sens, text, work, settings)


def quantize_to_budget(src: str | Path, out: str | Path, budget: str, imatrix: Path | None = None, smooth: bool = False,
                       text: Path | None = None, threads: int = 0, sens: Sensitivity | None = None,
                       fitted: tuple[Predictor | None, list[Probe]] | None = None,
                       origin: Path | None = None, origin_imatrix: Path | None = None) -> MixReport:
    """Write the searched mix of the F16 GGUF ``src`` within ``budget`` at ``out`` and its report beside it.

    A build passes the sensitivity and the fitted predictor with its probes, which it keeps as steps
    (``sens``, ``fitted``); otherwise they are measured here (the predictor only with a probe ``text``)."""
    src, out = Path(src), Path(out)
    b = parse_budget(budget, src)
    check_output(out, [src, imatrix, text])
    read_header(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    if smooth:
        if imatrix is None:
            raise QuantizeError(src, "--smooth needs the activation statistics of an importance matrix; pass --imatrix FILE")
        with tempfile.TemporaryDirectory(prefix=partial_prefix(out), dir=out.parent) as scratch:
            sm, smi = Path(scratch) / src.name, Path(scratch) / imatrix.name
            smooth_gguf(src, imatrix, sm, smi)
            return quantize_to_budget(sm, out, budget, smi, False, text, threads, origin=src, origin_imatrix=imatrix)
    if sens is None:
        sens = measure_sensitivity(src, imatrix, threads)
    if fitted is None:
        with tempfile.TemporaryDirectory(prefix=partial_prefix(out), dir=out.parent) as work:
            fitted = fit_predictor(src, imatrix, sens, text, Path(work))
    predictor, probes = fitted
    lim = budget_limit(b, src, sens)
    limit, stock, stock_bytes = lim.bytes, lim.stock, tensor_bytes(lim.stock_plan)
    plan = allocate(sens, predictor or Predictor(), limit, src)
    if stock is None:
        raise QuantizeError(src, f"budget {b.text} is below every stock type's size (smallest: {STOCK[0]})")
    raised, lowered = compare_with_stock(sens, plan, lim.stock_plan)
    tt = tuple(sorted(plan.items()))
    quantize_gguf(src, out, QuantizeSettings(stock, imatrix, threads, tensor_types=tt, budget=b.text),
                  origin=origin or src, origin_imatrix=origin_imatrix or imatrix)
    written = read_header(out).data_bytes
    if written != plan_bytes(sens, plan):
        out.unlink()
        raise QuantizeError(out, f"llama.cpp wrote {written:,} tensor bytes where the plan has {plan_bytes(sens, plan):,}; "
                            "this llama.cpp's quantizer does not apply the plan as written (nothing kept)")
    report = MixReport(b.text, limit, stock, stock_bytes, written,
                       predictor.predict(sens, plan) if predictor else None, raised, lowered, plan,
                       asdict(predictor) if predictor else {}, [asdict(p) for p in probes])
    report.save(report_path(out))
    log.info("wrote %s: %s, %d tensor bytes of %d allowed (%s)", out, b.text, written, limit, report.card_line())
    return report


@dataclass(frozen=True)
class Shipped:
    """What a release ships for one budget: the searched mix when it beat the stock type, else the stock type."""

    kind: str  # "<budget>-mix", or the stock type
    path: Path
    record: dict[str, Any]  # the manifest's account of the choice


def choose(budget: str, mix: Path, stocks: Mapping[str, Path], results: dict[str, dict[str, Any]]) -> Shipped:
    """The mix when it passed its gate, its mean KL divergence in the gate's ``results`` (by file name) is
    lower than the stock type's and its tensor bytes are within the budget (for a type's name: that type's tensor bytes; for a
    size or bits per weight, the stock type is the largest that fits it); otherwise the stock type, and why."""
    rep = MixReport.load(report_path(mix))
    stock = stocks[rep.stock]  # the file of the stock type (type name -> path)
    mine, theirs = results[mix.name]["mean_kld"], results[stock.name]["mean_kld"]
    mix_bytes, stock_bytes = read_header(mix).data_bytes, read_header(stock).data_bytes
    record = {"budget": budget, "stock": rep.stock, "mix_file": mix.name, "mix_kld": mine, "stock_kld": theirs,
              "mix_tensor_bytes": mix_bytes, "stock_tensor_bytes": stock_bytes, "predicted_kld": rep.predicted_kld,
              "raised": rep.raised, "lowered": rep.lowered, "plan": rep.plan}
    failed = results[mix.name]["failures"]
    if mine < theirs and mix_bytes <= rep.limit and not failed:
        return Shipped(parse_budget(budget).mix_kind, mix, {**record, "shipped": "mix"})
    why = (f"the searched mix's mean KLD {mine:.5f} is not below {rep.stock}'s {theirs:.5f}" if mine >= theirs else
           f"the searched mix has {mix_bytes:,} tensor bytes, more than the budget's {rep.limit:,}" if mix_bytes > rep.limit else
           f"the searched mix failed its gate ({failed[0]})")
    log.warning("budget %s: shipping %s: %s", budget, rep.stock, why)
    return Shipped(rep.stock, stock, {**record, "shipped": "stock", "why": why})
