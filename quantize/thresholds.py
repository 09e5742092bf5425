"""Quality thresholds per artifact type: the gate a release must pass, as data.

Defaults follow the figures llama.cpp publishes for its quantization types on 7-8B models
(``llama-perplexity --kl-divergence``; e.g. Q6_K about +0.1 % perplexity and KLD ~0.004,
Q4_K_M about +1-3 % and KLD ~0.03), with headroom; every recipe may override them per model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Threshold:
    ppl_ratio: float = field(metadata={"gt": 0})  # artifact perplexity / reference perplexity, at most
    mean_kld: float = field(metadata={"gt": 0})  # mean KL divergence from the reference distribution, at most


DEFAULT_THRESHOLDS: dict[str, Threshold] = {
    "F32": Threshold(1.0005, 0.0005),
    "F16": Threshold(1.001, 0.001),
    "BF16": Threshold(1.002, 0.002),
    "Q8_0": Threshold(1.005, 0.005),
    "Q6_K": Threshold(1.01, 0.01),
    "Q5_K_M": Threshold(1.02, 0.02),
    "Q5_K_S": Threshold(1.025, 0.025),
    "Q4_K_M": Threshold(1.05, 0.06),
    "Q4_K_S": Threshold(1.06, 0.07),
    "Q4_0": Threshold(1.08, 0.10),
    "IQ4_XS": Threshold(1.06, 0.07),
    "Q3_K_M": Threshold(1.12, 0.15),
    "Q2_K": Threshold(1.35, 0.40),
    "AWQ": Threshold(1.06, 0.08),
    "RTN": Threshold(1.10, 0.15),
}
# Types without a row are reported but never gated, and the report says so.
