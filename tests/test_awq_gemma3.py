"""AWQ for Gemma 3: our AutoAWQ layer map, the norm folding and per-block arguments it needs, end to end.

The model is a tiny random ``Gemma3ForCausalLM`` built here: 2 blocks in Gemma 3's alternation
(sliding-window attention with a 32-token window, then full attention), hidden size 256, 4 heads
of 64, the demo's byte-level BPE tokenizer (8192 tokens), tied embeddings.  Its norm weights are
drawn at random (a trained Gemma's are far from zero, and a zero weight would hide a wrong
``(1 + w)`` fold), and, as in the demo, 6 channels of each norm that feeds projections have their
gain multiplied by 32 and the matching weight columns divided by 32, so that AWQ has activation
outliers to find.  Calibration windows (64 tokens) are longer than the sliding window, so the two
kinds of block see different masks as well as different rotary embeddings.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeTemp

from quantize.architectures import GEMMA3
from quantize.awq import (
    AwqSettings,
    calibration_samples,
    load_awq_as_float,
    quantize_awq,
    quantize_rtn,
)
from quantize.models.demo import Demo

torch = pytest.importorskip("torch")
compat = pytest.importorskip("quantize.engine.autoawq_compat", reason="AutoAWQ is not installed: pip install --no-deps autoawq==0.2.9")
from awq.quantize.scale import apply_scale  # noqa: E402
from awq.utils.module import get_op_name  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm  # noqa: E402

from quantize.engine.awq_models import Gemma3AWQForCausalLM, v_to_o_is_exact, wrap_model  # noqa: E402

CALIB = AwqSettings(samples=8, seq_len=64)  # ~15 s of AWQ for the two blocks on 2 cores
HIDDEN, HEAD_DIM, WINDOW, VOCAB = 256, 64, 32, 8192
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


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
    offset = compat.offset_norm_types(model, GEMMA3)
    assert offset == (Gemma3RMSNorm,)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, offset):
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
    for fold, ctx in (("ours", compat.offset_norms_folded(model, GEMMA3)), ("autoawq", contextlib.nullcontext())):
        block = copy.deepcopy(model.model.layers[0])
        with ctx, compat.pinned_to_cpu(), torch.no_grad():
            apply_scale(block, [group])
            errors[fold] = rel_err(block(call.x, **call.kwargs), call.y)
    print(f"\nblock output relative change after folding scales: {errors}")
    assert errors["ours"] < 1e-5
    assert errors["autoawq"] > 0.05
    assert compat._awq_scale.scale_ln_fcs is compat._stock_scale_ln_fcs  # the patch is gone once the block is left


@pytest.mark.parametrize(("heads", "kv_heads", "v_to_o"), [
    (4, 4, True),  # one KV head per query head, heads x head_dim == hidden
    (8, 8, True),  # heads x head_dim = 512 != hidden: exact, though AutoAWQ's shape test would skip it
    (4, 1, False),  # grouped-query attention, as in every released Gemma 3 (270M: 4 query heads, 1 KV head)
])
def test_every_scaling_group_of_the_gemma3_map_keeps_the_block(heads: int, kv_heads: int, v_to_o: bool) -> None:
    """Each group the map returns, folded with random scales in [1/8, 8], leaves its block's output unchanged.

    That is what makes a group legal: the previous operation's output must reach exactly those
    linears, channel for channel.  Checked on both blocks (sliding window and full attention),
    with q_norm/k_norm and rotary embeddings in the path.
    """
    model = random_gemma3(gemma3_config(heads, kv_heads))
    calls = block_calls(model, torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1)))
    expected = [("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                *([("self_attn.v_proj", ("self_attn.o_proj",))] if v_to_o else []),
                ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                ("mlp.up_proj", ("mlp.down_proj",))]
    for i, (original, call) in enumerate(zip(model.model.layers, calls, strict=True)):
        groups = Gemma3AWQForCausalLM.get_layers_for_scaling(original, defaultdict(lambda: None), {})
        names = [(get_op_name(original, g["prev_op"]), tuple(get_op_name(original, m) for m in g["layers"])) for g in groups]
        assert names == expected
        assert v_to_o_is_exact(original.self_attn) is v_to_o
        for j, (prev, layers) in enumerate(names):
            block = copy.deepcopy(original)
            width = block.get_submodule(layers[0]).in_features
            with compat.offset_norms_folded(model, GEMMA3), compat.pinned_to_cpu(), torch.no_grad():
                apply_scale(block, [(prev, layers, log_uniform_scales(width, seed=10 * i + j))])
                assert rel_err(block(call.x, **call.kwargs), call.y) < 1e-5, (i, prev)


# --- per-block arguments ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gemma3(demo: Demo, module_mktemp: MakeTemp) -> Path:
    """The tiny model as a float16 checkpoint folder with the demo's BPE tokenizer."""
    out = module_mktemp("gemma3") / "tiny-gemma3"
    out.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy2(demo.bpe / name, out / name)
    tok = AutoTokenizer.from_pretrained(out)
    random_gemma3(gemma3_config(tok=tok)).half().save_pretrained(out)
    return out


def test_each_block_is_calibrated_with_its_own_mask_and_rotary_embedding(demo: Demo, tiny_gemma3: Path) -> None:
    """AutoAWQ runs every block with block 0's arguments; Gemma 3's full-attention block needs its own.

    Block 0 slides (rotary base 10k, 32-token window), block 1 attends fully (base 1M, causal
    mask).  Run as the quantizer runs it, on the inputs the quantizer caught, each block must
    produce what it produces inside the model.  AutoAWQ's stock arguments get block 0 right and
    block 1 wrong; :class:`BlockKwargsAwqQuantizer` gets both right, for the whole block and for
    the attention module its scale search inspects.
    """
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gemma3)
    samples, _ = calibration_samples(tok, demo.text["calib"], 2, 64)
    calls = block_calls(model, torch.tensor(samples))
    errors = {}
    for cls in (compat.CopyingAwqQuantizer, compat.BlockKwargsAwqQuantizer):
        with compat.pinned_to_cpu(), torch.no_grad():
            q = cls(wrap_model(model, "gemma3_text"), model, tok, 4, 128, True, "gemm", samples, "train", "text", True,
                    max_calib_samples=2, max_calib_seq_len=64)
            assert torch.equal(q.inps, calls[0].x)
            errors[cls.__name__] = [rel_err(block(c.x, **q._sanitize_kwargs(q.module_kwargs, block)), c.y)
                                    for block, c in zip(q.modules, calls, strict=True)]
    print(f"\nblock outputs as calibrated vs in the model: {errors}")
    stock, fixed = errors["CopyingAwqQuantizer"], errors["BlockKwargsAwqQuantizer"]
    assert stock[0] < 1e-6 and stock[1] > 1e-2
    assert max(fixed) < 1e-6
    for block, c in zip(q.modules, calls, strict=True):  # the scale search's attention module gets its block's arguments too
        attn_kwargs = q._sanitize_kwargs(q.module_kwargs, block.self_attn)
        assert all(torch.equal(a, b) for a, b in zip(attn_kwargs["position_embeddings"], c.kwargs["position_embeddings"], strict=True))


# --- the whole stage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    awq: Path
    rtn: Path


@pytest.fixture(scope="module")
def built(demo: Demo, tiny_gemma3: Path, module_mktemp: MakeTemp) -> Built:
    root = module_mktemp("gemma3-awq")
    awq = quantize_awq(tiny_gemma3, root / "awq", demo.text["calib"], CALIB)
    print(f"\nGemma 3 AWQ: {json.loads((awq / 'provenance.json').read_text())['seconds']}")
    return Built(awq, quantize_rtn(tiny_gemma3, root / "rtn", CALIB))


def kld_top1(model: Any, ref: Any, windows: Any) -> tuple[float, float]:
    """Mean KL(ref || model) per position and top-1 agreement with ``ref``."""
    with torch.no_grad():
        lr, lq = ref(input_ids=windows).logits.log_softmax(-1), model(input_ids=windows).logits.log_softmax(-1)
    return float((lr.exp() * (lr - lq)).sum(-1).mean()), float((lq.argmax(-1) == lr.argmax(-1)).float().mean())


def test_awq_of_gemma3_reloads_close_to_float_and_beats_round_to_nearest(demo: Demo, tiny_gemma3: Path, built: Built) -> None:
    names = set(json.loads((built.awq / "model.safetensors.index.json").read_text())["weight_map"])
    assert sum(n.endswith(".qweight") for n in names) == 2 * 7 and "lm_head.weight" not in names
    assert "model.layers.1.self_attn.q_norm.weight" in names and "model.layers.0.pre_feedforward_layernorm.weight" in names
    prov = json.loads((built.awq / "provenance.json").read_text())
    assert len(prov["autoawq_fixes"]) == 3 and prov["calibration_dtype"] == "float32"

    ref = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_gemma3)
    models = {kind: load_awq_as_float(getattr(built, kind)) for kind in ("awq", "rtn")}
    assert type(models["awq"]).__name__ == "Gemma3ForCausalLM"
    assert models["awq"].lm_head.weight.data_ptr() == models["awq"].model.embed_tokens.weight.data_ptr()
    scores = {}
    for text in ("calib", "eval"):  # the calibration text (what AWQ minimised its error on) and held-out text
        windows = torch.tensor(calibration_samples(tok, demo.text[text], 8, 128)[0])
        scores[text] = {kind: kld_top1(m, ref, windows) for kind, m in models.items()}
    print(f"\nGemma 3 mean KLD / top-1 vs float16: {scores}")
    (awq_kld, awq_top1), (rtn_kld, _) = scores["calib"]["awq"], scores["calib"]["rtn"]
    assert awq_kld < 0.6 * rtn_kld  # measured 0.36x
    assert awq_kld < 0.005 and awq_top1 > 0.9
    assert scores["eval"]["awq"][0] < scores["eval"]["rtn"][0]
