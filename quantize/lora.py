"""Merge a PEFT LoRA adapter into its base model in float16, before export (as the seed release's
merge was made), checking first that the adapter belongs to this base.

``adapter_model.safetensors`` is read as is; ``adapter_model.bin`` is a pickle, which can run code
when loaded, so it is refused unless the caller opts in explicitly.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .atomic import atomic_dir, sha256_file
from .errors import QuantizeError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def _adapter_weights(adapter: Path, allow_pickle: bool) -> Path:
    st, pkl = adapter / "adapter_model.safetensors", adapter / "adapter_model.bin"
    if st.is_file():
        return st
    if pkl.is_file():
        if not allow_pickle:
            raise QuantizeError(pkl, "is a pickle, which can run code when loaded; set lora_allow_pickle = true in the "
                                "recipe (or convert it to safetensors) if you trust its source")
        return pkl
    raise QuantizeError(adapter, "no adapter_model.safetensors (or adapter_model.bin) found")


def check_adapter(base: Path, adapter: Path) -> dict[str, Any]:
    """Refuse an adapter whose target modules or shapes do not fit the base, before loading weights."""
    cfg_path = adapter / "adapter_config.json"
    if not cfg_path.is_file():
        raise QuantizeError(adapter, "no adapter_config.json; not a PEFT adapter folder")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QuantizeError(cfg_path, f"peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters merge")
    return cfg


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path, allow_pickle: bool = False) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, out = Path(base), Path(adapter), Path(out)
    cfg = check_adapter(base, adapter)
    weights = _adapter_weights(adapter, allow_pickle)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise QuantizeError(adapter, f"does not fit the base model {base.name} (trained for a different base?): {first}") from None
    merged = peft_model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        (tmp / "merge.json").write_text(json.dumps({
            "base": base.name, "adapter": adapter.name, "adapter_sha256": sha256_file(weights),
            "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules"),
        }, indent=2))
    log.info("merged %s into %s -> %s", adapter, base, out)
    return out


def train_demo_lora(base: Path, text: Path, out: Path, steps: int = 30, seed: int = 7) -> Path:
    """A small real LoRA adapter for the demo recipe: a few steps on a slice of text."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(model, lcfg)
    ids = torch.tensor(tok(text.read_text(encoding="utf-8")[:200_000], add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 129, (8,), generator=gen).tolist()
        x = torch.stack([ids[s : s + 128] for s in starts])
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    with atomic_dir(out) as tmp:
        pm.save_pretrained(str(tmp))
    return out
