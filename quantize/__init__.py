"""Quantization and export build system for LLM releases (convert, quantize, AWQ, check, release)."""

__version__ = "0.1.0"
TOOL_NAME = "quantize"
