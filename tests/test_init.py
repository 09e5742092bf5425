"""``quantize init``: the recipe it writes from a checkpoint is one ``build`` accepts, and its prompt format
renders the model's own chat template's string for a multi-turn conversation with a system message."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import DEMO_ROOT, ROOT
from families import QWEN_VOCAB, build_family, qwen_tokenizer

from quantize.chat_template import PROBE, ChatTemplate, read_chat_template
from quantize.cli import main
from quantize.init_recipe import write_recipe
from quantize.models.demo import Demo
from quantize.pipeline import build_release, recipe_settings
from quantize.recipe import Recipe, load_recipe, render_chat
from quantize.release import koboldcpp_presets

# Chat templates as the families' instruct models publish them (Qwen3's comes from its published tokenizer files).
MISTRAL_V01 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
               "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
QWEN25 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
          "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
          "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
          "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
          "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")

# (HF class, tokenizer, template or None for the tokenizer's own, the format init must find; "custom": turns read from it)
CASES = [
    ("MistralForCausalLM", "spm", MISTRAL_V01, "mistral"),
    ("MixtralForCausalLM", "spm", MISTRAL_V01, "mistral"),
    ("Qwen2ForCausalLM", "qwen", QWEN25, "chatml"),
    ("Qwen3ForCausalLM", "qwen", None, "chatml"),
    ("Qwen3MoeForCausalLM", "qwen", None, "chatml"),
    ("Phi3ForCausalLM", "spm", PHI3, "custom"),
    ("Gemma2ForCausalLM", "spm", GEMMA2, "gemma"),
    ("GraniteForCausalLM", "spm", ZEPHYR, "custom"),
]


def _template(folder: Path) -> ChatTemplate:
    t = read_chat_template(folder)
    assert t is not None, f"{folder} has no chat template"
    return t


def _renders_its_template(recipe: Recipe, folder: Path) -> None:
    """The recipe's format renders the template's string for the probe chat: with its system message where the
    template takes one, else without (the template folds or refuses it)."""
    t, turns = _template(folder), recipe.card.format.turns
    with_system = t.renders(PROBE)
    if recipe.card.prompt_format == "gemma" or with_system is None:
        assert t.render(PROBE[1:]) == render_chat(turns, PROBE[1:])
        assert with_system is None or with_system != render_chat(turns, PROBE)  # why the system message is left out
    else:
        assert with_system == render_chat(turns, PROBE)


def _init(source: str | Path, out: Path, *extra: str) -> Recipe:
    assert main(["init", str(source), "-o", str(out), "--demo-root", str(DEMO_ROOT), *extra]) == 0
    return load_recipe(out)


@pytest.mark.parametrize(("arch", "tok", "template", "fmt"), CASES, ids=[c[0] for c in CASES])
def test_init_on_each_family(arch: str, tok: str, template: str | None, fmt: str, demo: Demo, tmp_path: Path) -> None:
    tok_dir, vocab = (qwen_tokenizer(), QWEN_VOCAB) if tok == "qwen" else (demo.spm, None)
    model = build_family(arch, tok_dir, tmp_path / "tiny", vocab=vocab)
    if template is not None:
        (model / "chat_template.jinja").write_text(template)
    if template == MISTRAL_V01:  # Mistral's tokenizer ends a turn with its EOS, </s> (the demo's is ChatML's)
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "</s>"}))
    r = _init(model, tmp_path / "r.toml")
    assert r.card.prompt_format == fmt
    assert r.card.context == 4096 and r.lora is None and (r.source.parent / r.base).resolve() == model.resolve()
    assert r.card.stop and all(s in _template(model).render(PROBE[1:3], add_generation_prompt=False) or s == "[INST]"
                               for s in r.card.stop)
    _renders_its_template(r, model)
    # build accepts it: the F16 GGUF is converted from the recipe, carrying the same template
    rel = build_release(tmp_path / "r.toml", tmp_path / "artifacts", until="convert", demo_root=DEMO_ROOT)
    assert rel.ladder.f16.is_file()


def test_init_on_the_llama_checkpoint_with_llama3s_template(demo: Demo, tmp_path: Path) -> None:
    model = shutil.copytree(demo.bpe, tmp_path / "llama")
    (model / "chat_template.jinja").write_text(LLAMA3)
    r = _init(model, tmp_path / "r.toml")
    assert (r.card.prompt_format, r.card.stop) == ("llama3", ("<|eot_id|>",))
    _renders_its_template(r, model)


def test_init_on_gemma3(gemma3: Path, tmp_path: Path) -> None:
    r = _init(gemma3, tmp_path / "r.toml")
    assert (r.card.prompt_format, r.card.stop, r.card.license) == ("gemma", ("<end_of_turn>",), "gemma")
    assert r.card.context == json.loads((gemma3 / "config.json").read_text())["max_position_embeddings"]
    assert {"gemma3", "gemma"} <= set(r.card.tags) and r.card.sampler["top_k"] == 64
    _renders_its_template(r, gemma3)
    recipe_settings(r, DEMO_ROOT, until="convert")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_init_then_build_of_the_demo_adapter_gives_the_demo_releases_files(demo: Demo, release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The demo's LoRA adapter: init finds its base, and the build gives the demo release's F16 and Q4_K_M once the
    two recipes agree on the inputs init cannot read (the demo's Shakespeare split)."""
    adapter = DEMO_ROOT / next(p.name for p in DEMO_ROOT.iterdir() if (p / "lora").is_dir()) / "lora"
    r = _init(adapter, tmp_path / "r.toml", "--name", "Demo-Mistral-ChatML")
    ref = load_recipe(ROOT / "recipes" / "demo.toml")
    assert Path(r.lora or "").resolve() == adapter.resolve() and Path(r.base).resolve() == demo.spm.resolve()
    assert (r.card.prompt_format, r.card.stop, r.card.context) == (ref.card.prompt_format, ref.card.stop, ref.card.context)
    text = (tmp_path / "r.toml").read_text()
    (tmp_path / "r.toml").write_text(text.replace("\n[ladder]", f"calibration = {ref.calibration!r}\nevaluation = {ref.evaluation!r}\n\n[ladder]", 1))
    rel = build_release(tmp_path / "r.toml", tmp_path / "artifacts", until="gguf", types=("Q4_K_M",), demo_root=DEMO_ROOT)
    assert _sha(rel.ladder.f16) == _sha(release.ladder.f16)
    assert _sha(rel.ladder.quants["Q4_K_M"]) == _sha(release.ladder.quants["Q4_K_M"])


@pytest.mark.parametrize(("make", "problem"), [
    (lambda d: d, "is not a Hugging Face checkpoint (no config.json) nor a PEFT adapter"),
    (lambda d: (d / "config.json").write_text('{"model_type": "llama"}') and d, "names no model class"),
    (lambda d: (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}') and d, "no weights"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LORA"}') and d, "names no base model"),
    (lambda d: d / "missing", "no such folder, and not a Hugging Face repo id"),
])
def test_init_refuses_what_is_not_a_checkpoint(make, problem: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    src = make(tmp_path / "src")
    assert main(["init", str(src), "-o", str(tmp_path / "r.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.toml").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_init_does_not_replace_a_recipe(demo: Demo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.toml").write_text("keep")
    assert main(["init", str(demo.spm), "-o", str(tmp_path / "r.toml")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and (tmp_path / "r.toml").read_text() == "keep"
    assert main(["init", str(demo.spm), "-o", str(tmp_path / "r.toml"), "--force"]) == 0
    assert load_recipe(tmp_path / "r.toml").card.prompt_format == "chatml"


def test_an_unknown_template_is_shown_and_left_to_fill_in(demo: Demo, tmp_path: Path) -> None:
    model = shutil.copytree(demo.spm, tmp_path / "m")
    # the system text inside the first user turn, with a marker no turn table can express
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns = m['content'] %}{% else %}"
        "{{ '<' + m['role'] + ' n=' + loop.index|string + '>' + m['content'] + '</>' }}{% endif %}{% endfor %}")
    write_recipe(str(model), tmp_path / "r.toml")
    text = (tmp_path / "r.toml").read_text()
    assert "# prompt_format = " in text and "<user n=2>Name a prime number.</>" in text
    assert load_recipe(tmp_path / "r.toml").card.prompt_format == "chatml"  # build's default


def test_custom_turns_reach_the_presets(demo: Demo, tmp_path: Path) -> None:
    """A template read as turns is written as [card.turns], and the koboldcpp preset carries those turns."""

    model = shutil.copytree(demo.spm, tmp_path / "m")
    (model / "chat_template.jinja").write_text(PHI3)
    r = _init(model, tmp_path / "r.toml")
    assert r.card.prompt_format == "custom" and r.card.stop == ("<|end|>",)
    kcpps, _ = koboldcpp_presets(tmp_path, "m.Q4_K_M.gguf", r)
    assert json.loads(kcpps.read_text())["chatcompletionsadapter"] == dict(r.card.turns)
    assert render_chat(r.card.turns, PROBE) == _template(model).render(PROBE)
