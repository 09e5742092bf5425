"""The versions of the tools an artifact is made with, and the provenance keys a GGUF we write carries,
as the release manifest and the files themselves record them."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from quantize import TOOL_NAME, __version__

if TYPE_CHECKING:
    import gguf

HASH_KEY = f"{TOOL_NAME}.source.sha256"  # a GGUF's source files' sha256, in the order of its source.files


def package_version(name: str) -> str:
    """An installed distribution's version, or ``absent``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def tool_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """This tool's and Python's versions, and each of ``packages``'."""
    return {"quantize": __version__, "python": platform.python_version(), **{p: package_version(p) for p in packages}}


def add_provenance(w: gguf.GGUFWriter, architecture: str, sources: dict[str, str]) -> None:
    """Provenance under our own namespace (llama.cpp defines no keys for these): this tool's and
    gguf-py's versions, the source's HF architecture, and each source file with its sha256."""
    w.add_string(f"{TOOL_NAME}.version", __version__)
    w.add_string(f"{TOOL_NAME}.gguf_py_version", package_version("gguf"))
    w.add_string(f"{TOOL_NAME}.source.architecture", architecture)
    w.add_array(f"{TOOL_NAME}.source.files", list(sources))
    w.add_array(HASH_KEY, list(sources.values()))
