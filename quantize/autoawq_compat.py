"""AutoAWQ 0.2.9 as this project runs it: a quiet import, three fixes, CPU pinning.

AutoAWQ is archived (its last tested pair is torch 2.6 / transformers 4.51).  With transformers 5
its quantizer runs unchanged once the model is loaded by us (its own ``from_pretrained`` passes
``torch_dtype``/``low_cpu_mem_usage`` and ``trust_remote_code=True``, and would reach for the hub
for anything that is not a folder), so the only changes kept here are:

* :class:`CopyingAwqQuantizer`, AutoAWQ's :class:`AwqQuantizer` whose scale search backs the
  block up with a real copy (see :class:`_CopyingBackup` for the bug);
* :class:`BlockKwargsAwqQuantizer`, which also hands each block the arguments the model itself
  gives that block, not the ones block 0 got (Gemma 3's full-attention layers have their own
  rotary embedding and mask);
* :func:`offset_norms_folded`, which folds AWQ's scales correctly into every norm of the
  ``x_hat * (1 + w)`` kind (:data:`OFFSET_NORMS`; AutoAWQ knows only Gemma's and Gemma 2's);
* :func:`pinned_to_cpu`, which makes ``--device cpu`` mean CPU even on a host with a GPU
  (AutoAWQ picks ``cuda``/``mps``/``xpu`` by itself for every block it touches).

The per-family layer maps, ours and AutoAWQ's, are looked up in :mod:`quantize.awq_models`.

This module imports torch, transformers and AutoAWQ, so :mod:`quantize.awq` imports it only when
an AWQ stage actually runs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

# awq/__init__.py warns on import that the project is archived (known: the version is pinned), after
# resetting the process-wide DeprecationWarning filter to "default", so an "ignore" filter cannot
# silence it.  Recording the warnings instead keeps them off the console, and leaving the block
# restores the caller's filters.
with warnings.catch_warnings(record=True) as _import_warnings:
    import awq.modules.linear.gemm as _awq_gemm
    import awq.quantize.quantizer as _awq_quantizer
    import awq.quantize.scale as _awq_scale
    from awq.models._config import AwqConfig
    from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP
    from awq.models.base import BaseAWQForCausalLM
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.module import exclude_layers_to_not_quantize, get_named_linears

log = logging.getLogger(__name__)
for _w in _import_warnings:
    log.debug("on importing AutoAWQ: %s", str(_w.message).strip().splitlines()[0])

__all__ = [
    "AWQ_CAUSAL_LM_MODEL_MAP", "OFFSET_NORMS", "AwqConfig", "AwqQuantizer", "BaseAWQForCausalLM", "BlockKwargsAwqQuantizer",
    "CopyingAwqQuantizer", "WQLinear_GEMM", "offset_norms_folded", "pinned_to_cpu", "round_to_nearest", "scale_ln_fcs",
]

# AutoAWQ modules that call ``get_best_device()`` while quantizing (checked against 0.2.9's source).
_DEVICE_PICKERS = (_awq_quantizer, _awq_scale, _awq_gemm)


class _CopyingBackup(nn.Module):
    """Stands in for the module AutoAWQ's scale search inspects, so that its backup is a copy.

    ``AwqQuantizer._compute_best_scale`` (awq/quantize/quantizer.py, 0.2.9) backs the block up as
    ``{k: v.cpu() for k, v in module2inspect.state_dict().items()}``, then for each of its 20 grid
    points scales the weights in place (``fc.weight.mul_``), fake-quantizes them and restores them
    with ``load_state_dict(backup)``.  On a GPU ``.cpu()`` copies.  On the CPU it returns the very
    same tensor, so the "backup" follows the in-place scaling: every grid point after the first
    starts from weights already multiplied by the first grid point's scales, the search compares
    the wrong candidates, and the block keeps those scaled weights, to which AWQ's chosen scales
    are then applied a second time.  Measured on the demo model (8 x 128 calibration tokens):
    held-out perplexity +590 % with the aliased backup, +0.1 % with a copy.

    Here ``state_dict()`` hands out real host copies (``Tensor.to(..., copy=True)`` copies even
    when the tensor is already there, and keeps the backup off the GPU as AutoAWQ intended);
    calls and ``load_state_dict`` go to the wrapped module.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return {k: v.detach().to("cpu", copy=True) for k, v in self.inner.state_dict(*args, **kwargs).items()}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)


class CopyingAwqQuantizer(AwqQuantizer):
    """AutoAWQ's quantizer with the scale search's backup made a real copy (see :class:`_CopyingBackup`).

    Only ``_compute_best_scale`` is overridden, and only to hand AutoAWQ's own implementation the
    wrapper; the grid, the loss and everything else are AutoAWQ's.  The other ``.cpu()``/``.to()``
    calls of the quantizer were checked for the same aliasing: the cached linear inputs that
    ``apply_scale`` divides in place (``inp.div_``) are distinct tensors because
    ``_get_input_feat`` concatenates them (``torch.cat`` always allocates; q/k/v and gate/up read
    one activation each), and the clip search and ``_apply_quant`` only rebind ``.data`` to new
    tensors.  ``tests/test_awq.py`` pins both facts.
    """

    def _compute_best_scale(self, x: torch.Tensor, w_mean: torch.Tensor, x_mean: torch.Tensor, module2inspect: nn.Module,
                            linears2scale: list[nn.Linear], fp16_output: torch.Tensor, kwargs: dict[str, Any] | None = None
                            ) -> torch.Tensor:
        return super()._compute_best_scale(x, w_mean, x_mean, _CopyingBackup(module2inspect), linears2scale, fp16_output,
                                           kwargs or {})


class _AllRecorded(Exception):
    """Raised by the last stand-in block: every block's arguments are known, the rest of the model need not run."""


class _StandIn(nn.Module):
    """Takes a block's place for one forward pass: records its keyword arguments, passes the hidden states on."""

    def __init__(self, record: list[dict[str, Any]], last: bool) -> None:
        super().__init__()
        self.record, self.last = record, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError(f"a block was called with {len(args)} positional arguments after the hidden states; "
                            "BlockKwargsAwqQuantizer records keyword arguments only")
        self.record.append(kwargs)
        if self.last:
            raise _AllRecorded
        return hidden_states


class BlockKwargsAwqQuantizer(CopyingAwqQuantizer):
    """:class:`CopyingAwqQuantizer` that runs each block with that block's own keyword arguments.

    AutoAWQ 0.2.9 catches the keyword arguments of block 0 (attention mask, rotary ``(cos, sin)``,
    position ids) and hands them to every block, both to compute the next block's inputs and
    inside the scale search.  That is right when all blocks are alike, and wrong for Gemma 3,
    whose layers alternate sliding-window attention (rotary base 10 000, a banded mask) and full
    attention (rotary base 1 000 000, the causal mask): every full-attention layer would be
    calibrated, and every later layer fed, with the wrong positions and, past the window, the
    wrong mask.  Here the model's own forward pass is run once on block 0's inputs with every
    block replaced by a stand-in that records what it is given (no block computes, the pass stops
    at the last block), and :meth:`_sanitize_kwargs`, through which AutoAWQ passes the arguments
    of every block-level forward, hands out the recorded ones of the block concerned.
    """

    def init_quant(self, n_samples: int = 128, max_seq_len: int = 512) -> tuple[Any, dict[str, Any], torch.Tensor]:
        modules, kwargs, inps = super().init_quant(n_samples=n_samples, max_seq_len=max_seq_len)
        self.block_kwargs = self._record_block_kwargs(modules, inps)
        return modules, kwargs, inps

    @torch.no_grad()
    def _record_block_kwargs(self, blocks: nn.ModuleList, inps: torch.Tensor) -> list[dict[str, Any]]:
        record: list[dict[str, Any]] = []
        originals = list(blocks)
        self.awq_model.move_embed(self.model, inps.device)  # the rotary embedding runs on the inputs' device
        try:
            for i in range(len(blocks)):
                blocks[i] = _StandIn(record, last=i == len(blocks) - 1)
            self.model(inputs_embeds=inps)
        except _AllRecorded:
            pass
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block
            self.awq_model.move_embed(self.model, "cpu")
        if len(record) != len(blocks):
            raise RuntimeError(f"recorded the arguments of {len(record)} of {len(blocks)} blocks")
        return record

    def _sanitize_kwargs(self, inputs_kwargs: dict[str, Any], module: nn.Module) -> dict[str, Any]:
        # AutoAWQ passes its shared block-0 dict (``self.module_kwargs``) for a whole block and for a
        # block's attention in the scale search; a linear alone gets an empty dict of its own.
        if inputs_kwargs is self.module_kwargs:
            device = next(module.parameters()).device
            inputs_kwargs = {k: _to_device(v, device) for k, v in self.block_kwargs[self._block_index(module)].items()}
        return super()._sanitize_kwargs(inputs_kwargs, module)

    def _block_index(self, module: nn.Module) -> int:
        for i, block in enumerate(self.modules):
            if any(m is module for m in block.modules()):
                return i
        raise LookupError(f"{type(module).__name__} is in none of the model's blocks")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


# Norms computing ``x_hat * (1 + w)`` (Gemma's convention; ``w`` is stored zero-centred) instead of
# ``x_hat * w``.  Folding AWQ's ``1/s`` into one must give ``(1 + w') = (1 + w) / s``.
OFFSET_NORMS: tuple[type[nn.Module], ...] = (GemmaRMSNorm, Gemma2RMSNorm, Gemma3RMSNorm)
_stock_scale_ln_fcs = _awq_scale.scale_ln_fcs


@torch.no_grad()
def scale_ln_fcs(ln: Any, fcs: list[nn.Linear], scales: torch.Tensor) -> None:
    """AutoAWQ's ``scale_ln_fcs`` (fold ``1/s`` into a norm, ``s`` into the linears it feeds), right for every offset norm.

    AutoAWQ 0.2.9 checks ``isinstance(ln, (GemmaRMSNorm, Gemma2RMSNorm))`` and otherwise divides
    ``w`` itself.  ``apply_scale`` sends anything whose class name contains "rmsnorm" there, so a
    ``Gemma3RMSNorm`` gets ``w / s``, i.e. a gain of ``1 + w / s`` instead of ``(1 + w) / s``, while
    the linears are still multiplied by ``s``: the block is silently changed by a factor of about
    ``s`` per channel.  Offset norms are folded here in float32 (AutoAWQ adds and subtracts 1 in the
    weight's own dtype); every other norm goes to AutoAWQ's function unchanged.
    """
    if not isinstance(ln, OFFSET_NORMS):
        _stock_scale_ln_fcs(ln, fcs, scales)
        return
    w = cast(torch.Tensor, ln.weight)  # the norm's classes type their parameters loosely
    s = scales.to(w.device, torch.float32)
    w.copy_((1 + w.float()) / s - 1)
    for fc in fcs:
        fc.weight.mul_(s.view(1, -1).to(fc.weight.dtype))
    for p in (w, *(fc.weight for fc in fcs)):
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"folding AWQ scales into {type(ln).__name__} gave non-finite weights")


@contextlib.contextmanager
def offset_norms_folded() -> Iterator[None]:
    """AutoAWQ's ``apply_scale`` folds into norms with :func:`scale_ln_fcs` for the duration (restored afterwards)."""
    saved = _awq_scale.scale_ln_fcs
    try:
        _awq_scale.scale_ln_fcs = scale_ln_fcs
        yield
    finally:
        _awq_scale.scale_ln_fcs = saved


@contextlib.contextmanager
def pinned_to_cpu() -> Iterator[None]:
    """Keep AutoAWQ on the CPU for the duration, even where torch sees a GPU.

    AutoAWQ moves each block to ``cuda:i`` whenever ``torch.cuda.is_available()`` and otherwise to
    ``get_best_device()`` (mps, xpu or cpu), with no way to choose; both lookups are swapped for
    the duration and restored afterwards, whatever happens.
    """
    saved = [(m, m.get_best_device) for m in _DEVICE_PICKERS]
    saved_cuda = torch.cuda.is_available
    try:
        for m, _ in saved:
            m.get_best_device = _cpu  # type: ignore[attr-defined]
        torch.cuda.is_available = _no_cuda  # type: ignore[assignment]
        yield
    finally:
        for m, picker in saved:
            m.get_best_device = picker  # type: ignore[attr-defined]
        torch.cuda.is_available = saved_cuda  # type: ignore[assignment]


def _cpu() -> str:
    return "cpu"


def _no_cuda() -> bool:
    return False


def round_to_nearest(awq_model: BaseAWQForCausalLM, w_bit: int, group_size: int, zero_point: bool, version: str) -> None:
    """Quantize every block's linears with AutoAWQ's own final step and no search: the RTN baseline.

    ``AwqQuantizer._apply_quant`` is what AWQ itself ends with (float16 min-max fake-quantization
    per group, then ``WQLinear_GEMM.from_linear`` packing), so the baseline differs from AWQ only
    by the absent scale and clip search.  The quantizer's ``__init__`` would run a calibration
    pass, which RTN has no use for, so the instance is made without it and given the four
    settings ``_apply_quant`` and ``pseudo_quantize_tensor`` read.
    """
    q = object.__new__(CopyingAwqQuantizer)
    q.w_bit, q.group_size, q.zero_point, q.version = w_bit, group_size, zero_point, version.lower()
    skip = awq_model.quant_config.modules_to_not_convert
    for block in awq_model.get_model_layers(awq_model.model):
        q._apply_quant(block, exclude_layers_to_not_quantize(get_named_linears(block), skip))
