"""Quantization and export build system for LLM releases (convert, quantize, AWQ, check, release)."""

import os
from pathlib import Path

__version__ = "0.1.0"
TOOL_NAME = "quantize"


def user_cache() -> Path:
    """This tool's folder in the user's cache: ``$XDG_CACHE_HOME/quantize``, else ``~/.cache/quantize``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / TOOL_NAME
