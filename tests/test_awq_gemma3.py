"""AWQ for Gemma 3: folding scales into its ``(1 + w)`` norms.

The model is a tiny random ``Gemma3ForCausalLM`` built here: 2 blocks in Gemma 3's alternation
(sliding-window attention with a 32-token window, then full attention), hidden size 256, 4 heads
of 64, tied embeddings.  Its norm weights are drawn at random (a trained Gemma's are far from
zero, and a zero weight would hide a wrong ``(1 + w)`` fold), and, as in the demo, 6 channels of
each norm that feeds projections have their gain multiplied by 32 and the matching weight
columns divided by 32, so that AWQ has activation outliers to find.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")
compat = pytest.importorskip("quantize.autoawq_compat", reason="AutoAWQ is not installed: pip install --no-deps autoawq==0.2.9")
from awq.quantize.scale import apply_scale  # noqa: E402
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

HIDDEN, HEAD_DIM, WINDOW, VOCAB = 256, 64, 32, 8192


def gemma3_config(heads: int = 4, kv_heads: int = 4, tok: Any = None) -> Gemma3TextConfig:
    ids = {} if tok is None else {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
        initializer_range=0.1,  # logits of a few units: peaked distributions, so KL divergences mean something
        use_cache=False, **ids,
    )


def random_gemma3(config: Gemma3TextConfig, seed: int = 0) -> Gemma3ForCausalLM:
    """A random Gemma 3 with random norm weights and activation outliers (see the module docstring)."""
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, compat.OFFSET_NORMS):
                module.weight.normal_(0.0, 0.3, generator=gen)
        for block in model.model.layers:
            a, f = block.self_attn, block.mlp
            for norm, readers in ((block.input_layernorm, (a.q_proj, a.k_proj, a.v_proj)),
                                  (block.pre_feedforward_layernorm, (f.gate_proj, f.up_proj))):
                ch = torch.randperm(HIDDEN, generator=gen)[:6]
                norm.weight[ch] = (1 + norm.weight[ch]) * 32 - 1  # gain (1 + w) times 32
                for fc in readers:
                    fc.weight[:, ch] /= 32
    return model


@dataclass(frozen=True)
class BlockCall:
    x: Any  # hidden states in
    kwargs: dict[str, Any]  # what the model passed besides them: mask, rotary (cos, sin), positions
    y: Any  # hidden states out


def block_calls(model: Any, ids: Any) -> list[BlockCall]:
    """Every block's inputs, keyword arguments and output as the model itself runs it on ``ids``."""
    calls: list[BlockCall] = []
    hooks = [b.register_forward_hook(lambda m, args, kwargs, out: calls.append(BlockCall(args[0], kwargs, out)), with_kwargs=True)
             for b in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return calls


def rel_err(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm())


def log_uniform_scales(n: int, seed: int, spread: float = 8.0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    return spread ** (2 * torch.rand(n, generator=gen) - 1)  # in [1/spread, spread]


# --- folding scales into Gemma 3's (1 + w) norms ---------------------------------------------


def test_folding_into_gemma3_norm_keeps_the_block_and_autoawqs_own_fold_does_not() -> None:
    """Regression test: ``input_layernorm`` -> q/k/v scaled by AutoAWQ's ``apply_scale``, block 0 compared before and after.

    AutoAWQ 0.2.9 recognises Gemma's and Gemma 2's norms, not ``Gemma3RMSNorm``, which its
    "rmsnorm in the class name" fallback sends to the plain ``w / s`` fold: the gain becomes
    ``1 + w/s`` instead of ``(1 + w)/s``.  With :func:`offset_norms_folded` the block computes the
    same function to float32 rounding; without it, it does not.
    """
    model = random_gemma3(gemma3_config())
    call = block_calls(model, torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1)))[0]
    group = ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), log_uniform_scales(HIDDEN, seed=2))
    errors = {}
    for fold, ctx in (("ours", compat.offset_norms_folded), ("autoawq", contextlib.nullcontext)):
        block = copy.deepcopy(model.model.layers[0])
        with ctx(), compat.pinned_to_cpu(), torch.no_grad():
            apply_scale(block, [group])
            errors[fold] = rel_err(block(call.x, **call.kwargs), call.y)
    print(f"\nblock output relative change after folding scales: {errors}")
    assert errors["ours"] < 1e-5
    assert errors["autoawq"] > 0.05
    assert compat._awq_scale.scale_ln_fcs is compat._stock_scale_ln_fcs  # the patch is gone once the block is left
