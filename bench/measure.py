"""What the benches share: timing a command in its own process (wall, CPU, peak RSS), alternating
contenders, random-weight checkpoints of a given shape, the record of a run (command, machine, date,
commit) and the writing of their JSON results and markdown tables."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil

import quantize
from quantize.atomic import atomic_dir, atomic_file
from quantize.formats.checkpoint import copy_tokenizer_files
from quantize.formats.safetensors import write_safetensors
from quantize.portable import proc_text

PY = sys.executable


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


def timed(work: Callable[[], object]) -> Run:
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


# --- the record of a run, and what the benches write ---------------------------------------------

GPU_PROBE = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"


def run_record(prog: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``"run"`` record of a bench's JSON: ``command`` (the nox command line when nox runs the bench,
    else ``python_command``), ``python_command`` (``python -m PROG ARGV``, paths under the working
    folder written relative to it; ``argv`` defaults to ``sys.argv[1:]``), ``machine`` (:func:`machine`),
    ``date`` (UTC, now), ``version`` (quantize's), ``commit`` (``git rev-parse HEAD``, else "unknown") and
    ``uncommitted_changes`` (whether ``git status`` lists any; None without git)."""
    args = sys.argv[1:] if argv is None else list(argv)
    cwd = Path.cwd()
    python = shlex.join(["python", "-m", prog, *(_relative(a, cwd) for a in args)])
    status = _git("status", "--porcelain")
    return {"command": _nox_command() or python, "python_command": python, "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": quantize.__version__,
            "commit": _git("rev-parse", "HEAD") or "unknown", "uncommitted_changes": None if status is None else bool(status)}


def _relative(arg: str, cwd: Path) -> str:
    """``arg`` with an absolute path under ``cwd`` (the whole argument, or the value of ``--flag=``) made relative to it."""
    flag, eq, value = arg.partition("=") if arg.startswith("-") else ("", "", arg)
    path = Path(value)
    if path.is_absolute() and path != cwd and path.is_relative_to(cwd):
        value = str(path.relative_to(cwd))
    return flag + eq + value


def _nox_command() -> str | None:
    """Inside a nox session (``NOX_CURRENT_SESSION`` set), nox's own command line, read from the parent
    process (nox runs a session's commands as its children), else ``nox -s SESSION``; outside, None."""
    session = os.environ.get("NOX_CURRENT_SESSION")
    if not session:
        return None
    words = (proc_text(f"{os.getppid()}/cmdline") or "").rstrip("\0").split("\0")
    for i, word in enumerate(words):
        if Path(word).name == "nox":
            return shlex.join(["nox", *words[i + 1 :]])
    return shlex.join(["nox", "-s", session])


def _git(*args: str) -> str | None:
    """``git ARGS``'s output in the benches' folder (without taking git's optional locks), or None where it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine() -> dict[str, Any]:
    """This machine: ``system``, ``arch``, ``cpu`` (model), ``cpus``, ``ram_bytes`` (total) and ``gpu``."""
    return {"system": platform.system(), "arch": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "gpu": gpu_name()}


def cpu_model() -> str:
    """The first ``model name`` of /proc/cpuinfo, else ``platform.processor()``, else "unknown"."""
    for line in (proc_text("cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or "unknown"


def gpu_name() -> str:
    """torch's name for CUDA device 0, "none" without CUDA, "unknown" where torch fails; asked in a child
    process, so that this one does not load torch."""
    try:
        done = subprocess.run([PY, "-c", GPU_PROBE], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """``data`` as indented JSON at ``path``, written under a temporary name and renamed."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
    return path


def write_results(out: Path, name: str, record: dict[str, Any], res: dict[str, Any], table: Callable[[dict[str, Any]], str]) -> None:
    """A bench's results: ``<name>.json`` (with the run record) and ``<name>.md`` (its table) under ``out``, the table printed."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", {"run": record, **res})
    (out / f"{name}.md").write_text(table(res))
    print(table(res))


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: ``head``, its rule, then ``rows``."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]
