"""Quantization and export build system for LLM releases (convert, quantize, AWQ, check, release)."""

import importlib.util
import os
import sys
from pathlib import Path

__version__ = "0.1.0"
TOOL_NAME = "quantize"

# gguf-py imports mistral-common (~0.5 s of every command's start) for a vocabulary class this tool
# never uses; gguf is imported here without it, and mistral-common stays importable afterwards.  Where
# gguf is not installed (a bare interpreter reading a recipe), nothing is imported.
if "gguf" not in sys.modules and "mistral_common" not in sys.modules and importlib.util.find_spec("gguf") is not None:
    sys.modules["mistral_common"] = None  # type: ignore[assignment]
    try:
        import gguf  # noqa: F401
    finally:
        del sys.modules["mistral_common"]


def user_cache() -> Path:
    """This tool's folder in the user's cache: ``$XDG_CACHE_HOME/quantize``, else ``~/.cache/quantize``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / TOOL_NAME
