"""The AWQ stage on the CPU: AutoAWQ with the scale-search backup fixed, against its RTN baseline.

The demo's mistral-spm carries activation outliers (norm channels x32, matching weight columns
/32), which is what makes plain 4-bit round-to-nearest lose accuracy and what AWQ's per-channel
scales exist for.  Quality is measured on held-out text the calibration never saw.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeTemp, copy_checkpoint

from quantize.atomic import TMP_PREFIX, sha256_file
from quantize.awq import (
    AwqSettings,
    calibration_samples,
    load_awq_as_float,
    quantize_awq,
    quantize_rtn,
)
from quantize.cli import main
from quantize.errors import QuantizeError
from quantize.models.demo import Demo

torch = pytest.importorskip("torch")
# imports AutoAWQ quietly (it warns that it is archived); skipped only where it is not installed
pytest.importorskip("quantize.engine.autoawq_compat", reason="AutoAWQ is not installed: pip install --no-deps autoawq==0.2.9 datasets")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# Small enough for ~1 minute of AutoAWQ on 2 cores; its clip search caps at 512 tokens anyway.
FAST = AwqSettings(samples=8, seq_len=128)
EVAL_CTX, EVAL_WINDOWS = 256, 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja", "generation_config.json")


@dataclass(frozen=True)
class Built:
    awq: Path
    rtn: Path


@dataclass(frozen=True)
class Score:
    ppl: float
    kld: float  # mean KL(P_fp16 || P_model) per token, nats
    top1: float  # share of positions whose most likely token matches fp16's


@pytest.fixture(scope="module")
def built(demo: Demo, module_mktemp: MakeTemp) -> Built:
    root = module_mktemp("awq")
    awq = quantize_awq(demo.spm, root / "mistral-spm-awq", demo.text["calib"], FAST)
    rtn = quantize_rtn(demo.spm, root / "mistral-spm-rtn", FAST)
    print(f"\nAWQ calibration: {json.loads((awq / 'provenance.json').read_text())['seconds']}")
    return Built(awq, rtn)


def fp16_reference(path: Path) -> Any:
    """The float16 checkpoint computed in float32 (its weights are exact there)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def token_windows(model_dir: Path, text: Path, ctx: int = EVAL_CTX, n: int = EVAL_WINDOWS) -> Any:
    """The first ``n`` non-overlapping windows of BOS + ``text`` through the model's tokenizer."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok.bos_token_id, *tok(text.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]]
    assert len(ids) >= ctx * n
    return torch.tensor(ids[: ctx * n]).view(n, ctx)


def compare(models: dict[str, Any], ref: Any, windows: Any) -> dict[str, Score]:
    """Perplexity, mean KL divergence from ``ref`` and top-1 agreement, window by window (bounded memory)."""
    nll = {k: 0.0 for k in models}
    kld = {k: 0.0 for k in models}
    top1 = {k: 0 for k in models}
    with torch.no_grad():
        for x in windows:
            lr = ref(input_ids=x[None]).logits[0].float().log_softmax(-1)
            for name, m in models.items():
                lq = m(input_ids=x[None]).logits[0].float().log_softmax(-1)
                nll[name] -= float(lq[:-1].gather(-1, x[1:, None]).sum())
                kld[name] += float((lr.exp() * (lr - lq)).sum())
                top1[name] += int((lq.argmax(-1) == lr.argmax(-1)).sum())
    n_pred, n_pos = windows.shape[0] * (windows.shape[1] - 1), windows.numel()
    return {k: Score(math.exp(nll[k] / n_pred), kld[k] / n_pos, top1[k] / n_pos) for k in models}


@pytest.fixture(scope="module")
def scores(demo: Demo, built: Built) -> dict[str, Score]:
    ref = fp16_reference(demo.spm)
    models = {"fp16": ref, "awq": load_awq_as_float(built.awq), "rtn": load_awq_as_float(built.rtn)}
    out = compare(models, ref, token_windows(demo.spm, demo.text["eval"]))
    for name, s in out.items():
        print(f"{name:4s}: ppl {s.ppl:.3f} ({(s.ppl / out['fp16'].ppl - 1) * 100:+.2f} %), mean KLD {s.kld:.6f}, top-1 {s.top1:.3f}")
    return out


# --- the folder ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["awq", "rtn"])
def test_folder_has_weights_config_tokenizer_and_provenance(demo: Demo, built: Built, kind: str) -> None:

    out = getattr(built, kind)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None}
    assert cfg["dtype"] == cfg["torch_dtype"] == "float16"  # calibrated in float32, stored in float16
    assert cfg["architectures"] == ["MistralForCausalLM"]
    for name in TOKENIZER_FILES:
        assert sha256_file(out / name) == sha256_file(demo.spm / name), name

    dtypes = {k: d for k, (d, _) in layout(out).items()}
    assert dtypes["model.layers.0.self_attn.q_proj.qweight"] == dtypes["model.layers.0.mlp.down_proj.qzeros"] == "I32"
    assert "model.layers.0.self_attn.q_proj.weight" not in dtypes
    assert {d for k, d in dtypes.items() if not k.endswith(("qweight", "qzeros"))} == {"F16"}
    assert sum(k.endswith(".qweight") for k in dtypes) == 4 * 7  # every linear of every block

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["method"] == kind
    assert prov["source"]["sha256"]["model.safetensors"] == sha256_file(demo.spm / "model.safetensors")
    assert prov["source"]["sha256"]["tokenizer.model"] == sha256_file(demo.spm / "tokenizer.model")
    assert prov["versions"]["autoawq"] == "0.2.9" and prov["versions"]["torch"] and prov["versions"]["transformers"]
    assert prov["settings"]["group_size"] == 128 and prov["device"] == "cpu" and prov["calibration_dtype"] == "float32"
    if kind == "awq":
        assert prov["calibration"]["sha256"] == sha256_file(demo.text["calib"])
        assert prov["calibration"]["samples"] == FAST.samples and prov["calibration"]["seq_len"] == FAST.seq_len
    assert not list(out.parent.glob(TMP_PREFIX + "*"))


def layout(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of a sharded folder (through its index): dtype and shape."""
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(folder / shard, "pt") as f:
            out |= {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert set(out) == set(index)
    return out


def folder_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for shard in folder.glob("*.safetensors"):
        out |= load_file(str(shard))
    return out


def test_rtn_and_awq_folders_have_the_same_layout(built: Built) -> None:
    assert layout(built.awq) == layout(built.rtn)
    assert sorted(p.name for p in built.awq.iterdir()) == sorted(p.name for p in built.rtn.iterdir())


def test_streamed_awq_equals_autoawqs_whole_model_run(demo: Demo, built: Built) -> None:
    """Block by block from disk (only one block resident), AutoAWQ's own steps give the folder its
    whole-model run gives: every packed word, zero and scale, and every other tensor, bit for bit."""
    from quantize.architectures import ARCHITECTURES
    from quantize.awq import _calibration
    from quantize.engine import autoawq_compat as compat
    from quantize.engine.awq_models import wrap_model

    tok, samples, _ = _calibration(demo.spm, demo.text["calib"], FAST)
    model = fp16_reference(demo.spm)
    model.config.use_cache = False
    with compat.offset_norms_folded(model, ARCHITECTURES["MistralForCausalLM"]), compat.pinned_to_cpu():
        wrap_model(model, "mistral").quantize(tok, FAST.quant_config(), calib_data=samples, max_calib_samples=FAST.samples,
                                              max_calib_seq_len=FAST.seq_len, quantizer_cls=compat.BlockKwargsAwqQuantizer)
    whole = model.state_dict()
    streamed = folder_tensors(built.awq)
    assert len(list(built.awq.glob("*.safetensors"))) == 5  # one shard per block, one for the rest
    differing = [k for k, v in streamed.items() if not torch.equal(whole[k].to(v.dtype), v)]
    print(f"\n{len(streamed)} tensors, {len(differing)} differ")
    assert not differing and set(streamed) == {k for k in whole if k != "lm_head.weight" or not model.config.tie_word_embeddings}


# --- quality -------------------------------------------------------------------------------


def test_reloaded_awq_logits_are_close_to_fp16(demo: Demo, built: Built) -> None:
    ref = fp16_reference(demo.spm)
    model = load_awq_as_float(built.awq)
    assert type(model).__name__ == "MistralForCausalLM" and next(model.parameters()).dtype == torch.float32
    x = token_windows(demo.spm, demo.text["eval"], n=1)
    with torch.no_grad():
        lr, lq = ref(input_ids=x).logits[0], model(input_ids=x).logits[0]
    rel = float((lq - lr).norm() / lr.norm())
    agree = float((lq.argmax(-1) == lr.argmax(-1)).float().mean())
    print(f"\nAWQ logits vs fp16: relative error {rel:.4f}, top-1 agreement {agree:.3f}")
    assert rel < 0.05 and agree > 0.95


def test_awq_beats_round_to_nearest_on_held_out_text(scores: dict[str, Score]) -> None:
    """AWQ stays closer to the fp16 model than RTN: in KL divergence and in perplexity.

    Perplexity is compared as the distance to fp16's.  On this small, under-trained demo model
    RTN's weight noise *lowers* perplexity slightly (-0.3 % on these windows, -0.5 % on the whole
    held-out text, also with an independent float32 RTN), while its KL divergence, the measure of
    how far the distribution moved, is ten times AWQ's: a lower perplexity than the model being
    reproduced is drift, not quality, so "AWQ's perplexity below RTN's" would reward the drift.
    """
    fp16, awq, rtn = scores["fp16"], scores["awq"], scores["rtn"]
    assert awq.kld < rtn.kld / 3
    assert abs(awq.ppl - fp16.ppl) < abs(rtn.ppl - fp16.ppl)
    assert abs(awq.ppl / fp16.ppl - 1) < 0.005
    assert awq.top1 > rtn.top1


# --- the AutoAWQ aliasing bug ----------------------------------------------------------------


def _calibrated(demo: Demo, cls: type) -> tuple[Any, Any, Any]:
    """(model, tokenizer, quantizer) with ``cls``'s constructor run on 2 x 64 calibration tokens."""
    from quantize.engine.awq_models import wrap_model

    model = fp16_reference(demo.spm)
    model.config.use_cache = False
    tok = AutoTokenizer.from_pretrained(demo.spm)
    samples, _ = calibration_samples(tok, demo.text["calib"], 2, 64)
    q = cls(wrap_model(model, "mistral"), model, tok, 4, 128, True, "gemm", samples, "train", "text", True,
            max_calib_samples=2, max_calib_seq_len=64)
    return model, tok, q


def test_unfixed_scale_search_corrupts_weights_on_cpu_and_the_fixed_one_does_not(demo: Demo) -> None:
    """AutoAWQ 0.2.9 backs the block up with ``v.cpu()``, which on the CPU is the tensor itself.

    The MLP group of block 0 (post-attention norm -> gate/up) is searched by both quantizers on
    the same activations.  A scale search must leave the weights as it found them; the unfixed
    one leaves them scaled by its first grid point, and picks its scales from corrupted
    candidates, so its choice is no better (here: worse) on the true loss than the fixed one's.
    """
    from quantize.engine.autoawq_compat import AwqQuantizer, CopyingAwqQuantizer

    w = torch.ones(4)
    assert w.cpu().data_ptr() == w.data_ptr()  # the mechanism: .cpu() of a CPU tensor is no copy

    found = {}
    for cls in (AwqQuantizer, CopyingAwqQuantizer):
        model, tok, q = _calibrated(demo, cls)
        block = model.model.layers[0]
        x, original = _input_of(block.mlp, model, token_windows(demo.spm, demo.text["calib"], ctx=64, n=2)), copy.deepcopy(block.mlp)
        before = {k: v.clone() for k, v in block.state_dict().items()}
        _, _, scales = q._search_best_scale(block, block.post_attention_layernorm, [block.mlp.gate_proj, block.mlp.up_proj], x,
                                            block.mlp)
        changed = sorted(k for k, v in block.state_dict().items() if not torch.equal(v, before[k]))
        found[cls.__name__] = (changed, _true_loss(q, original, scales, x))
    print(f"\nscale search: {found}")
    (bad_changed, bad_loss), (good_changed, good_loss) = found["AwqQuantizer"], found["CopyingAwqQuantizer"]
    assert bad_changed == ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
    assert good_changed == []
    assert good_loss <= bad_loss


def _input_of(module: Any, model: Any, ids: Any) -> Any:
    """What ``module`` receives when ``model`` runs on ``ids``."""
    seen: list[Any] = []
    hook = module.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    return seen[0]


def _true_loss(q: Any, mlp: Any, scales: Any, x: Any) -> float:
    """|| MLP with Q(W s) / s  -  MLP with W ||^2 on ``x``: the loss AWQ's search minimises (Lin et al. 2023, eq. 4)."""
    fake = copy.deepcopy(mlp)
    s = scales.view(1, -1)
    with torch.no_grad():
        for fc in (fake.gate_proj, fake.up_proj):
            fc.weight.data = q.pseudo_quantize_tensor(fc.weight.data * s)[0] / s
        return float((fake(x) - mlp(x)).pow(2).mean())


def test_cached_linear_inputs_are_separate_tensors(demo: Demo) -> None:
    """The other in-place write of AutoAWQ's search (``apply_scale``'s ``inp.div_``) hits separate tensors.

    q/k/v (and gate/up) read one activation; the hooks keep it with ``x.cpu()``, no copy on the
    CPU, but ``_get_input_feat`` then concatenates (``torch.cat`` allocates), so each is divided
    once.  Pinned here so an AutoAWQ change that drops the concatenation is caught.
    """
    from awq.utils.module import get_named_linears

    from quantize.engine.autoawq_compat import CopyingAwqQuantizer

    model, _, q = _calibrated(demo, CopyingAwqQuantizer)
    # as AwqQuantizer.quantize() does before each block (transformers >= 4.48 branch)
    q.module_kwargs["position_embeddings"] = model.model.rotary_emb(q.inps, q.module_kwargs["position_ids"])
    feats = q._get_input_feat(q.modules[0], get_named_linears(q.modules[0]))
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    assert torch.equal(feats["self_attn.q_proj"], feats["self_attn.v_proj"])
    assert len({feats[n].untyped_storage().data_ptr() for n in names}) == len(names)


def test_clip_search_chooses_as_autoawqs_own(demo: Demo) -> None:
    """The bounded clip search (one batched product per group) picks AutoAWQ 0.2.9's clipping
    thresholds: on block 0's real activations, for every linear AutoAWQ clips, the same threshold
    for all but a few (channel, group) pairs, and where they differ, a tie: the exact (float64)
    error of either choice within 1e-3 of the other's."""
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.module import get_named_linears

    from quantize.engine.autoawq_compat import CopyingAwqQuantizer

    model, _, q = _calibrated(demo, CopyingAwqQuantizer)
    q.module_kwargs["position_embeddings"] = model.model.rotary_emb(q.inps, q.module_kwargs["position_ids"])
    linears = get_named_linears(q.modules[0])
    feats = q._get_input_feat(q.modules[0], linears)
    total = same = 0
    for name in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        w, x = linears[name].weight.data, feats[name]
        ours, theirs = q._compute_best_clip(w, x), AwqQuantizer._compute_best_clip(q, w, x)
        assert ours.shape == theirs.shape == (w.shape[0], w.shape[1] // 128, 1)
        total, same = total + ours.numel(), same + int((ours == theirs).sum())

        def error(max_val: torch.Tensor, w: torch.Tensor = w, x: torch.Tensor = x) -> torch.Tensor:
            wg = w.reshape(w.shape[0], -1, 128)
            change = q.pseudo_quantize_tensor(torch.clamp(wg, -max_val, max_val))[0].double() - wg.double()
            xg = x.reshape(-1, w.shape[1] // 128, 128).double().transpose(0, 1)
            return torch.bmm(xg, change.permute(1, 2, 0)).pow(2).mean(dim=1).T  # [out, n_group]

        e_ours, e_theirs = error(ours), error(theirs)
        differ = (ours != theirs).squeeze(-1)
        assert torch.allclose(e_ours[differ], e_theirs[differ], rtol=1e-3, atol=0), name
    print(f"\n{same} of {total} (channel, group) thresholds identical")
    assert same >= 0.99 * total


def test_pinned_to_cpu_restores_device_lookups() -> None:
    import awq.quantize.quantizer as awq_quantizer

    from quantize.engine.autoawq_compat import pinned_to_cpu

    picker, cuda = awq_quantizer.get_best_device, torch.cuda.is_available
    with pinned_to_cpu():
        assert awq_quantizer.get_best_device() == "cpu" and torch.cuda.is_available() is False
    assert awq_quantizer.get_best_device is picker and torch.cuda.is_available is cuda


# --- packing -------------------------------------------------------------------------------


def unpack_gemm(qweight: Any, qzeros: Any, bits: int = 4) -> tuple[Any, Any]:
    """GEMM-packed int32 words -> (weights ``[in, out]``, zeros ``[groups, out]``) as int32 in ``0..2^bits-1``,
    with AutoAWQ's own helpers (awq/utils/packing_utils.py): ``unpack_awq`` shifts the nibbles out,
    ``reverse_awq_order`` undoes the interleaving, and the mask drops the sign bits the int8 cast carries."""
    from awq.utils.packing_utils import reverse_awq_order, unpack_awq

    iw, iz = reverse_awq_order(*unpack_awq(qweight, qzeros, bits), bits)
    mask = (1 << bits) - 1
    return iw.to(torch.int32) & mask, iz.to(torch.int32) & mask


def test_packed_weights_use_the_whole_4bit_range(built: Built) -> None:
    tensors = folder_tensors(built.awq)
    for base in ("model.layers.0.self_attn.k_proj", "model.layers.3.mlp.down_proj"):
        qweight, qzeros = tensors[f"{base}.qweight"], tensors[f"{base}.qzeros"]
        iw, iz = unpack_gemm(qweight, qzeros)
        assert iw.shape == (qweight.shape[0], qweight.shape[1] * 8) and iz.shape == (qzeros.shape[0], qzeros.shape[1] * 8)
        assert int(iw.min()) == 0 and int(iw.max()) == 15  # the whole 4-bit range is used
        assert int(iz.min()) >= 0 and int(iz.max()) <= 15


# --- bad input -----------------------------------------------------------------------------


def _refused(tmp_path: Path, call: Any, names: Path) -> QuantizeError:
    out = tmp_path / "out"
    with pytest.raises(QuantizeError) as err:
        call(out)
    assert str(names) in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(TMP_PREFIX + "*"))
    return err.value


def test_unsupported_architecture_is_refused(demo: Demo, tmp_path: Path) -> None:
    src = copy_checkpoint(demo.spm, tmp_path / "gpt2")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    err = _refused(tmp_path, lambda out: quantize_awq(src, out, demo.text["calib"], FAST), src / "config.json")
    assert "GPT2LMHeadModel" in str(err) and "LlamaForCausalLM" in str(err) and "MistralForCausalLM" in str(err)


def test_too_short_calibration_text_is_refused(demo: Demo, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be, that is the question.\n" * 20, encoding="utf-8")
    err = _refused(tmp_path, lambda out: quantize_awq(demo.spm, out, short, FAST), short)
    assert "tokens" in str(err) and "--samples" in str(err)


def test_missing_calibration_text_is_refused(demo: Demo, tmp_path: Path) -> None:
    _refused(tmp_path, lambda out: quantize_awq(demo.spm, out, tmp_path / "nope.txt", FAST), tmp_path / "nope.txt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_gpu_is_refused(demo: Demo, tmp_path: Path) -> None:
    settings = AwqSettings(samples=8, seq_len=128, device="cuda")
    err = _refused(tmp_path, lambda out: quantize_awq(demo.spm, out, demo.text["calib"], settings), demo.spm)
    assert "--device cpu" in str(err)


def test_not_enough_ram_is_refused(demo: Demo, tmp_path: Path) -> None:
    huge = AwqSettings(samples=4096, seq_len=4096, device="cpu")  # a ~2 TiB attention score matrix
    err = _refused(tmp_path, lambda out: quantize_awq(demo.spm, out, demo.text["calib"], huge), demo.spm)
    assert "GiB of RAM" in str(err)


@pytest.mark.parametrize("field,value", [("w_bit", 3), ("version", "GEMV"), ("zero_point", False), ("group_size", 96)])
def test_unsupported_settings_are_refused(demo: Demo, tmp_path: Path, field: str, value: Any) -> None:
    settings = dataclasses.replace(FAST, **{field: value})
    _refused(tmp_path, lambda out: quantize_rtn(demo.spm, out, settings), demo.spm)


def test_output_over_the_source_is_refused(demo: Demo, tmp_path: Path) -> None:
    src = copy_checkpoint(demo.spm, tmp_path / "src")
    with pytest.raises(QuantizeError, match="is the input"):
        quantize_rtn(src, src, FAST)
    assert (src / "model.safetensors").is_file()


# --- command line and the other family -----------------------------------------------------


def test_cli_handler_writes_rtn_folder(demo: Demo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["awq", str(demo.spm), "-o", str(tmp_path / "rtn"), "--method", "rtn", "--device", "cpu"]) == 0
    assert "RTN 4-bit g128" in capsys.readouterr().out
    assert json.loads((tmp_path / "rtn" / "provenance.json").read_text())["method"] == "rtn"


@pytest.mark.slow
def test_awq_of_llama_with_tied_embeddings(demo: Demo, tmp_path: Path) -> None:
    """The other allowed family, with a tied lm_head that must stay implicit on disk and tied on reload."""
    out = quantize_awq(demo.bpe, tmp_path / "llama-bpe-awq", demo.text["calib"], FAST)
    assert "lm_head.weight" not in layout(out)
    model = load_awq_as_float(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = fp16_reference(demo.bpe)
    s = compare({"awq": model}, ref, token_windows(demo.bpe, demo.text["eval"], n=4))["awq"]
    print(f"\nllama-bpe AWQ: ppl {s.ppl:.3f}, mean KLD {s.kld:.6f}, top-1 {s.top1:.3f}")
    assert s.kld < 0.01 and s.top1 > 0.9
