"""The mix's KL-divergence predictor, fitted on the model being built from a few real measurements.

Probe files are written by llama.cpp's quantizer: the *base* probe gives every quantizable tensor its
largest candidate type; each other probe lowers one tensor class (``attn_v``, ``ffn_down``,
``token_embd`` ...) or one band of blocks (by depth) to a low type.  Their mean KL divergence against
the F16 GGUF, on text the gate does not score (the calibration text), gives one weight per class and
one per band such that ``KLD(probe) - KLD(base) = sum over lowered tensors of class * band * (error at
the low type - error at the base type)``, solved by alternating the two sets of weights.  One probe
file is on disk at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from quantize.evaluate import EvalSettings, reference_logprobs, score_artifact
from quantize.gguf_quant import QuantizeSettings, quantize_gguf
from quantize.mix import Predictor, Sensitivity, TensorOptions

log = logging.getLogger(__name__)

PROBE_LOW = ("Q3_K", "IQ4_NL")  # the type a probe lowers a tensor to: the first of these it can take
DEPTH_BANDS = 3  # blocks are probed in this many bands by depth (fewer for shallower models)
ROUNDS = 20


@dataclass(frozen=True)
class Probe:
    name: str
    lowered: tuple[str, ...]  # tensor names
    kld: float = 0.0


def _low(t: TensorOptions) -> str:
    return next((q for q in PROBE_LOW if q in t.bytes), min(t.bytes, key=t.bytes.__getitem__))


def _high(t: TensorOptions) -> str:
    return max(t.bytes, key=t.bytes.__getitem__)


def probes(sens: Sensitivity, shape: Predictor) -> list[Probe]:
    """The base probe, then one per tensor class and one per band of blocks."""
    out = [Probe("base", ())]
    classes = dict.fromkeys(t.cls for t in sens.tensors)
    for cls in classes:
        out.append(Probe(f"class {cls}", tuple(t.name for t in sens.tensors if t.cls == cls)))
    if shape.n_groups > 1:
        for g in sorted({shape.group(t) for t in sens.tensors if t.block is not None}):
            out.append(Probe(f"blocks {g}", tuple(t.name for t in sens.tensors if t.block is not None and shape.group(t) == g)))
    return out


def probe_plan(sens: Sensitivity, probe: Probe) -> dict[str, str]:
    low = set(probe.lowered)
    return {t.name: _low(t) if t.name in low else _high(t) for t in sens.tensors}


def measure_probes(src: Path, imatrix: Path | None, sens: Sensitivity, text: Path, work: Path,
                   settings: EvalSettings) -> tuple[Predictor, list[Probe]]:
    """Write and score each probe of ``src`` (an F16 GGUF) on ``text``; the fitted predictor and the probes."""
    n_layers = 1 + max((t.block for t in sens.tensors if t.block is not None), default=0)
    shape = Predictor(n_groups=min(DEPTH_BANDS, n_layers), n_layers=n_layers)
    ref = reference_logprobs(src, text, settings, work / "eval-cache")
    done = []
    for p in probes(sens, shape):
        path = work / "probe.gguf"
        plan = probe_plan(sens, p)
        quantize_gguf(src, path, QuantizeSettings("Q8_0", imatrix, tensor_types=tuple(sorted(plan.items()))))
        try:
            kld = score_artifact(path, ref, settings, {}).mean_kld
        finally:
            path.unlink(missing_ok=True)
        log.info("probe %s: mean KLD %.5f", p.name, kld)
        done.append(replace(p, kld=kld))
    return fit(sens, shape, done), done


def fit(sens: Sensitivity, shape: Predictor, measured: list[Probe]) -> Predictor:
    """Class and band weights that make the predictor reproduce each probe's rise over the base probe."""
    by_name = {t.name: t for t in sens.tensors}
    base = next(p.kld for p in measured if p.name == "base")
    rises = [(p, max(p.kld - base, 0.0)) for p in measured if p.lowered]
    floor = 1e-3 * max((r for _, r in rises), default=0.0) or 1e-12  # a rise lost in noise: a small positive weight
    classes = {t.cls: 1.0 for t in sens.tensors}
    groups = {shape.group(t): 1.0 for t in sens.tensors}
    pred = replace(shape, classes=classes, groups=groups)
    for _ in range(ROUNDS):
        for p, rise in rises:
            ts = [by_name[n] for n in p.lowered]
            delta = sum(pred.weight(t) * (t.error[_low(t)] - t.error[_high(t)]) for t in ts)
            if delta <= 0:
                continue
            scale = max(rise, floor) / delta
            if p.name.startswith("class "):
                classes[ts[0].cls] *= scale
            else:
                groups[shape.group(ts[0])] *= scale
        bands = [g for g in groups if g != "head"]
        if bands:  # the bands share the classes' scale: mean 1
            mean = sum(groups[g] for g in bands) / len(bands)
            for g in bands:
                groups[g] /= mean
        pred = replace(shape, classes=dict(classes), groups=dict(groups))
    return pred
