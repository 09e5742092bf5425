"""AutoAWQ 0.2.9 as this project runs it: every change made to it is here.

AutoAWQ is archived (its last tested pair is torch 2.6 / transformers 4.51).  Its own
``from_pretrained`` is not used (it passes ``torch_dtype``/``low_cpu_mem_usage`` and
``trust_remote_code=True``, and would reach for the hub for anything that is not a folder): the
model is loaded by us and handed to AutoAWQ's per-family wrapper.  What this module changes:

* the import: AutoAWQ's archived-project warning is recorded and logged at debug level instead of
  printed;
* :class:`CopyingAwqQuantizer`, a subclass of AutoAWQ's :class:`AwqQuantizer`: its scale search
  (``_compute_best_scale``) backs the block up with a real copy (see :class:`_CopyingBackup` for
  the bug), and its clip search (``_compute_best_clip``) is rewritten to compute each candidate's
  error as one batched matrix product, same choices up to float rounding, in bounded memory;
* :class:`BlockKwargsAwqQuantizer`, which overrides ``init_quant`` and ``_sanitize_kwargs`` so that
  each block runs with the arguments the model itself gives that block, not the ones block 0 got
  (Gemma 3's full-attention layers have their own rotary embedding and mask);
* :class:`StreamingAwqQuantizer`, which replaces ``init_quant`` (calibration samples embedded with
  only the embeddings resident) and re-implements AutoAWQ's ``quantize`` loop with AutoAWQ's own
  per-block steps, one block of the model resident at a time;
* :func:`offset_norms_folded`, which for its duration replaces the module attribute
  ``awq.quantize.scale.scale_ln_fcs`` (what ``apply_scale`` folds into norms with), so that scales
  fold correctly into norms of the ``x_hat * (1 + w)`` kind (the norms a family's row stores as
  ``w + 1``; AutoAWQ knows only Gemma's and Gemma 2's, and folds those in their own dtype);
* :func:`pinned_to_cpu`, which for its duration replaces ``get_best_device`` in three AutoAWQ
  modules and ``torch.cuda.is_available``, so that ``--device cpu`` means CPU even on a host with
  a GPU (AutoAWQ picks ``cuda``/``mps``/``xpu`` by itself for every block it touches);
* :func:`round_to_nearest_block`, the RTN baseline: AutoAWQ's final quantize-and-pack step
  (``_apply_quant``) on a quantizer instance made without its ``__init__``, so without calibration.

The per-family layer maps, ours and AutoAWQ's, are looked up in :mod:`quantize.engine.awq_models`.

This module imports torch and AutoAWQ (which imports transformers), so :mod:`quantize.awq` imports
it only when an AWQ stage actually runs.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn

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
    from awq.quantize.scale import apply_clip, apply_scale
    from awq.utils.calib_data import get_calib_dataset
    from awq.utils.module import exclude_layers_to_not_quantize, get_named_linears
    from awq.utils.utils import clear_memory

from quantize.architectures import Architecture
from quantize.engine.stream import Skeleton, record_block_kwargs, to_device

log = logging.getLogger(__name__)
for _w in _import_warnings:
    log.debug("on importing AutoAWQ: %s", str(_w.message).strip().splitlines()[0])

__all__ = [
    "AWQ_CAUSAL_LM_MODEL_MAP", "AwqConfig", "AwqQuantizer", "BaseAWQForCausalLM", "BlockKwargsAwqQuantizer",
    "CopyingAwqQuantizer", "StreamingAwqQuantizer", "WQLinear_GEMM", "offset_norm_types", "offset_norms_folded", "pinned_to_cpu",
    "round_to_nearest", "round_to_nearest_block", "scale_offset_norm_fcs",
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
    """AutoAWQ's quantizer with the scale search's backup made a real copy (see :class:`_CopyingBackup`)
    and a clip search whose memory is bounded (see :meth:`_compute_best_clip`).

    ``_compute_best_scale`` is overridden only to hand AutoAWQ's own implementation the wrapper;
    the grid, the loss and everything else are AutoAWQ's.  The other ``.cpu()``/``.to()``
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

    @torch.no_grad()
    def _compute_best_clip(self, w: torch.Tensor, input_feat: torch.Tensor, n_grid: int = 20, max_shrink: float = 0.5,
                           n_sample_token: int = 512) -> torch.Tensor:
        """AutoAWQ 0.2.9's clip search with each candidate's output error computed as one batched
        matrix product per group, ``x_g @ (q(w_g) - w_g)^T``.

        Everything else is AutoAWQ's: the token subsample (every ``n_tok // n_sample_token``-th),
        the output-channel batches (256, else 64), the shrink grid, ``pseudo_quantize_tensor``, the
        mean squared error per channel and group, strict improvement over a start of 1e9, and the
        ``[out, n_group, 1]`` result.  AutoAWQ forms the broadcast product of every sampled token
        with every weight of a batch (``oc_batch x tokens x in_features`` floats: 7.5 GB for a
        Mistral-7B ``down_proj``, 15 GB at Llama-2-70B's width, eleven times per batch, on the CPU
        elementwise); the product here is ``n_group x tokens x oc_batch``.  The two differ only in
        float rounding of the error (tests/test_awq.py compares the choices).
        """
        group = self.group_size if self.group_size > 0 else w.shape[1]
        x = input_feat.reshape(-1, input_feat.shape[-1])
        x = x[:: max(1, x.shape[0] // n_sample_token)]
        xg = x.reshape(x.shape[0], -1, group).transpose(0, 1).to(w.device)  # [n_group, tokens, group]
        wg = w.reshape(w.shape[0], -1, group)  # [out, n_group, group]
        oc_batch = 256 if w.shape[0] % 256 == 0 else 64
        assert w.shape[0] % oc_batch == 0
        best_all = []
        for start in range(0, w.shape[0], oc_batch):
            wb = wg[start:start + oc_batch]
            org_max = wb.abs().amax(dim=-1, keepdim=True)  # [oc, n_group, 1]
            best, min_errs = org_max.clone(), torch.ones_like(org_max) * 1e9
            for i_s in range(int(max_shrink * n_grid)):
                max_val = org_max * (1 - i_s / n_grid)
                change = self.pseudo_quantize_tensor(torch.clamp(wb, -max_val, max_val))[0] - wb
                err = torch.bmm(xg, change.permute(1, 2, 0)).pow(2).mean(dim=1)  # [n_group, oc]
                err = err.transpose(0, 1).unsqueeze(-1)
                better = err < min_errs
                min_errs[better] = err[better]
                best[better] = max_val[better]
            best_all.append(best)
        return torch.cat(best_all, dim=0)


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

    def _record_block_kwargs(self, blocks: nn.ModuleList, inps: torch.Tensor) -> list[dict[str, Any]]:
        self.awq_model.move_embed(self.model, inps.device)  # the rotary embedding runs on the inputs' device
        try:
            return record_block_kwargs(self.model.get_decoder(), inps)
        finally:
            self.awq_model.move_embed(self.model, "cpu")

    def _sanitize_kwargs(self, inputs_kwargs: dict[str, Any], module: nn.Module) -> dict[str, Any]:
        # AutoAWQ passes its shared block-0 dict (``self.module_kwargs``) for a whole block and for a
        # block's attention in the scale search; a linear alone gets an empty dict of its own.
        if inputs_kwargs is self.module_kwargs:
            device = next(module.parameters()).device
            inputs_kwargs = to_device(self.block_kwargs[self._block_index(module)], device)
        return super()._sanitize_kwargs(inputs_kwargs, module)

    def _block_index(self, module: nn.Module) -> int:
        for i, block in enumerate(self.modules):
            if any(m is module for m in block.modules()):
                return i
        raise LookupError(f"{type(module).__name__} is in none of the model's blocks")


class StreamingAwqQuantizer(BlockKwargsAwqQuantizer):
    """AutoAWQ's per-block AWQ with only one block of the model resident, read from disk when its turn comes.

    The model is a :class:`quantize.engine.stream.Skeleton` (parameters on the meta device).  Calibration
    samples are cut by AutoAWQ's own ``get_calib_dataset`` and embedded with the embeddings alone
    resident; each block then gets its own recorded arguments (as in :class:`BlockKwargsAwqQuantizer`).
    :meth:`quantize` is AutoAWQ 0.2.9's loop, step for step with AutoAWQ's own methods (input
    features, scale search and application, clip search and application, packing into
    ``WQLinear_GEMM``), with the block made resident before and handed to ``on_block`` (which
    writes it) and dropped after.  The device shuffling of AutoAWQ's loop is not needed: a resident
    block and its inputs are on the skeleton's device.
    """

    def __init__(self, skeleton: Skeleton, on_block: Callable[[int, nn.Module], None], *args: Any, **kwargs: Any) -> None:
        self.skeleton, self.on_block = skeleton, on_block
        super().__init__(*args, **kwargs)

    @torch.no_grad()
    def init_quant(self, n_samples: int = 128, max_seq_len: int = 512) -> tuple[Any, dict[str, Any], torch.Tensor]:
        sk = self.skeleton
        samples = torch.cat(get_calib_dataset(data=self.calib_data, tokenizer=self.tokenizer, n_samples=n_samples,
                                              max_seq_len=max_seq_len, split=self.split, text_column=self.text_column), dim=0)
        with sk.resident(sk.embed) as embed:
            inps = embed(samples.to(sk.device))
        self.block_kwargs = record_block_kwargs(sk.decoder, inps)
        return self.awq_model.get_model_layers(self.model), {}, inps

    def quantize(self) -> None:
        for i, block in enumerate(self.modules):
            with self.skeleton.resident(block):
                named_linears = exclude_layers_to_not_quantize(get_named_linears(block), self.modules_to_not_convert)
                input_feat = self._get_input_feat(block, named_linears)
                clear_memory()
                groups = self.awq_model.get_layers_for_scaling(block, input_feat, self.module_kwargs)
                apply_scale(block, [self._search_best_scale(block, **g) for g in groups], input_feat_dict=input_feat)
                if self.apply_clip:
                    apply_clip(block, self._search_best_clip(block, named_linears, input_feat))
                if not self.export_compatible:
                    self._apply_quant(block, named_linears)
                del input_feat
                self.on_block(i, block)
            clear_memory()
            log.info("AWQ: block %d of %d quantized", i + 1, len(self.modules))


_stock_scale_ln_fcs = _awq_scale.scale_ln_fcs


def offset_norm_types(model: Any, family: Architecture) -> tuple[type[nn.Module], ...]:
    """The classes of ``model``'s norms that compute ``x_hat * (1 + w)`` (``w`` stored zero-centred): those of
    the modules whose weight the family's row stores as ``w + 1`` (:meth:`Architecture.offset_norms`)."""
    modules = dict(model.named_modules())
    n_blocks = int(model.config.get_text_config().num_hidden_layers)
    return tuple(dict.fromkeys(type(modules[name]) for name in family.offset_norms(modules, n_blocks)))


@torch.no_grad()
def scale_offset_norm_fcs(ln: Any, fcs: list[nn.Linear], scales: torch.Tensor) -> None:
    """AutoAWQ's ``scale_ln_fcs`` (fold ``1/s`` into a norm, ``s`` into the linears it feeds) for a norm whose gain is ``1 + w``.

    Folding ``1/s`` must give ``(1 + w') = (1 + w) / s``.  AutoAWQ 0.2.9 does that only for
    ``GemmaRMSNorm`` and ``Gemma2RMSNorm`` (adding and subtracting 1 in the weight's own dtype) and
    otherwise divides ``w`` itself.  ``apply_scale`` sends anything whose class name contains
    "rmsnorm" there, so a ``Gemma3RMSNorm`` would get ``w / s``, i.e. a gain of ``1 + w / s``
    instead of ``(1 + w) / s``, while the linears are still multiplied by ``s``, which silently
    changes the block by a factor of about ``s`` per channel.  Here the fold is done in float32.
    """
    w = cast(torch.Tensor, ln.weight)  # the norm's classes type their parameters loosely
    s = scales.to(w.device, torch.float32)
    w.copy_((1 + w.float()) / s - 1)
    for fc in fcs:
        fc.weight.mul_(s.view(1, -1).to(fc.weight.dtype))
    for p in (w, *(fc.weight for fc in fcs)):
        if not torch.isfinite(p).all():
            raise FloatingPointError(f"folding AWQ scales into {type(ln).__name__} gave non-finite weights")


@contextlib.contextmanager
def offset_norms_folded(model: Any, family: Architecture) -> Iterator[None]:
    """For the duration, AutoAWQ's ``awq.quantize.scale.scale_ln_fcs`` (which ``apply_scale`` folds into
    norms with) is replaced: norms of :func:`offset_norm_types` go to :func:`scale_offset_norm_fcs`,
    every other norm to AutoAWQ's own function.  Restored afterwards, whatever happens."""
    offset = offset_norm_types(model, family)

    def scale_ln_fcs(ln: Any, fcs: list[nn.Linear], scales: torch.Tensor) -> None:
        (scale_offset_norm_fcs if isinstance(ln, offset) else _stock_scale_ln_fcs)(ln, fcs, scales)

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


def round_to_nearest_block(block: nn.Module, w_bit: int, group_size: int, zero_point: bool, version: str,
                           skip: list[str] | None = None) -> None:
    """Quantize one block's linears with AutoAWQ's own final step and no search: the RTN baseline.

    ``AwqQuantizer._apply_quant`` is what AWQ itself ends with (float16 min-max fake-quantization
    per group, then ``WQLinear_GEMM.from_linear`` packing), so the baseline differs from AWQ only
    by the absent scale and clip search.  The quantizer's ``__init__`` would run a calibration
    pass, which RTN has no use for, so the instance is made without it and given the four
    settings ``_apply_quant`` and ``pseudo_quantize_tensor`` read.
    """
    q = object.__new__(CopyingAwqQuantizer)
    q.w_bit, q.group_size, q.zero_point, q.version = w_bit, group_size, zero_point, version.lower()
    q._apply_quant(block, exclude_layers_to_not_quantize(get_named_linears(block), skip))


def round_to_nearest(awq_model: BaseAWQForCausalLM, w_bit: int, group_size: int, zero_point: bool, version: str) -> None:
    """:func:`round_to_nearest_block` on every block of a whole model."""
    for block in awq_model.get_model_layers(awq_model.model):
        round_to_nearest_block(block, w_bit, group_size, zero_point, version, awq_model.quant_config.modules_to_not_convert)
