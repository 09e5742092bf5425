"""``nox -s bench -- --only imatrix``: our importance matrix against llama.cpp's own ``llama-imatrix``.

Both run on the demo model (:mod:`quantize.models.demo`) over the same calibration text, chunks and
context, each in its own process timed by :func:`bench.measure.measure` (median wall time, peak
RSS): ``llama-imatrix`` (built once by :mod:`bench.llama_tools`) on the model's F16 GGUF with
every core, four chunks per batch (its default ``-b 2048`` at ``-c 512``), collecting the output
matrix too (``--process-output``) and without its perplexity (``--no-ppl``); ours with
``python -m quantize imatrix`` on the fp16 checkpoint.  The two matrices are then compared tensor
by tensor: the cosine similarity of their column means (``sum / count``) and their token counts.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.llama_tools import build_seconds, llama_tool
from bench.measure import PY, alternated, converted, md_table, measure, run_record, write_json
from quantize.imatrix import Imatrix
from quantize.models.demo import build_demo

COSINE_MIN = 0.999  # per tensor, column means of ours against llama-imatrix's
TARGET_RATIO = 1.0  # our wall time over llama-imatrix's


def compare(ref: Imatrix, ours: Imatrix) -> dict[str, Any]:
    """Per tensor both hold: the cosine similarity of the column means and both token counts."""
    rm, om = ref.means(), ours.means()
    common = sorted(set(rm) & set(om))
    cosines: dict[str, float] = {}
    for name in common:
        a, b = rm[name].astype(np.float64), om[name].astype(np.float64)
        if a.shape != b.shape:
            cosines[name] = float("nan")
            continue
        norms = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosines[name] = float(a @ b) / norms if norms > 0 else float("nan")
    worst = min(common, key=lambda n: -1.0 if np.isnan(cosines[n]) else cosines[n]) if common else None
    counts = {n: (int(ref.counts[n]), int(ours.counts[n])) for n in common}
    return {
        "tensors_compared": len(common),
        "only_llama_imatrix": sorted(set(rm) - set(om)),
        "only_ours": sorted(set(om) - set(rm)),
        "cosines": cosines,
        "min_cosine": cosines[worst] if worst else float("nan"),
        "min_cosine_tensor": worst,
        "all_cosines_ok": bool(common) and all(c >= COSINE_MIN for c in cosines.values()),
        "counts_equal": all(r == o for r, o in counts.values()),
        "tokens": {"llama_imatrix": sorted({r for r, _ in counts.values()}), "ours": sorted({o for _, o in counts.values()})},
        "chunk_count": {"llama_imatrix": ref.chunk_count, "ours": ours.chunk_count},
    }


def bench_imatrix(out: Path, chunks: int = 32, ctx: int = 512, f16: Path | None = None, repeat: int = 5) -> dict[str, Any]:
    """Time llama-imatrix and ``quantize imatrix`` on the demo model (built or reused under ``out.parent / "demo"``)
    over ``chunks`` chunks of ``ctx`` tokens of its calibration text, and compare the two matrices.  ``f16`` is the
    demo's F16 GGUF (converted under ``out`` when not given); both matrices and the tools' stderr stay in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    demo = build_demo(out.parent / "demo", models=("mistral-spm",))
    ckpt, calib = demo.spm, demo.text["calib"]
    exe = llama_tool("llama-imatrix")  # built before anything is timed
    f16 = f16 or converted(ckpt, out / "demo-spm.F16.gguf")
    threads = os.cpu_count() or 1
    ref_path, ours_path = out / "imatrix-llama.gguf", out / "imatrix-ours.gguf"
    logfile = out / "imatrix-bench.log"
    commands = {
        "ref": [str(exe), "-m", str(f16), "-f", str(calib), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads),
                "--process-output", "--no-ppl", "-o", str(ref_path)],
        "ours": [PY, "-m", "quantize", "imatrix", str(ckpt), "--text", str(calib), "--ctx", str(ctx), "--chunks", str(chunks),
                 "--device", "cpu", "-o", str(ours_path)],
    }
    for cmd in commands.values():  # untimed: page cache, bytecode, remembered hashes
        measure(cmd, warm=False, repeat=1, log=logfile)
    med = alternated({k: partial(measure, cmd, warm=False, repeat=1, log=logfile) for k, cmd in commands.items()}, repeat)
    ref, ours = med["ref"], med["ours"]
    res: dict[str, Any] = {
        "chunks": chunks, "ctx": ctx, "threads": threads, "f16": str(f16), "llama_imatrix": str(exe),
        "llama_imatrix_s": ref.seconds, "ours_s": ours.seconds, "ratio": ours.seconds / ref.seconds,
        "llama_imatrix_cpu_s": ref.cpu_seconds, "ours_cpu_s": ours.cpu_seconds,
        "llama_imatrix_peak_rss_mb": ref.peak_rss_mb, "ours_peak_rss_mb": ours.peak_rss_mb,
        "tools_build_s": build_seconds(),
    }
    return res | compare(Imatrix.load(ref_path), Imatrix.load(ours_path))


def imatrix_markdown(res: dict[str, Any]) -> str:
    """:func:`bench_imatrix`'s result in markdown: a table of both tools' wall time, CPU time and peak RSS,
    then their ratio, the matrices' agreement and token counts, and the tools' build time when it was spent."""
    rows = [("ours (`quantize imatrix`)", f"{res['ours_s']:.2f} s", f"{res['ours_cpu_s']:.1f} s", f"{res['ours_peak_rss_mb']:.0f} MB"),
            ("`llama-imatrix`", f"{res['llama_imatrix_s']:.2f} s", f"{res['llama_imatrix_cpu_s']:.1f} s",
             f"{res['llama_imatrix_peak_rss_mb']:.0f} MB")]
    only = [f"only llama-imatrix: {', '.join(res['only_llama_imatrix'])}" if res["only_llama_imatrix"] else "",
            f"only ours: {', '.join(res['only_ours'])}" if res["only_ours"] else ""]
    tok = res["tokens"]
    notes = [f"ours / llama-imatrix: {res['ratio']:.2f}x (target <= {TARGET_RATIO:.1f}x)",
             f"agreement: {res['tensors_compared']} tensors, min cosine of column means {res['min_cosine']:.8f} "
             f"({res['min_cosine_tensor']}), all >= {COSINE_MIN}: {'yes' if res['all_cosines_ok'] else 'NO'}"
             + "".join(f"; {s}" for s in only if s),
             f"tokens per tensor: llama-imatrix {tok['llama_imatrix']}, ours {tok['ours']} "
             f"({'equal' if res['counts_equal'] else 'DIFFERENT'})"]
    if res.get("tools_build_s"):
        exe = Path(res["llama_imatrix"])
        notes.append(f"llama.cpp tools: built once in {res['tools_build_s']:.0f} s ({exe.parent.name}/{exe.name})")
    return "\n".join([f"Demo model, {res['chunks']} chunks x {res['ctx']} tokens, {res['threads']} threads.", "",
                      *md_table(("tool", "wall time", "CPU time", "peak RSS"), rows), "", *(f"- {n}" for n in notes), ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.imatrix")
    ap.add_argument("--out", default=Path("artifacts/bench"), type=Path)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--f16", type=Path, help="the demo model's F16 GGUF (default: converted under --out)")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    run = run_record(ap.prog, argv)
    res = bench_imatrix(a.out, a.chunks, a.ctx, a.f16, a.repeat)
    print(imatrix_markdown(res))
    write_json(a.out / "bench-imatrix.json", {"run": run, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
