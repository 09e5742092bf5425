"""The ``quantize`` command line: one subcommand per pipeline stage, all calling the package.

Errors the user can fix (:class:`QuantizeError`) print as one line, ``quantize: <file>: <problem>``,
and exit with status 2; nothing is left at the output path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import QuantizeError

Handler = Callable[[argparse.Namespace], int]


def _demo(a: argparse.Namespace) -> int:
    from .demo import build_demo

    demo = build_demo(Path(a.root) if a.root else None)
    print(json.dumps({"root": str(demo.root), "models": {k: str(v) for k, v in demo.models.items()},
                      "text": {k: str(v) for k, v in demo.text.items()}}, indent=2))
    return 0


def _convert(a: argparse.Namespace) -> int:
    from .convert import convert

    res = convert(a.hf_dir, a.output, a.outtype, a.name)
    print(f"{res.path}: {res.n_tensors} tensors, {res.n_bytes / 2**20:.1f} MiB")
    return 0


def _inspect(a: argparse.Namespace) -> int:
    from .gguf_info import summarize

    print(summarize(a.file).render())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantize", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="build (or reuse) the embedded demo checkpoints and text")
    s.add_argument("--root", help="cache folder (default: artifacts/demo)")
    s.set_defaults(func=_demo)

    s = sub.add_parser("convert", help="convert a float16/bf16/fp32 HF checkpoint to GGUF")
    s.add_argument("hf_dir")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--outtype", default="f16", choices=["f16", "bf16", "f32"])
    s.add_argument("--name", help="general.name (default: from the model card or folder name)")
    s.set_defaults(func=_convert)

    s = sub.add_parser("inspect", help="summarise a GGUF file")
    s.add_argument("file")
    s.set_defaults(func=_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # gguf-py warns about HF template details that do not affect the output
        logging.getLogger("gguf").setLevel(logging.ERROR)
    handler: Handler = args.func
    try:
        return handler(args)
    except QuantizeError as err:
        print(f"quantize: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
