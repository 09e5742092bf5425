"""Build steps keyed by the hash of their inputs: run a step, or reuse its output when nothing changed.

A step's key is the hash of what it is made from (input fingerprints, parameters, tool version).
The key is recorded beside the output (``.steps/<step>.key``) only once the output is complete
(outputs themselves are written atomically), so a killed step is simply redone on the next run.
Steps that stream a model record the RAM their preflight computed (``.steps/<step>.preflight.json``)
and every step its duration (``.steps/<step>.seconds``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantize import __version__
from quantize.atomic import atomic_file
from quantize.engine.stream import StreamNeed

log = logging.getLogger(__name__)


@dataclass
class BuildLog:
    """Which steps a build made, which it reused, and how long each took (when it was made)."""

    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def step_key(**parts: Any) -> str:
    """The key of a step made from ``parts`` by this version of the tool."""
    return hashlib.sha256(json.dumps({"tool": __version__, **parts}, sort_keys=True, default=str).encode()).hexdigest()


class Steps:
    """Run-or-reuse for the build steps under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = BuildLog()

    def run(self, name: str, out: Path | tuple[Path, ...], key: str, make: Callable[[], Any],
            need: Callable[[], StreamNeed] | None = None) -> str:
        """Reuse the step when every output exists and its recorded key is ``key``; else make it (``need``,
        the step's RAM preflight, is computed only then).  Returns ``key``."""
        stamp = self.root / ".steps" / f"{name}.key"
        took = stamp.with_suffix(".seconds")
        outs = out if isinstance(out, tuple) else (out,)
        if all(o.exists() for o in outs) and stamp.is_file() and stamp.read_text() == key:
            log.info("%s: up to date", name)
            self.log.reused.append(name)
            if took.is_file():  # how long it took when it was built
                self.log.seconds[name] = float(took.read_text())
            return key
        t0 = time.time()
        log.info("%s: building", name)
        if need is not None:
            figure = need()
            log.info("%s: RAM needed (preflight): %s", name, figure.describe())
            with atomic_file(stamp.with_name(f"{name}.preflight.json")) as tmp:
                tmp.write_text(json.dumps({"need_bytes": figure.total, "parts": figure.parts()}, indent=2))
        make()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        self.log.built.append(name)
        self.log.seconds[name] = round(time.time() - t0, 2)
        with atomic_file(took) as tmp:
            tmp.write_text(str(self.log.seconds[name]))
        with atomic_file(stamp) as tmp:
            tmp.write_text(key)
        return key
