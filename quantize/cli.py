"""The ``quantize`` command line: one subcommand per pipeline stage, all calling the package.

Errors the user can fix (:class:`QuantizeError`) print as one line, ``quantize: <file>: <problem>``,
and exit with status 2; nothing is left at the output path.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from quantize import __version__, progress
from quantize.atomic import atomic_file, check_output, check_writable_folder
from quantize.errors import QuantizeError
from quantize.portable import unsupported_platform
from quantize.recipe import load_recipe
from quantize.thresholds import Threshold

# Each command imports its stage when it runs: `quantize ladder` needs
# only the standard library, since CI runs it before installing anything, and `--help` answers at once.

Handler = Callable[[argparse.Namespace], int]
DEVICES = ("auto", "cuda", "cpu")  # where a torch stage runs (auto: CUDA when there is one)
log = logging.getLogger(__name__)


def _demo(a: argparse.Namespace) -> int:
    from quantize.models.demo import build_demo

    if a.root:
        check_writable_folder(a.root, "--root")
    demo = build_demo(Path(a.root) if a.root else None)
    print(json.dumps({"root": str(demo.root), "models": {k: str(v) for k, v in demo.models.items()},
                      "text": {k: str(v) for k, v in demo.text.items()}}, indent=2))
    return 0


def _fetch_real(a: argparse.Namespace) -> int:
    from quantize.models.real import fetch_real, published_gguf

    cache = Path(a.cache) if a.cache else None
    if cache:
        check_writable_folder(cache, "--cache")
    root = fetch_real(cache)
    print(json.dumps({"checkpoint": str(root), "published_gguf": str(published_gguf(cache))}, indent=2))
    return 0


def _convert(a: argparse.Namespace) -> int:
    from quantize.convert import convert

    res = convert(a.hf_dir, a.output, a.outtype, a.name)
    print(f"{res.path}: {res.n_tensors} tensors, {res.n_bytes / 2**20:.1f} MiB")
    return 0


def _inspect(a: argparse.Namespace) -> int:
    from quantize.inspect_gguf import summarize

    print(summarize(a.file).render())
    return 0


def _gguf(a: argparse.Namespace) -> int:
    from quantize.gguf_quant import QuantizeSettings, quantize_gguf

    im = Path(a.imatrix) if a.imatrix else None
    if a.budget is not None:
        from quantize.gguf_mix import quantize_to_budget

        if a.type is not None or a.tensor_type:
            raise QuantizeError(Path(a.input), "--budget chooses every tensor's type; leave out --type and --tensor-type")
        rep = quantize_to_budget(a.input, a.output, a.budget, im, a.smooth, Path(a.probe_text) if a.probe_text else None, a.threads)
        predicted = "" if rep.predicted_kld is None else f", predicted mean KLD {rep.predicted_kld:.5f}"
        print(f"{a.output}: {rep.bytes:,} tensor bytes of {rep.limit:,} allowed ({rep.budget}); {rep.card_line()}{predicted}")
        return 0
    out = quantize_gguf(a.input, a.output, QuantizeSettings(a.type or "Q4_K_M", im, a.threads, a.smooth, tuple(a.tensor_type)))
    print(out)
    return 0


def _imatrix(a: argparse.Namespace) -> int:
    from quantize.imatrix import ImatrixSettings, compute_imatrix

    check_output(a.output, [a.model, a.text, a.eval_text])
    im = compute_imatrix(a.model, a.text, ImatrixSettings(a.ctx, a.chunks, a.device), a.eval_text)
    print(im.save(a.output))
    return 0


def _merge(a: argparse.Namespace) -> int:
    from quantize.engine.lora import merge_lora

    print(merge_lora(a.base, a.adapter, a.output, a.allow_pickle))
    return 0


def _smooth(a: argparse.Namespace) -> int:
    from quantize.smooth import smooth_gguf

    plan = smooth_gguf(Path(a.input), Path(a.imatrix), Path(a.output), Path(a.imatrix_out))
    print(f"{a.output}: {len(plan.scales)} norms smoothed; {a.imatrix_out}")
    return 0


def _eval(a: argparse.Namespace) -> int:
    from quantize.evaluate import EvalSettings, evaluate, write_report

    overrides = dict(_threshold_option(spec) for spec in a.max or [])
    inputs = [a.reference, a.text, *a.artifacts]
    for name in ("eval.json", "eval.md", "eval.png"):
        check_output(Path(a.out_dir) / name, inputs, flag="--out-dir")
    if a.json:
        check_output(a.json, inputs, flag="--json")
    check_writable_folder(a.cache, "--cache")
    report = evaluate(a.reference, a.text, a.artifacts, EvalSettings(a.ctx, a.chunks, a.threads, a.device), a.cache, overrides)
    paths = write_report(report, Path(a.out_dir))
    if a.json:
        with atomic_file(Path(a.json)) as tmp:
            tmp.write_bytes(paths["json"].read_bytes())
    print(report.to_markdown())
    for failure in report.failures:
        print(f"quantize: quality gate failed: {failure}", file=sys.stderr)
    return 3 if report.failures else 0


def _tensor_type_option(spec: str) -> tuple[str, str]:
    name, sep, qtype = spec.rpartition("=")
    if not sep or not name or not qtype:
        raise argparse.ArgumentTypeError(f"{spec!r} is not TENSOR=TYPE (e.g. blk.1.ffn_down.weight=Q8_0)")
    return name, qtype


def _threshold_option(spec: str) -> tuple[str, Threshold]:
    """``--max TYPE=RATIO,KLD`` -> (``TYPE``, its threshold); both numbers positive."""
    kind, eq, vals = spec.partition("=")
    ratio, comma, kld = vals.partition(",")
    try:
        if not (kind and eq and comma):
            raise ValueError
        th = Threshold(float(ratio), float(kld))
    except ValueError:
        raise QuantizeError(None, f"--max {spec}: write TYPE=RATIO,KLD with two numbers, e.g. --max Q4_K_M=1.06,0.07") from None
    if not (th.ppl_ratio > 0 and th.mean_kld > 0):
        raise QuantizeError(None, f"--max {spec}: the perplexity ratio and the KL divergence must be numbers > 0")
    return kind.upper(), th


def _build(a: argparse.Namespace) -> int:
    from quantize.pipeline import build_release

    check_writable_folder(a.artifacts, "--artifacts")
    types = tuple(a.types.split(",")) if a.types else None
    rel = build_release(Path(a.recipe) if a.recipe else None, Path(a.artifacts), a.until, types,
                        Path(a.demo_root) if a.demo_root else None)
    lad = rel.ladder
    print(f"built: {', '.join(lad.log.built) or 'nothing (everything up to date)'}")
    if lad.report:
        print(lad.report["md"].read_text())
    if a.until == "release" and not rel.failures:
        print(f"release: {rel.root}")
    for failure in rel.failures:
        print(f"quantize: quality gate failed: {failure}", file=sys.stderr)
    return 3 if rel.failures else 0


def _awq(a: argparse.Namespace) -> int:
    from quantize.awq import AwqSettings, quantize_awq, quantize_rtn, require_autoawq

    check_output(a.output, [a.hf_dir, a.calib], folder=True)
    require_autoawq()
    given = {"group_size": a.group_size, "samples": a.samples, "seq_len": a.seq_len, "device": a.device}
    settings = AwqSettings(**{k: v for k, v in given.items() if v is not None})
    if a.method == "rtn":
        out = quantize_rtn(a.hf_dir, a.output, settings)
    elif a.calib is not None:
        out = quantize_awq(a.hf_dir, a.output, a.calib, settings)
    else:
        from quantize.models.corpus import TextSplit, write_splits

        log.warning("no --calib given: calibrating on the demo's Shakespeare split")
        with tempfile.TemporaryDirectory(prefix="quantize-calib-") as tmp:
            out = quantize_awq(a.hf_dir, a.output, write_splits(TextSplit(), Path(tmp))["calib"], settings)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{out}: {a.method.upper()} {settings.w_bit}-bit g{settings.group_size}, {size / 2**20:.1f} MiB")
    return 0


def _ladder(a: argparse.Namespace) -> int:
    print(json.dumps([t for t in load_recipe(a.recipe).ladder.gguf if t != "F16"]))
    return 0


def _init(a: argparse.Namespace) -> int:
    from quantize.init_recipe import write_recipe

    out = write_recipe(a.source, Path(a.out) if a.out else None, a.name, Path(a.demo_root), a.force)
    print(f"wrote {out}; build it with: quantize build {out}")
    return 0


def _publish(a: argparse.Namespace) -> int:
    from quantize.publish import publish

    print(publish(a.folder))
    return 0


def _verify(a: argparse.Namespace) -> int:
    from quantize.release import verify

    rep = verify(a.folder)
    for line in rep.lines():
        print(f"quantize: {a.folder}: {line}", file=sys.stderr)
    print(f"{a.folder}: {'OK' if rep.ok else 'FAILED'}")
    return 0 if rep.ok else 4


def quiet_libraries(verbose: bool, terminal: bool) -> None:
    """Keep library chatter out of a plain run: llama.cpp's loader log, transformers', gguf-py's and
    warnings only at ``-v``; progress bars only at ``-v`` on a terminal."""
    if not verbose:
        logging.getLogger("gguf").setLevel(logging.ERROR)  # HF template details that do not affect the output
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # read by llama-cpp-python's log callback
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if not (verbose and terminal):
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:  # already imported (a caller in the same process): tell it directly
        from transformers.utils import logging as tf_logging

        if not verbose:
            tf_logging.set_verbosity_error()
        if not (verbose and terminal):
            tf_logging.disable_progress_bar()


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as the one line every other error is (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"quantize: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="quantize", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("demo", help="build (or reuse) the embedded demo checkpoints and text")
    s.add_argument("--root", help="cache folder (default: artifacts/demo)")
    s.set_defaults(func=_demo)

    s = sub.add_parser("fetch-real", help="build (or reuse) Gemma 3 270M as an HF fp16 checkpoint, for tests and benchmarks")
    s.add_argument("--cache", help="cache folder (default: $QUANTIZE_REAL_CACHE or real/ in $XDG_CACHE_HOME/quantize, ~/.cache/quantize)")
    s.set_defaults(func=_fetch_real)

    s = sub.add_parser("init", help="write a release recipe from a checkpoint folder, an adapter folder or a Hub repo id")
    s.add_argument("source", help="a Hugging Face checkpoint or PEFT adapter: a folder, a repo id, or demo:/real: reference")
    s.add_argument("-o", "--out", help="the recipe to write (default: <name>.toml)")
    s.add_argument("--name", help="the release's name (default: the source's)")
    s.add_argument("--force", action="store_true", help="replace an existing recipe")
    s.add_argument("--demo-root", default="artifacts/demo", help="where demo: references are built (default: artifacts/demo)")
    s.set_defaults(func=_init)

    s = sub.add_parser("build", help="build a release from a recipe (default: recipes/demo.toml), rebuilding only what changed")
    s.add_argument("recipe", nargs="?")
    s.add_argument("--artifacts", default="artifacts")
    s.add_argument("--until", default="release", help="stop after this stage (default: release, the whole build; "
                   "an unknown name lists the stages)")
    s.add_argument("--types", help="only these GGUF types (comma-separated), instead of the recipe's ladder")
    s.add_argument("--demo-root", help="where the demo models are cached (default: ARTIFACTS/demo)")
    s.set_defaults(func=_build)

    s = sub.add_parser("verify", help="check a downloaded release folder against its manifest")
    s.add_argument("folder")
    s.set_defaults(func=_verify)

    s = sub.add_parser("convert", help="convert a float16/bf16/fp32 HF checkpoint to GGUF")
    s.add_argument("hf_dir")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--outtype", default="f16", choices=["f16", "bf16", "f32"])
    s.add_argument("--name", help="general.name (default: from the model card or folder name)")
    s.set_defaults(func=_convert)

    s = sub.add_parser("gguf", help="quantize an F16 GGUF with llama.cpp's quantizer")
    s.add_argument("input")
    s.add_argument("--type", help="llama.cpp file type name (Q4_K_M, Q6_K, Q8_0, IQ4_XS, ...; default Q4_K_M)")
    s.add_argument("--budget", help="search each tensor's type for the least predicted KL divergence within a size "
                                    "(4.2GB, 3.9GiB), bits per weight (4.85bpw) or a stock type's size (Q4_K_M)")
    s.add_argument("--probe-text", help="with --budget: text the predictor's probe files are scored on (the calibration "
                                        "text; without it the search minimises the summed weighted errors)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--imatrix", help="importance matrix GGUF (from `quantize imatrix`)")
    s.add_argument("--smooth", action="store_true", help="move activation outliers into the weights first (needs --imatrix)")
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--tensor-type", action="append", default=[], type=_tensor_type_option, metavar="TENSOR=TYPE",
                   help="one tensor's type by its exact name, e.g. blk.1.ffn_down.weight=Q8_0 (repeatable); name every "
                        "quantized tensor for a mix that llama.cpp's recipe for --type does not move")
    s.set_defaults(func=_gguf)

    s = sub.add_parser("imatrix", help="importance matrix from calibration text (llama.cpp's GGUF imatrix format)")
    s.add_argument("model", help="the fp16 HF checkpoint folder (run one decoder block at a time)")
    s.add_argument("--text", required=True, help="calibration text (UTF-8); never the evaluation text")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--eval-text", help="the evaluation text, to refuse/warn on overlap")
    s.add_argument("--ctx", type=int, default=512)
    s.add_argument("--chunks", type=int)
    s.add_argument("--device", default="auto", choices=DEVICES)
    s.set_defaults(func=_imatrix)

    s = sub.add_parser("merge", help="merge a PEFT LoRA adapter into its fp16/bf16 base, tensor by tensor")
    s.add_argument("base", help="the base HF checkpoint folder (safetensors)")
    s.add_argument("adapter", help="the PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin (a pickle: only from a trusted source)")
    s.set_defaults(func=_merge)

    s = sub.add_parser("smooth", help="move activation outliers into the weights of a float GGUF (and rescale its imatrix)")
    s.add_argument("input", help="F16/BF16/F32 GGUF")
    s.add_argument("--imatrix", required=True, help="importance matrix GGUF of the input (from `quantize imatrix`)")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--imatrix-out", required=True, help="where the importance matrix rescaled to the output goes")
    s.set_defaults(func=_smooth)

    s = sub.add_parser("eval", help="perplexity and KL divergence of artifacts against the fp16 reference; gate on thresholds")
    s.add_argument("artifacts", nargs="+")
    s.add_argument("--reference", required=True, help="HF fp16 folder (torch, float32) or F16 GGUF (llama.cpp)")
    s.add_argument("--text", required=True)
    s.add_argument("--ctx", type=int, default=512)
    s.add_argument("--chunks", type=int)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--device", default="auto", choices=DEVICES, help="where torch engines run (reference, AWQ)")
    s.add_argument("--json", help="also copy eval.json here")
    s.add_argument("--out-dir", default="artifacts/eval")
    s.add_argument("--cache", default="artifacts/eval-cache", help="where reference log-probabilities are cached")
    s.add_argument("--max", action="append", metavar="TYPE=RATIO,KLD", help="override a threshold, e.g. Q4_K_M=1.06,0.07")
    s.set_defaults(func=_eval)

    s = sub.add_parser("awq", help="4-bit AWQ (AutoAWQ, GEMM layout) of an HF checkpoint, or its RTN baseline")
    s.add_argument("hf_dir", type=Path)
    s.add_argument("-o", "--output", type=Path, required=True, help="output folder (written atomically)")
    s.add_argument("--calib", type=Path, help="UTF-8 calibration text (default: the demo's calibration split, Shakespeare; "
                   "use text from the model's own domain for a release)")
    s.add_argument("--device", choices=DEVICES, help="auto (default): CUDA if available, else CPU (float32, slow)")
    s.add_argument("--group-size", type=int, help="weights per scale (default: AutoAWQ's 128)")
    s.add_argument("--samples", type=int, help="calibration windows (default: AutoAWQ's 128)")
    s.add_argument("--seq-len", type=int, help="tokens per calibration window (default: AutoAWQ's 512)")
    s.add_argument("--method", choices=("awq", "rtn"), default="awq", help="rtn: the round-to-nearest baseline (no calibration)")
    s.set_defaults(func=_awq)

    s = sub.add_parser("ladder", help="a recipe's GGUF quantizations (its ladder but F16) as a JSON list; needs only "
                                      "the standard library, so a CI job can plan its matrix before installing anything")
    s.add_argument("recipe", type=Path)
    s.set_defaults(func=_ladder)

    s = sub.add_parser("publish", help="upload a verified release folder to the Hugging Face Hub (needs HF_TOKEN, HF_REPO_PREFIX)")
    s.add_argument("folder", type=Path)
    s.set_defaults(func=_publish)

    s = sub.add_parser("inspect", help="summarise a GGUF file")
    s.add_argument("file")
    s.set_defaults(func=_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    if (why := unsupported_platform()) is not None:
        print(f"quantize: {why}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(args.verbose, sys.stderr.isatty())
    progress.BARS = sys.stderr.isatty()
    handler: Handler = args.func
    try:
        return handler(args)
    except QuantizeError as err:
        print(f"quantize: {err}", file=sys.stderr)
        return 2
    finally:
        if argv is None:  # the command itself: the process exits next, and its last garbage collections then
            gc.freeze()  # skip the millions of objects torch and transformers left (~0.6 s of a short command)


if __name__ == "__main__":
    sys.exit(main())
