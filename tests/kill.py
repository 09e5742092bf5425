"""SIGKILL a ``quantize`` command at a random point of a live run, then rerun it (test_hostile, test_release).

Every random choice comes from one ``random.Random(seed)`` per kill; the seed is printed and named in
every failure, so a failure reruns with ``QUANTIZE_TEST_SEED=<seed>``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED_ENV = "QUANTIZE_TEST_SEED"
_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m quantize ARGS``, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "quantize", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=_ENV)


def partials(folder: Path) -> list[Path]:
    return list(folder.rglob(".partial-*"))


def seeded_random() -> tuple[int, random.Random]:
    """A generator seeded from ``$QUANTIZE_TEST_SEED``, else from the system's entropy; the seed is printed."""
    env = os.environ.get(SEED_ENV)
    seed = int(env) if env else random.SystemRandom().randrange(2**32)
    print(f"\n{SEED_ENV}={seed}{' (from the environment)' if env else ''}")
    return seed, random.Random(seed)


_BUILDING = re.compile(r"^INFO quantize\.steps: (\S+): building$", re.M)


@dataclass(frozen=True)
class BuildStep:
    """A step of ``quantize -v build``: begun once the build logs ``NAME: building``, over once the step
    has written ``output`` (its final file) or its stamp ``.steps/NAME.key`` under ``build_dir`` (the
    recipe's folder under ``artifacts/build``)."""

    name: str
    build_dir: Path
    output: Path

    @property
    def stamp(self) -> Path:
        return self.build_dir / ".steps" / f"{self.name}.key"

    def begun(self, log: str) -> bool:
        return self.name in _BUILDING.findall(log)

    def inside(self, log: str) -> bool:
        """The last step the build began is this one, and it has neither written its output nor its stamp."""
        begun = _BUILDING.findall(log)
        return bool(begun) and begun[-1] == self.name and not self.output.exists() and not self.stamp.exists()

    def reset(self) -> None:
        """Forget the step's result, so that the next build makes it again."""
        self.stamp.unlink(missing_ok=True)
        shutil.rmtree(self.output) if self.output.is_dir() else self.output.unlink(missing_ok=True)


def killed_then_rerun(argv: list[str | Path], final: Path, folder: Path, longest: float, valid: Callable[[Path], bool],
                      mid_write: bool = True, step: BuildStep | None = None, after_kill: Callable[[], None] | None = None,
                      deadline: float = 300.0) -> None:
    """Run ``python -m quantize ARGV`` and SIGKILL it a random delay (up to ``longest`` seconds) after a
    trigger: ``step`` began (``argv`` must log it: ``-v build ...``), else its first new partial appeared
    in ``folder`` (``mid_write``), else it started.  The kill counts only if it killed the live process
    (it died of SIGKILL) where it was aimed: inside ``step`` (checked again once the process is dead:
    the step began last and wrote neither output nor stamp), or with a partial of this run in ``folder``.
    A kill that missed is retried with a shorter delay (``step`` reset), 8 tries in all.

    After every kill whatever stands under ``final`` must be ``valid`` (then it is removed), and
    ``after_kill`` runs.  Then a rerun to the end: exit 0, ``final`` valid, no partial left behind.
    A trigger not reached within ``deadline`` seconds, or a step the command ends without beginning, fails."""
    seed, rng = seeded_random()
    tag = f"[{SEED_ENV}={seed}]"
    command = next(str(a) for a in argv if not str(a).startswith("-"))
    where = f"step {step.name}" if step else "its first partial" if mid_write else "start"
    delay = rng.uniform(0.0 if (step or mid_write) else 0.5, longest)
    with tempfile.TemporaryDirectory(prefix="quantize-kill-") as tmp:
        errors = Path(tmp) / "stderr"

        def log() -> str:
            return errors.read_text(errors="replace")

        def triggered(stale: set[Path]) -> bool:
            if step:
                return step.begun(log())
            return not mid_write or bool(set(partials(folder)) - stale)

        for attempt in range(8):
            stale = set(partials(folder))  # an earlier attempt's: they show nothing of this run
            with open(errors, "w") as err:
                p = subprocess.Popen([sys.executable, "-m", "quantize", *map(str, argv)], stdout=subprocess.DEVNULL, stderr=err,
                                     env=_ENV)
            start = time.monotonic()
            while not triggered(stale) and p.poll() is None:
                if time.monotonic() - start > deadline:
                    p.kill()
                    p.wait()
                    pytest.fail(f"{tag} {command}: {where} not reached within {deadline:g} s\n{log()[-3000:]}")
                time.sleep(0.02)
            if step and p.poll() is not None and not step.begun(log()):
                pytest.fail(f"{tag} {command} ended (exit {p.returncode}) without beginning step {step.name}\n{log()[-3000:]}")
            time.sleep(delay if (step or mid_write) else max(0.0, delay - (time.monotonic() - start)))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            rc = p.wait()
            killed = rc == -signal.SIGKILL  # it was alive when the signal came
            renamed = final.exists()
            # checked once it is dead, when nothing can change any more: inside the step, or mid-write
            made = step.inside(log()) if step else bool(set(partials(folder)) - stale) or not mid_write
            landed = killed and made and not renamed
            print(f"SIGKILL {delay:.2f} s after {where} (try {attempt + 1}): {command}, "
                  f"{'killed' if killed else f'had ended (exit {rc})'}{f' inside {where}' if step and landed else ''}"
                  f"{', output complete' if renamed else ''}, {len(partials(folder))} partial(s)")
            if renamed:  # finished (or renamed) before the kill: it must be whole
                assert valid(final), f"{tag} {final} is incomplete after SIGKILL {delay:.2f} s after {where}"
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            if after_kill:
                after_kill()
            if landed:
                break
            if step:
                step.reset()
            delay = rng.uniform(0.0, delay)  # earlier
        else:
            pytest.fail(f"{tag} no kill of {command} landed in {where} of a live run in 8 tries")
    res = cli(*argv)
    assert res.returncode == 0, f"{tag} rerun of {command} failed:\n{res.stderr[-3000:]}"
    assert valid(final), f"{tag} {final} is not valid after the rerun"
    assert not partials(folder), f"{tag} partials left after the rerun: {partials(folder)}"
