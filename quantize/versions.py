"""The versions of the tools an artifact is made with, as its provenance and the release manifest record them."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from . import __version__


def package_version(name: str) -> str:
    """An installed distribution's version, or ``absent``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def tool_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """This tool's and Python's versions, and each of ``packages``'."""
    return {"quantize": __version__, "python": platform.python_version(), **{p: package_version(p) for p in packages}}
