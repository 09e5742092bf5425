"""The embedded demo: two small but real checkpoints the project trains itself, offline.

* ``mistral-spm``: a ``MistralForCausalLM`` (grouped-query attention, untied embeddings) with the
  real Mistral-7B v0.1 SentencePiece tokenizer shipped by ``mistral-common``, plus ChatML's
  ``<|im_start|>``/``<|im_end|>`` (32002 embedding rows) and a ChatML chat template, the way
  Dolphin-2.2.1-mistral-7b is set up.
* ``llama-bpe``: a ``LlamaForCausalLM`` with tied embeddings and a byte-level BPE trained here on
  the same text with Llama 3's pre-tokenizer regex.

Both are trained from a fixed seed on the CPU for a few minutes on Shakespeare (see
:mod:`quantize.models.corpus`), then given *activation outliers* by an exact reparametrisation (see
:func:`add_activation_outliers`), and saved as float16 safetensors with every tokenizer file
transformers writes.  Each build is cached under ``artifacts/demo/<hash of the recipe>``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import shutil
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from quantize.architectures import lookup
from quantize.atomic import atomic_dir, atomic_file, file_lock
from quantize.formats.vocab import LLAMA3_REGEX
from quantize.models.corpus import TextSplit, package_dir, write_splits

if TYPE_CHECKING:
    import torch

# torch and transformers are imported inside the functions that train the demo: a cached demo needs neither.

log = logging.getLogger(__name__)

DEMO_FORMAT = 3  # bump when the build code changes what it produces
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    tokenizer: str  # "mistral-spm" (shipped SentencePiece) or "bpe" (trained by the demo)
    hf_class: str
    vocab_size: int  # embedding rows
    hidden_size: int = 256  # multiples of 256 so every matrix row takes K-quants
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False
    seed: int = 1234
    steps: int = 300
    batch: int = 8
    seq_len: int = 128
    lr: float = 2e-3
    # Outliers: channels per RMSNorm and the power-of-two factor (exact in floating point).
    outlier_channels: int = 6
    outlier_factor: float = 32.0


@dataclass(frozen=True)
class DemoRecipe:
    split: TextSplit = field(default_factory=TextSplit)
    models: tuple[ModelRecipe, ...] = (
        ModelRecipe("mistral-spm", "mistral-spm", "MistralForCausalLM", vocab_size=32002),
        ModelRecipe("llama-bpe", "bpe", "LlamaForCausalLM", vocab_size=8192, tie_word_embeddings=True),
    )

    def key(self) -> str:
        blob = json.dumps({"format": DEMO_FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Demo:
    root: Path
    models: dict[str, Path]
    text: dict[str, Path]  # train / calib / eval

    @property
    def spm(self) -> Path:
        return self.models["mistral-spm"]

    @property
    def bpe(self) -> Path:
        return self.models["llama-bpe"]


def default_root() -> Path:
    return Path.cwd() / "artifacts" / "demo"


def build_demo(root: Path | None = None, recipe: DemoRecipe | None = None, models: Collection[str] | None = None) -> Demo:
    """Build (or reuse from cache) the demo's text splits and the checkpoints named in ``models``
    (every one by default).  Each part is written atomically on its own, so a recipe that names one
    model trains that one only, and a part once written is reused by every later call."""
    recipe = recipe or DemoRecipe()
    root = (root or default_root()) / recipe.key()
    demo = Demo(root, {m.name: root / m.name for m in recipe.models},
                {k: root / "text" / f"{k}.txt" for k in ("train", "calib", "eval")})
    wanted = [m for m in recipe.models if models is None or m.name in models]
    if (root / "text").is_dir() and all((root / m.name).is_dir() for m in wanted):
        log.info("demo parts cached at %s", root)
        return demo
    with file_lock(root / ".lock", f"another process is building the demo models in {root}"):
        if not (root / "text").is_dir():
            with atomic_dir(root / "text") as tmp:
                write_splits(recipe.split, tmp)
        for m in wanted:
            if (root / m.name).is_dir():
                continue
            with atomic_dir(root / m.name) as tmp:
                report = _build_model(m, demo.text, tmp)
            (root / "reports").mkdir(exist_ok=True)
            with atomic_file(root / "reports" / f"{m.name}.json") as f:
                f.write_text(json.dumps({"recipe": asdict(m), **report}, indent=2))
    return demo


# --- tokenizers --------------------------------------------------------------------------


def mistral_tokenizer_model() -> Path:
    return package_dir("mistral_common") / "data" / "tokenizer.model.v1"


def _spm_tokenizer(out: Path) -> Any:
    from transformers import LlamaTokenizer

    src = out / "tokenizer.model"
    shutil.copyfile(mistral_tokenizer_model(), src)
    tok = LlamaTokenizer.from_pretrained(str(out), add_bos_token=True, add_eos_token=False, legacy=True)
    tok.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
    tok.eos_token = "<|im_end|>"  # a ChatML model ends its turn there (Dolphin's configuration)
    return tok


def _bpe_tokenizer(train_text: Path, vocab_size: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", *CHATML_TOKENS]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    lines = train_text.read_text(encoding="utf-8").splitlines(keepends=True)
    tk.train_from_iterator(lines, trainer)
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|im_end|>", pad_token="<|end_of_text|>",
        additional_special_tokens=list(CHATML_TOKENS),
    )


# --- the model ---------------------------------------------------------------------------


def _hf_config(m: ModelRecipe, tok: Any) -> Any:
    import transformers

    cls = getattr(transformers, m.hf_class.replace("ForCausalLM", "Config"))
    # The demo models attend over their whole context: a config class whose default is a sliding
    # window (MistralConfig's 4096 tokens) is given none; the others have no such setting.
    kw: dict[str, Any] = {"sliding_window": None} if "sliding_window" in inspect.signature(cls).parameters else {}
    return cls(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=m.tie_word_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=None, **kw,
    )


def _encode(tok: Any, text: str) -> list[int]:
    ids: list[int] = []
    for doc in text.split("\n\n\n"):  # keep tokenizer calls short
        ids.extend(tok(doc, add_special_tokens=False)["input_ids"])
    return ids


def _token_stream(tok: Any, path: Path) -> torch.Tensor:
    import torch

    return torch.tensor([tok.bos_token_id, *_encode(tok, path.read_text(encoding="utf-8"))], dtype=torch.long)


def _train(model: torch.nn.Module, data: torch.Tensor, m: ModelRecipe) -> list[float]:
    import torch

    gen = torch.Generator().manual_seed(m.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=m.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, m.steps // 15)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10 %
        if step < warmup:
            return m.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, m.steps - warmup)
        return m.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))

    losses = []
    model.train()
    for step in range(m.steps):
        starts = torch.randint(0, len(data) - m.seq_len - 1, (m.batch,), generator=gen)
        x = torch.stack([data[s : s + m.seq_len] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 50 == 0:
            log.info("%s step %d/%d loss %.3f", m.name, step, m.steps, losses[-1])
    model.eval()
    return losses


def heldout_perplexity(model: torch.nn.Module, data: torch.Tensor, ctx: int = 256, windows: int = 24) -> float:
    """Perplexity of ``model`` on the first ``windows`` non-overlapping windows of ``data``."""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(min(windows, (len(data) - 1) // ctx)):
            x = data[i * ctx : (i + 1) * ctx].unsqueeze(0)
            out = model(input_ids=x, labels=x)
            nll += float(out.loss) * (ctx - 1)
            n += ctx - 1
    return math.exp(nll / n)


def add_activation_outliers(model: Any, channels: int, factor: float, seed: int) -> dict[str, list[int]]:
    """Give the model the massive activation channels real LLMs have, without changing its function.

    For each RMSNorm, multiply ``channels`` of its weights by ``factor`` (a power of two, so the
    product is exact) and divide the matching *input columns* of every projection that reads that
    norm's output by the same factor.  ``(g * f) * x`` then meets ``W / f`` in a matrix product,
    so the outputs are unchanged, but activations now carry channels ``factor`` times larger,
    and those weight columns become tiny inside their quantization blocks: exactly what makes
    real LLMs hard to quantize and what AWQ and importance matrices exist for (Dettmers et al.,
    LLM.int8(), 2022; Lin et al., AWQ, 2023).  The final norm is left alone when the embeddings
    are tied, since the output matrix is then also the input embedding.
    """
    import torch

    assert math.log2(factor).is_integer(), "factor must be a power of two to keep the reparametrisation exact"
    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    chosen: dict[str, list[int]] = {}

    def scale(norm: torch.nn.Parameter, readers: list[torch.nn.Parameter], name: str) -> None:
        ch = torch.randperm(hidden, generator=gen)[:channels].sort().values
        with torch.no_grad():
            norm[ch] *= factor
            for w in readers:
                w[:, ch] /= factor
        chosen[name] = ch.tolist()

    groups = [g for g in lookup(type(model).__name__, "config.json").scale_groups if g.prev.endswith("norm")]
    block = [g for g in groups if "{bid}" in g.prev]
    top = [] if model.config.tie_word_embeddings else [g for g in groups if "{bid}" not in g.prev]
    for g, bid in [(g, i) for i in range(model.config.num_hidden_layers) for g in block] + [(g, 0) for g in top]:
        prev = g.prev.format(bid=bid)
        scale(model.get_submodule(prev).weight, [model.get_submodule(r.format(bid=bid)).weight for r in g.readers],
              prev.removeprefix("model."))
    return chosen


def _build_model(m: ModelRecipe, text: dict[str, Path], out: Path) -> dict[str, Any]:
    import torch
    import transformers

    t0 = time.time()
    torch.manual_seed(m.seed)
    tok = _spm_tokenizer(out) if m.tokenizer == "mistral-spm" else _bpe_tokenizer(text["train"], m.vocab_size)
    tok.chat_template = CHATML_TEMPLATE
    if len(tok) > m.vocab_size:
        raise RuntimeError(f"{m.name}: tokenizer has {len(tok)} tokens for {m.vocab_size} rows")
    config = _hf_config(m, tok)
    model = getattr(transformers, m.hf_class)(config)
    train, held = _token_stream(tok, text["train"]), _token_stream(tok, text["eval"])
    losses = _train(model, train, m)
    model = model.half().float()  # evaluate what will be saved: float16 weights
    ppl_trained = heldout_perplexity(model, held)
    outliers = add_activation_outliers(model, m.outlier_channels, m.outlier_factor, m.seed)
    ppl_outliers = heldout_perplexity(model, held)
    model.half().save_pretrained(out)
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    with torch.no_grad():
        random_model = getattr(transformers, m.hf_class)(config)
        ppl_random = heldout_perplexity(random_model, held, windows=4)
    report = {
        "params": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(train), "eval_tokens": len(held),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "heldout_ppl": ppl_trained, "heldout_ppl_with_outliers": ppl_outliers, "heldout_ppl_random_init": ppl_random,
        "outlier_channels": outliers, "seconds": round(time.time() - t0, 1),
    }
    log.info("%s: held-out ppl %.2f (random init %.0f), %.0fs", m.name, ppl_trained, ppl_random, report["seconds"])
    return report
