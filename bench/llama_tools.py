"""llama.cpp's own ``llama-imatrix``, the reference ``nox -s bench -- --only imatrix`` times and compares
our importance matrix with.

First found wins:

1. ``QUANTIZE_LLAMA_TOOLS``: a folder that already holds them (e.g. a llama.cpp checkout's ``build/bin``);
2. ``<user cache>/llama-tools-<version>/``, built on first use from the llama.cpp source that the installed
   llama-cpp-python ``<version>`` vendors: its sdist is fetched with ``pip download``, the vendored
   ``vendor/llama.cpp`` configured with CMake (Ninja, Release, static libraries, no HTTPS, no tests,
   examples or server) and only these targets built, with every core.  The build runs in a temporary
   folder beside the cache folder and is renamed into place when complete, so an interrupted build
   leaves nothing under the final name; its log is kept at ``<user cache>/llama-tools-<version>.log``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from quantize import user_cache
from quantize.atomic import atomic_dir, file_lock
from quantize.errors import QuantizeError
from quantize.resources import check_free_space
from quantize.versions import package_version

log = logging.getLogger(__name__)

TOOLS = ("llama-imatrix",)
ENV = "QUANTIZE_LLAMA_TOOLS"
DISTRIBUTION = "llama-cpp-python"
BUILD_DISK = 2 << 30  # the sdist, its extracted llama.cpp and the build tree, with room to spare
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",  # no HTTPS model downloads (what LLAMA_CURL=OFF was before llama.cpp deprecated it)
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_COMMON=ON",
)
FIX = f"or set {ENV} to a folder holding your own llama.cpp build's {', '.join(TOOLS)}"


def tools_dir(version: str) -> Path:
    """Where the tools built from llama-cpp-python ``version``'s source are cached."""
    return user_cache() / f"llama-tools-{version}"


def llama_tool(name: str) -> Path:
    """The path of llama.cpp's executable ``name`` (one of :data:`TOOLS`), building the cached set first if needed."""
    if name not in TOOLS:
        raise ValueError(f"{name!r} is not one of the llama.cpp tools built here ({', '.join(TOOLS)})")
    if folder := os.environ.get(ENV):
        exe = Path(folder) / name
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise QuantizeError(exe, f"{ENV} names a folder without an executable {name}; point it at a llama.cpp build's "
                                "bin folder, or unset it to build the tools once from llama-cpp-python's source")
        return exe
    version = package_version(DISTRIBUTION)
    if version == "absent":
        raise QuantizeError(None, f"{DISTRIBUTION} is not installed, so there is no llama.cpp source version to build "
                            f"{name} from; install this project's dependencies, {FIX}")
    final = tools_dir(version)
    if not (final / name).is_file():
        with file_lock(final.with_name(f".{final.name}.lock"), f"another process is building llama.cpp's tools into {final}"):
            if not (final / name).is_file():
                build_tools(version, final)
    return final / name


def _find(program: str) -> str | None:
    """``program`` on PATH or beside this Python (a venv's pip-installed cmake/ninja when the venv is not activated)."""
    beside = Path(sys.executable).parent / program
    return shutil.which(program) or (str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None)


def _run(cmd: list[str], logfile: Path, what: str, cwd: Path | None = None) -> None:
    """Run ``cmd`` with its output appended to ``logfile``; a failure is a one-line error naming the log."""
    with open(logfile, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        res = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    if res.returncode != 0:
        lines = [ln.strip() for ln in logfile.read_text(errors="replace").splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "no output")
        raise QuantizeError(logfile, f"{what} failed (exit {res.returncode}; {last[:160]}); read this log for the cause, {FIX}")


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Extract only the sdist's ``vendor/llama.cpp`` into ``dest``; the path of the llama.cpp source."""
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in f"{m.name}/"]
        if not members:
            raise QuantizeError(sdist, "holds no vendor/llama.cpp source; this llama-cpp-python sdist cannot build the tools; " + FIX)
        for m in members:
            if m.name.startswith("/") or ".." in Path(m.name).parts:
                raise QuantizeError(sdist, f"member {m.name!r} would be written outside the build folder; refusing it; " + FIX)
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, members=members, filter="data")
        else:  # Python before 3.10.12 / 3.11.4: members were checked above
            tf.extractall(dest, members=members)  # noqa: S202
    root = members[0].name.split("/")[0]
    return dest / root / "vendor" / "llama.cpp"


def build_tools(version: str, final: Path) -> None:
    """Build :data:`TOOLS` from llama-cpp-python ``version``'s sdist and install them at ``final`` atomically."""
    cmake, ninja = _find("cmake"), _find("ninja")
    if cmake is None or ninja is None:
        missing = " and ".join(p for p, found in (("cmake", cmake), ("ninja", ninja)) if found is None)
        raise QuantizeError(final, f"building llama.cpp's tools needs {missing} on PATH; install them (pip install cmake ninja), {FIX}")
    check_free_space(final.parent, BUILD_DISK, "building llama.cpp's tools")
    logfile = final.with_name(f"{final.name}.log")
    logfile.write_text(f"llama.cpp tools from {DISTRIBUTION}=={version}\n")
    jobs = os.cpu_count() or 1
    log.warning("building llama.cpp's %s from %s %s's source into %s, once: several minutes of all %d cores "
                "(timings taken meanwhile are disturbed); log: %s", ", ".join(TOOLS), DISTRIBUTION, version, final, jobs, logfile)
    t0 = time.perf_counter()
    with atomic_dir(final) as tmp:
        work = tmp / "work"
        work.mkdir()
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
              f"{DISTRIBUTION}=={version}", "-d", str(work)], logfile, f"downloading the {DISTRIBUTION} {version} sdist")
        sdists = sorted(work.glob("*.tar.gz"))
        if not sdists:
            raise QuantizeError(logfile, f"pip download left no {DISTRIBUTION} {version} sdist (.tar.gz) in {work}; {FIX}")
        src = _extract_llama_cpp(sdists[0], work / "src")
        build = work / "build"
        _run([cmake, "-S", str(src), "-B", str(build), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", *CMAKE_OPTIONS],
             logfile, "configuring llama.cpp with CMake")
        _run([cmake, "--build", str(build), "--target", *TOOLS, "-j", str(jobs)], logfile, "building llama.cpp's tools")
        for name in TOOLS:
            exe = build / "bin" / name
            if not exe.is_file():
                raise QuantizeError(logfile, f"the build finished without {exe}; read this log, {FIX}")
            shutil.copy2(exe, tmp / name)
        seconds = time.perf_counter() - t0
        (tmp / "build.json").write_text(json.dumps({"source": f"{DISTRIBUTION}=={version} sdist, vendor/llama.cpp",
                                                    "cmake_options": list(CMAKE_OPTIONS), "jobs": jobs,
                                                    "build_seconds": round(seconds, 1)}, indent=2) + "\n")
        shutil.rmtree(work)
    log.warning("built llama.cpp's tools in %.0f s: %s", seconds, final)


def build_seconds(version: str | None = None) -> float | None:
    """How long the cached tools of llama-cpp-python ``version`` (default: the installed one) took to build, if recorded."""
    info = tools_dir(version or package_version(DISTRIBUTION)) / "build.json"
    try:
        return float(json.loads(info.read_text())["build_seconds"])
    except (OSError, ValueError, KeyError):
        return None
