"""What a fresh machine gives a test: a bare interpreter (a new venv holding pip only), an
environment without the test's own venv, and a commit of the working tree to clone from."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def snapshot_commit(repo: Path) -> str:
    """A commit object of the working tree (tracked and untracked, .gitignore honoured), made with a
    private index; no branch, ref or index of the repository changes."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": f"{tmp}/index", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
               "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
        git = ["git", "-C", str(repo)]
        subprocess.run([*git, "add", "-A"], env=env, check=True)
        tree = subprocess.run([*git, "write-tree"], env=env, check=True, capture_output=True, text=True).stdout.strip()
        return subprocess.run([*git, "commit-tree", tree, "-m", "test snapshot"], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()


def clone_snapshot(repo: Path, dest: Path) -> Path:
    """A fresh clone of ``snapshot_commit(repo)`` at ``dest`` (objects shared, detached)."""
    commit = snapshot_commit(repo)
    subprocess.run(["git", "clone", "--quiet", "--shared", "--no-checkout", str(repo), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "--quiet", "--detach", commit], check=True)
    return dest


def bare_venv(venv: Path, version: str | None = None) -> Path:
    """A new venv holding pip only, made from the Python the test's venv was made from, which must be
    ``version`` where one is asked for (what actions/setup-python gives a job); its bin folder."""
    have = f"{sys.version_info.major}.{sys.version_info.minor}"
    version = version or have
    exe = Path(sys.base_prefix) / "bin" / f"python{have}"
    assert version == have and exe.is_file(), f"Python {version} asked for; this machine has {have} at {sys.base_prefix}"
    subprocess.run([str(exe), "-m", "venv", str(venv)], check=True)
    return venv / "bin"


def pip_cache() -> Path:
    """The test machine's pip cache (``PIP_CACHE_DIR``, else pip's user cache folder)."""
    if os.environ.get("PIP_CACHE_DIR"):
        return Path(os.environ["PIP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"


def runner_env(python_bin: Path | None, cache: Path) -> dict[str, str]:
    """The test's environment less its venv, nox's and the project's variables, ``PYTHONPATH``,
    ``PYTHONDONTWRITEBYTECODE`` and every ``PATH`` folder holding a ``python`` or ``nox``;
    ``python_bin`` first on ``PATH``; a user cache of its own (``cache``), pip's cache shared with the
    test machine, pip's byte-compiling off."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV", "PYTHONDONTWRITEBYTECODE"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("NOX", "QUANTIZE_", "PYTEST_"))}
    path = [d for d in os.environ["PATH"].split(os.pathsep)
            if d and not any((Path(d) / exe).exists() for exe in ("python", "nox"))]
    env["PATH"] = os.pathsep.join(([str(python_bin)] if python_bin else []) + path)
    env["PIP_CACHE_DIR"] = str(pip_cache())
    # pip installs the same files without byte-compiling all of them (torch's: half the install time);
    # Python compiles what a command imports, once, as PYTHONDONTWRITEBYTECODE is dropped above
    env["PIP_COMPILE"] = "0"
    env["XDG_CACHE_HOME"] = str(cache)
    return env
