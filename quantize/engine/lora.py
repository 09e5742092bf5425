"""Merge a PEFT LoRA adapter into its base checkpoint tensor by tensor, before export, checking
first that the adapter belongs to this base.

Each adapted weight becomes ``W + scale * (B @ A)``, computed in float32 and cast back to the base
dtype (float16, bfloat16 or float32), which is what peft's ``merge_and_unload`` computes on the CPU;
``modules_to_save`` copies replace their base tensors.  The output has the base's shard files,
tensor names, order and index; every other file of the base folder (config, tokenizer, generation
config ...) is copied.  Memory holds one tensor at a time: the base is read with ``pread``, the
adapter the same way, and the shards are written through :class:`quantize.formats.safetensors.SafetensorsWriter`.

Everything is validated before the output folder is created: the adapter's configuration (only
plain LoRA: no DoRA, no trained biases), every adapted module and ``modules_to_save`` tensor
present in the base with fitting shapes and ranks.  ``adapter_model.safetensors`` is read as is;
``adapter_model.bin`` is a pickle, which can run code when loaded, so it is refused unless the
caller opts in, and then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantize.atomic import atomic_dir, check_output, sha256_file
from quantize.errors import QuantizeError
from quantize.formats.checkpoint import Checkpoint, TensorRef, open_checkpoint, read_json_object, read_shard_header
from quantize.formats.safetensors import SafetensorsWriter, TensorSpec, iter_range, read_range, tensor_from, torch_dtype

if TYPE_CHECKING:
    import torch

# torch, transformers and peft are imported inside the functions that train or check an adapter: merging
# streams tensors with numpy and needs none of them.

log = logging.getLogger(__name__)

PREFIX = "base_model.model."  # peft's prefix on every saved adapter key
INDEX = "model.safetensors.index.json"
# Base-folder files that are weights, never copied beside the merged shards.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# Adapter key suffix -> the LoRA factor it holds.
LORA_FACTORS = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# adapter_config.json settings that change what peft merges and that this merge does not reproduce;
# each is inert when unset, false or empty.
UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "use_qalora", "trainable_token_indices", "target_parameters",
               "alora_invocation_tokens")
FLOAT_DTYPES = ("F16", "BF16", "F32")


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT LoRA ``adapter_config.json`` that decide the merged weights."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def _pattern(patterns: dict[str, Any], module: str) -> str | None:
        # peft's get_pattern_key: the first key that matches the end of the module name.
        return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)

    def rank(self, module: str) -> int:
        key = self._pattern(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def scale(self, module: str) -> float:
        """peft's ``scaling``: alpha / sqrt(r) with rsLoRA, else alpha / r (per-module patterns first)."""
        key = self._pattern(self.alpha_pattern, module)
        alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        r = self.rank(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether ``target_modules`` selects ``module`` (peft: a string is a full regex match, a list
        matches whole names or name suffixes after a dot)."""
        t = self.target_modules
        if t is None:
            return True  # peft filled it in from the architecture; the weights decide
        if isinstance(t, str):
            return t == "all-linear" or re.fullmatch(t, module) is not None
        return any(module == m or module.endswith("." + m) for m in t)

    def saves(self, module: str) -> bool:
        return any(module == m or module.endswith("." + m) for m in self.modules_to_save)


def read_adapter_config(adapter: Path) -> AdapterConfig:
    """Read ``adapter_config.json``, refusing what a plain W + scale * B @ A merge would get wrong."""
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise QuantizeError(adapter, "no adapter_config.json; not a PEFT adapter folder")
    cfg = read_json_object(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise QuantizeError(path, f"peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters merge")
    for key in UNSUPPORTED:
        if cfg.get(key):
            raise QuantizeError(path, f"{key} = {cfg[key]!r} is not supported; only plain LoRA adapters merge")
    if cfg.get("bias", "none") != "none":
        raise QuantizeError(path, f"bias = {cfg['bias']!r}: the adapter trains biases, which this merge does not apply; "
                            "only bias = \"none\" adapters merge")
    targets = cfg.get("target_modules")
    try:
        return AdapterConfig(
            r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)), use_rslora=bool(cfg.get("use_rslora", False)),
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
            target_modules=targets if isinstance(targets, str) or targets is None else tuple(targets),
            modules_to_save=tuple(cfg.get("modules_to_save") or ()),
            rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
        )
    except (TypeError, ValueError) as exc:
        raise QuantizeError(path, f"unreadable LoRA settings ({exc})") from exc


def adapter_weights_file(adapter: Path, allow_pickle: bool) -> Path:
    st, pkl = adapter / "adapter_model.safetensors", adapter / "adapter_model.bin"
    if st.is_file():
        return st
    if pkl.is_file():
        if not allow_pickle:
            raise QuantizeError(pkl, "is a pickle, which can run code when loaded; set lora_allow_pickle = true in the "
                                "recipe (or convert it to safetensors) if you trust its source")
        return pkl
    raise QuantizeError(adapter, "no adapter_model.safetensors (or adapter_model.bin) found")


class AdapterWeights:
    """Shapes of every adapter tensor up front, values one tensor at a time: safetensors read with
    ``pread`` through the header parser the base uses (nothing stays mapped), a pickle through
    ``torch.load(weights_only=True)``."""

    def __init__(self, path: Path) -> None:
        import torch

        self.path = path
        self._refs: dict[str, TensorRef] = {}
        self._loaded: dict[str, torch.Tensor] = {}
        if path.suffix == ".safetensors":
            self._refs = {r.name: r for r in read_shard_header(path).tensors}
            for ref in self._refs.values():
                if ref.dtype not in FLOAT_DTYPES:
                    raise QuantizeError(path, f"tensor {ref.name!r} is {ref.dtype}; LoRA factors are float tensors")
            self.shapes = {k: r.shape for k, r in self._refs.items()}
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises its own types for corrupt or unsafe pickles
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise QuantizeError(path, f"cannot read the adapter weights ({first})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise QuantizeError(path, "is not a state dict of tensors")
        self._loaded = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}

    def get(self, key: str) -> torch.Tensor:
        if key in self._loaded:
            return self._loaded[key]
        ref = self._refs[key]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return tensor_from(read_range(fd, ref.begin, ref.end, self.path), ref)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class LoraPair:
    module: str
    a: str  # adapter key of lora_A (r, in)
    b: str  # adapter key of lora_B (out, r)
    scale: float


@dataclass(frozen=True)
class MergePlan:
    """What happens to each base tensor: a LoRA delta added, or replaced by a saved copy."""

    lora: dict[str, LoraPair]  # base tensor name -> its LoRA factors
    replace: dict[str, str]  # base tensor name -> adapter key of its modules_to_save copy


def plan_merge(ckpt: Checkpoint, cfg: AdapterConfig, weights: AdapterWeights, adapter: Path) -> MergePlan:
    """Map every adapter tensor onto a base tensor and check the shapes, before anything is written.
    An adapter that does not fit the base is refused in one line naming the adapter."""

    def foreign(detail: str) -> QuantizeError:
        return QuantizeError(adapter, f"does not fit the base model {ckpt.root.name} (trained for a different base?): {detail}")

    factors: dict[str, dict[str, str]] = {}
    replace: dict[str, str] = {}
    for key in weights.shapes:
        if not key.startswith(PREFIX):
            raise QuantizeError(weights.path, f"tensor {key!r} does not start with {PREFIX!r}; not a PEFT causal-LM adapter")
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in LORA_FACTORS if name.endswith(s)), None)
        if suffix is not None:
            factors.setdefault(name.removesuffix(suffix), {})[LORA_FACTORS[suffix]] = key
        elif ".lora_" in name:
            raise QuantizeError(weights.path, f"tensor {key!r} is not a plain LoRA factor (lora_A/lora_B weight); "
                                "embedding, convolution and DoRA adapters are not supported")
        elif cfg.saves(name.rpartition(".")[0]):
            replace[name] = key
        else:
            raise QuantizeError(weights.path, f"tensor {key!r} is neither a LoRA factor nor in modules_to_save")
    if not factors and not replace:
        raise QuantizeError(weights.path, "holds no LoRA tensors")
    lora: dict[str, LoraPair] = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise QuantizeError(weights.path, f"module {module!r} has lora_{''.join(ab)} but not its other factor")
        if not cfg.targets(module):
            raise QuantizeError(adapter, f"module {module!r} has LoRA weights but is not in target_modules {cfg.target_modules}")
        ref = ckpt.tensors.get(module + ".weight")
        if ref is None:
            raise foreign(f"no tensor {module}.weight in the base")
        a, b = weights.shapes[ab["A"]], weights.shapes[ab["B"]]
        shape = ref.shape[::-1] if cfg.fan_in_fan_out else ref.shape
        r = cfg.rank(module)
        if len(a) != 2 or len(b) != 2 or len(shape) != 2 or a[0] != r or b[1] != r or (b[0], a[1]) != shape:
            raise foreign(f"{module}: lora_A {list(a)} and lora_B {list(b)} (rank {r}) do not fit the base weight {list(ref.shape)}")
        if ref.dtype not in FLOAT_DTYPES:
            raise QuantizeError(ref.shard, f"tensor {ref.name} is {ref.dtype}; a LoRA merges only into float weights")
        lora[ref.name] = LoraPair(module, ab["A"], ab["B"], cfg.scale(module))
    for name, key in replace.items():
        ref = ckpt.tensors.get(name)
        if ref is None:
            raise foreign(f"modules_to_save tensor {name} is not in the base")
        if weights.shapes[key] != ref.shape:
            raise foreign(f"modules_to_save tensor {name} is {list(weights.shapes[key])}, the base's is {list(ref.shape)}")
    return MergePlan(lora, replace)


def _base_tensor(fd: int, ref: TensorRef) -> torch.Tensor:
    return tensor_from(read_range(fd, ref.begin, ref.end, ref.shard), ref)


def merged_tensor(fd: int, ref: TensorRef, pair: LoraPair, weights: AdapterWeights, fan_in_fan_out: bool) -> torch.Tensor:
    """``W + scale * (B @ A)`` in float32, cast to the base dtype: peft's CPU merge operation for
    operation (float32 factors, ``(B @ A) * scale``, added to the widened weight, rounded once), done
    in place so the peak is the stored tensor plus one float32 copy of it."""
    a, b = weights.get(pair.a).float(), weights.get(pair.b).float()
    delta = b @ a
    del a, b
    if fan_in_fan_out:
        delta = delta.T
    delta.mul_(pair.scale)
    w = _base_tensor(fd, ref)
    delta.add_(w)  # float32 += widened base weight: the same sum as W + delta (addition commutes exactly)
    return delta.to(w.dtype).contiguous()


def _tensor_bytes(t: torch.Tensor) -> list[np.ndarray]:
    """A contiguous tensor's bytes as one chunk for :meth:`SafetensorsWriter.write`."""
    import torch

    return [t.contiguous().view(torch.uint8).numpy()] if t.numel() else []


@contextmanager
def _open_fds(ckpt: Checkpoint) -> Iterator[dict[Path, int]]:
    fds: dict[Path, int] = {}
    try:
        for shard in ckpt.shards:
            fds[shard.path] = os.open(shard.path, os.O_RDONLY)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _write_shards(ckpt: Checkpoint, plan: MergePlan, weights: AdapterWeights, cfg: AdapterConfig, out: Path) -> None:
    with _open_fds(ckpt) as fds:
        for shard in ckpt.shards:
            fd = fds[shard.path]
            meta = dict(shard.metadata) or {"format": "pt"}
            with SafetensorsWriter(out / shard.path.name, [TensorSpec.of(r) for r in shard.tensors], meta) as w:
                for ref in shard.tensors:
                    if (pair := plan.lora.get(ref.name)) is not None:
                        w.write(ref.name, _tensor_bytes(merged_tensor(fd, ref, pair, weights, cfg.fan_in_fan_out)))
                    elif (key := plan.replace.get(ref.name)) is not None:
                        w.write(ref.name, _tensor_bytes(weights.get(key).to(torch_dtype(ref.dtype)).contiguous()))
                    else:
                        w.write(ref.name, iter_range(fd, ref.begin, ref.end, shard.path))


def _side_files(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.is_file() and p.name != INDEX and not p.name.endswith(WEIGHT_SUFFIXES))


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path, allow_pickle: bool = False) -> Path:
    """Write ``base`` with the LoRA ``adapter`` merged in to the folder ``out`` (see the module docstring)."""
    base, adapter, out = Path(base), Path(adapter), Path(out)
    check_output(out, [base, adapter], folder=True)
    ckpt = open_checkpoint(base)
    cfg = read_adapter_config(adapter)
    weights_path = adapter_weights_file(adapter, allow_pickle)
    weights = AdapterWeights(weights_path)
    plan = plan_merge(ckpt, cfg, weights, adapter)
    with atomic_dir(out) as tmp:
        _write_shards(ckpt, plan, weights, cfg, tmp)
        if (base / INDEX).is_file():
            shutil.copyfile(base / INDEX, tmp / INDEX)
        for f in _side_files(base):
            shutil.copyfile(f, tmp / f.name)
        (tmp / "merge.json").write_text(json.dumps({
            "base": base.name, "adapter": adapter.name, "adapter_sha256": sha256_file(weights_path),
            "r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora,
            "target_modules": sorted(cfg.target_modules) if isinstance(cfg.target_modules, tuple) else cfg.target_modules,  # peft writes them from a set
            "merged_tensors": len(plan.lora), "replaced_tensors": sorted(plan.replace),
        }, indent=2))
    log.info("merged %s into %s -> %s (%d tensors)", adapter, base, out, len(plan.lora))
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
