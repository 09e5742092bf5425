"""``quantize inspect``: a readable summary of a GGUF file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantize.formats.gguf_read import field_value, open_gguf


def metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@dataclass(frozen=True)
class Summary:
    path: Path
    architecture: str
    name: str | None
    file_type: str
    n_tensors: int
    n_params: int
    size_bytes: int
    bits_per_weight: float
    tensor_types: dict[str, int]
    tokenizer: str
    n_tokens: int
    chat_template: bool
    special: dict[str, Any]

    def render(self) -> str:
        types = ", ".join(f"{k}: {v}" for k, v in sorted(self.tensor_types.items()))
        special = ", ".join(f"{k}={v}" for k, v in self.special.items())
        return "\n".join([
            f"file           {self.path}",
            f"architecture   {self.architecture}   name: {self.name}",
            f"file type      {self.file_type}",
            f"tensors        {self.n_tensors} ({types})",
            f"parameters     {self.n_params:,}",
            f"size           {self.size_bytes / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bits per weight",
            f"tokenizer      {self.tokenizer}, {self.n_tokens} tokens; {special}",
            f"chat template  {'present' if self.chat_template else 'absent'}",
        ])


def summarize(path: str | Path) -> Summary:
    r = open_gguf(path)
    arch = field_value(r, "general.architecture") or "?"
    ft = field_value(r, "general.file_type")
    try:
        ft_name = gguf.LlamaFileType(ft).name if ft is not None else "?"
    except ValueError:
        ft_name = str(ft)
    n_params = sum(int(np.prod(t.shape)) for t in r.tensors)
    size = Path(path).stat().st_size
    data_bytes = sum(int(t.n_bytes) for t in r.tensors)
    tokens = field_value(r, "tokenizer.ggml.tokens") or []
    special = {k.removeprefix("tokenizer.ggml.").removesuffix("_token_id"): field_value(r, k)
               for k in r.fields if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")}
    for flag in ("add_bos_token", "add_eos_token"):
        if (v := field_value(r, f"tokenizer.ggml.{flag}")) is not None:
            special[flag] = v
    return Summary(
        path=Path(path), architecture=arch, name=field_value(r, "general.name"), file_type=ft_name,
        n_tensors=len(r.tensors), n_params=n_params, size_bytes=size,
        bits_per_weight=8 * data_bytes / max(n_params, 1),
        tensor_types=dict(Counter(t.tensor_type.name for t in r.tensors)),
        tokenizer=f"{field_value(r, 'tokenizer.ggml.model')} (pre: {field_value(r, 'tokenizer.ggml.pre')})",
        n_tokens=len(tokens), chat_template=field_value(r, "tokenizer.chat_template") is not None, special=special,
    )
